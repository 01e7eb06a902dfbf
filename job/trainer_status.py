"""Progress reports to Kubeflow Trainer v2 (feature gate TrainJobStatus).

Where Trainer enables it, it gives the trainer pods three variables:
KUBEFLOW_TRAINER_SERVER_URL (its status server, HTTPS), and the paths of the
server's CA certificate (KUBEFLOW_TRAINER_SERVER_CA_CERT) and of a projected
service-account token (KUBEFLOW_TRAINER_SERVER_TOKEN), both mounted in the
pod. After each epoch the chief POSTs the TrainJob's progress there, as
Trainer's TrainJobStatus plugin and status server read it (kubeflow/trainer,
main after v2.3.0):

    {"trainerStatus": {"progressPercentage": 40, "estimatedRemainingSeconds": 12,
                       "metrics": [{"name": "loss", "value": "0.1234"}, ...],
                       "lastUpdatedTime": "2026-12-04T12:00:00Z"}}

with `Authorization: Bearer <token>` (re-read each time: it rotates) over TLS
verified against that CA. Trainer shows it as the TrainJob's
`status.trainerStatus`. Reports come at most every MIN_INTERVAL seconds (the
last epoch's always). A report that fails is one warning line: training goes on.
Standard library only.

The runner's chief makes one with `reporter` and hands it each epoch's
record (job.loop.epoch_record), whatever the log level.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

URL, CA_CERT, TOKEN = (
    "KUBEFLOW_TRAINER_SERVER_URL",
    "KUBEFLOW_TRAINER_SERVER_CA_CERT",
    "KUBEFLOW_TRAINER_SERVER_TOKEN",
)
MIN_INTERVAL = 5.0  # seconds between reports, as Trainer asks of its clients
TIMEOUT = 5.0  # seconds for one report
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


class Reporter:
    """Reports the progress of a run of `epochs` epochs to Trainer."""

    def __init__(
        self, url: str, ca_cert: Path, token: Path, epochs: int, clock=time.monotonic
    ) -> None:
        self.url, self.ca_cert, self.token = url, ca_cert, token
        self.epochs = epochs
        self.clock = clock
        self.last_sent: float | None = None
        self.epoch_seconds: list[float] = []

    @classmethod
    def from_env(cls, epochs: int, environ: Mapping[str, str] = os.environ) -> Reporter | None:
        """A reporter if Trainer gave this pod its status server, else None."""
        if not all(environ.get(name) for name in (URL, CA_CERT, TOKEN)):
            return None
        return cls(environ[URL], Path(environ[CA_CERT]), Path(environ[TOKEN]), epochs)

    def epoch_end(self, record: Mapping) -> bool:
        """After epoch record["epoch"] (1-based): report, unless one went out
        less than MIN_INTERVAL ago and training is not done. True if it got through."""
        self.epoch_seconds.append(float(record["seconds"]))
        done = int(record["epoch"]) >= self.epochs
        now = self.clock()
        if not done and self.last_sent is not None and now - self.last_sent < MIN_INTERVAL:
            return False
        self.last_sent = now
        return self.send(status(record, self.epochs, self.epoch_seconds))

    def send(self, trainer_status: dict) -> bool:
        body = json.dumps({"trainerStatus": trainer_status}).encode()
        try:
            token = self.token.read_text().strip()
            context = ssl.create_default_context(cafile=str(self.ca_cert))
            request = urllib.request.Request(
                self.url,
                data=body,
                method="POST",
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:
                response.read()
            return True
        except urllib.error.HTTPError as err:
            reason = f"HTTP {err.code} {err.reason}"
        except (OSError, ValueError, ssl.SSLError, http.client.HTTPException) as err:
            reason = str(getattr(err, "reason", None) or err) or type(err).__name__
        log.warning("progress report to Kubeflow Trainer failed (training goes on): %s", reason)
        return False


def reporter(epochs: int, environ: Mapping[str, str] = os.environ) -> Reporter | None:
    """The chief's reporter, if Trainer gave this pod its status server."""
    found = Reporter.from_env(epochs, environ)
    if found:
        log.info("Reporting progress to Kubeflow Trainer after each epoch")
    return found


def status(record: Mapping, epochs: int, epoch_seconds: list[float]) -> dict:
    """The trainerStatus after epoch record["epoch"] of `epochs`; the time left
    estimated from the mean of this run's epochs so far."""
    epoch = int(record["epoch"])
    mean = sum(epoch_seconds) / len(epoch_seconds) if epoch_seconds else 0.0
    return {
        "progressPercentage": min(100, max(0, int(100 * epoch / epochs))),
        "estimatedRemainingSeconds": max(0, round(mean * (epochs - epoch))),
        # Trainer takes values as strings, at most 64 characters.
        "metrics": [
            {"name": name, "value": f"{float(record[name]):.6g}"}
            for name in METRICS
            if name in record
        ],
        "lastUpdatedTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
