"""A sweep's report: every trial ranked by the spec's metric, from what each
trial left in its dir (metrics.json if it finished, else failed.json or its
checkpoint), as report.md, report.json and report.png in the sweep dir.

Unfinished trials are listed too, below the ranked ones, with where they
stand, so the report can be read while a sweep runs.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure

from job import artifacts, storage, sweep
from job.errors import ConfigError
from job.plots import to_png
from job.sweep_run import FAILED_FILE, final_metrics, trial_file

log = logging.getLogger(__name__)

TOP_CURVES = 5  # validation curves drawn: the best trials'


@dataclass
class Trial:
    index: int
    settings: dict
    status: str  # finished | failed (exit N): error | epoch E/N checkpointed | not started
    metrics: dict  # test_accuracy, test_loss; empty unless finished
    train_seconds: float | None  # the epochs' time, across resumes
    history: list  # per-epoch records, as metrics.json has them
    rank: int | None = None


def collect(sweep_dir) -> tuple[dict, list[Trial]]:
    """sweep.json and every trial, ranked: finished ones best first."""
    recorded = sweep.read_json(sweep.path_in(sweep_dir, sweep.SWEEP_FILE))
    if recorded is None:
        raise ConfigError(f"{sweep_dir} holds no {sweep.SWEEP_FILE}: not a sweep dir")
    trials = [_trial(sweep_dir, t["index"], t["settings"]) for t in recorded["trials"]]
    metric, best_first = recorded["metric"], recorded["goal"] == "maximize"
    done = sorted(
        (t for t in trials if t.metrics),
        key=lambda t: (-t.metrics[metric] if best_first else t.metrics[metric], t.index),
    )
    for rank, trial in enumerate(done, 1):
        trial.rank = rank
    return recorded, done + [t for t in trials if not t.metrics]


def _trial(sweep_dir, index: int, settings: dict) -> Trial:
    metrics = sweep.read_json(trial_file(sweep_dir, index, "metrics.json"))
    if metrics is not None:
        seconds = sum(record["seconds"] for record in metrics["history"])
        return Trial(index, settings, "finished", final_metrics(metrics), seconds,
                     metrics["history"])  # fmt: skip
    failed = sweep.read_json(trial_file(sweep_dir, index, FAILED_FILE))
    if failed is not None:
        status = f"failed (exit {failed['exit_code']}): {failed['error']}"
        return Trial(index, settings, status, {}, None, [])
    state = _checkpoint_state(trial_file(sweep_dir, index, "checkpoints/latest.npz"))
    if state is None:
        return Trial(index, settings, "not started", {}, None, [])
    epochs = sweep.train_config(settings, sweep.trial_dir(sweep_dir, index)).epochs
    status = f"epoch {state['epoch']}/{epochs} checkpointed"
    if state["step"]:
        status += f" (+{state['step']} steps)"
    seconds = sum(record["seconds"] for record in state["history"])
    return Trial(index, settings, status, {}, seconds, state["history"])


def _checkpoint_state(path) -> dict | None:
    """The counters of a trial's checkpoint (not its arrays), None if none."""
    try:
        if storage.is_uri(path):
            data = storage.read_bytes(str(path))
            if data is None:
                return None
            source = io.BytesIO(data)
        else:
            source = path
        with np.load(source, allow_pickle=False) as npz:
            return json.loads(str(npz["state"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as err:
        log.warning("Unreadable checkpoint %s: %s", path, err)
        return None


def write(sweep_dir) -> str:
    """Write report.md, report.json and report.png; the ranked table, as text."""
    recorded, trials = collect(sweep_dir)
    table = markdown_table(recorded, trials)
    finished = sum(1 for t in trials if t.metrics)
    markdown = (
        f"# Sweep report\n\nRanked by {recorded['metric']} ({recorded['goal']}); "
        f"{finished} of {len(trials)} trials finished.\n\n{table}\n\n![report](report.png)\n"
    )
    entries = [
        {"rank": t.rank, "trial": t.index, "settings": t.settings, "metrics": t.metrics,
         "train_seconds": t.train_seconds, "status": t.status}
        for t in trials
    ]  # fmt: skip
    report = {"metric": recorded["metric"], "goal": recorded["goal"],
              "varied": recorded["varied"], "trials": entries}  # fmt: skip
    _write_bytes(sweep.path_in(sweep_dir, "report.png"), figure(recorded, trials))
    sweep.write_json(sweep.path_in(sweep_dir, "report.json"), report)
    _write_bytes(sweep.path_in(sweep_dir, "report.md"), markdown.encode())
    return table


def markdown_table(recorded: dict, trials: list[Trial]) -> str:
    metric, varied = recorded["metric"], recorded["varied"]
    others = [m for m in sweep.METRICS if m != metric]
    head = ["rank", "trial", *varied, metric, *others, "train s", "status"]
    rows = [head, ["---"] * len(head)]
    for t in trials:
        values = [t.metrics.get(m) for m in (metric, *others)]
        rows.append([
            str(t.rank or "-"), str(t.index), *(_shown(t.settings.get(n)) for n in varied),
            *("-" if v is None else f"{v:.4f}" for v in values),
            "-" if t.train_seconds is None else f"{t.train_seconds:.1f}",
            t.status.replace("|", "/"),
        ])  # fmt: skip
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _shown(value) -> str:
    if value is None:
        return "default"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def figure(recorded: dict, trials: list[Trial]) -> bytes:
    """Left: parallel coordinates of the varied settings and the metric, one
    line per trial coloured by the metric (grey: unfinished). Right: the
    validation accuracy per epoch of the best trials."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    lines, curves = fig.subplots(1, 2, width_ratios=[3, 2])
    _parallel_coordinates(fig, lines, recorded, trials)
    best = [t for t in trials if t.metrics][:TOP_CURVES]
    for t in best:
        epochs = [r["epoch"] for r in t.history]
        label = f"#{t.rank} trial {t.index}: {t.metrics[recorded['metric']]:.4f}"
        curves.plot(epochs, [r["val_accuracy"] for r in t.history], marker="o", label=label)
    curves.set(title=f"Validation accuracy, best {len(best)}", xlabel="epoch",
               ylabel="val_accuracy")  # fmt: skip
    curves.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    curves.grid(alpha=0.3)
    if best:
        curves.legend(fontsize=8)
    return to_png(fig)


def _parallel_coordinates(fig: Figure, ax, recorded: dict, trials: list[Trial]) -> None:
    metric = recorded["metric"]
    axes = [*recorded["varied"], metric]
    columns = [[_value(t, name, metric) for t in trials] for name in axes]
    scaled = [_scale(column) for column in columns]
    scores = [t.metrics.get(metric) for t in trials if t.metrics]
    norm_low, norm_high = (min(scores), max(scores)) if scores else (0, 1)
    colours = fig.colorbar if scores else None
    norm = mpl.colors.Normalize(norm_low, norm_high if norm_high > norm_low else norm_low + 1e-9)
    cmap = mpl.colormaps["viridis"]
    for i, t in enumerate(trials):
        ys = [column[0][i] for column in scaled]
        if t.metrics:
            ax.plot(range(len(axes)), ys, color=cmap(norm(t.metrics[metric])), linewidth=2)
        else:
            ax.plot(range(len(axes) - 1), ys[:-1], color="0.6", linestyle="--", linewidth=1)
    for x, (_, ticks) in enumerate(scaled):
        ax.axvline(x, color="0.3", linewidth=0.8)
        for y, label in ticks:
            ax.annotate(label, (x, y), xytext=(3, 0), textcoords="offset points", fontsize=8,
                        va="center", backgroundcolor="white")  # fmt: skip
    ax.set_xticks(range(len(axes)), axes)
    ax.set_yticks([])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(-0.2, len(axes) - 0.6)
    ax.set_title(f"Trials by setting, coloured by {metric} (grey: unfinished)")
    if colours:
        colours(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric)


def _value(trial: Trial, name: str, metric: str):
    return trial.metrics.get(metric) if name == metric else trial.settings.get(name)


def _scale(column: list) -> tuple[list, list]:
    """Positions in [0, 1] of a column's values and the (position, label) ticks:
    numbers on a linear axis, or a log one where they span 10x or more;
    anything else as categories, evenly spaced in sorted order."""
    present = [v for v in column if v is not None]
    numeric = present and all(type(v) in (int, float) for v in present)
    if not numeric:
        categories = sorted({_shown(v) for v in present})
        spot = {c: (i / (len(categories) - 1) if len(categories) > 1 else 0.5)
                for i, c in enumerate(categories)}  # fmt: skip
        positions = [spot[_shown(v)] if v is not None else math.nan for v in column]
        return positions, [(p, c) for c, p in spot.items()]
    low, high = min(present), max(present)
    log = low > 0 and high / low >= 10
    f = math.log if log else (lambda v: v)
    span = f(high) - f(low)
    positions = [
        math.nan if v is None else ((f(v) - f(low)) / span if span else 0.5) for v in column
    ]
    ticks = [(0.0, f"{low:.4g}"), (1.0, f"{high:.4g}")] if span else [(0.5, f"{low:.4g}")]
    return positions, ticks


def _write_bytes(path, data: bytes) -> None:
    if storage.is_uri(path):
        storage.write_bytes(str(path), data)
    else:
        artifacts.write_bytes(path, data)
