"""Hyperparameter sweeps: a spec (JSON) expanded into numbered trials, each an
ordinary `train` run into `<sweep dir>/trial-<i>`.

A spec names `train` options by their flag (`learning-rate`) and gives them
values as a user would type them. Every value is checked by the option's own
click type, then each trial's TrainConfig by its own checks, so the rules
live where `train` keeps them; a mistake is one ConfigError line (exit 2)
before any trial starts. The expansion is written to `sweep.json`; a sweep
dir that holds another expansion is refused, so a rerun resumes the same
trials and never mixes two sweeps' results.

JSON, not YAML: the job already reads JSON, the images then need no YAML
parser, and a ConfigMap holds JSON as well as YAML.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import click

from job import artifacts, storage
from job.config import from_options
from job.errors import ConfigError
from job.options import train_options

SPEC_KEYS = ("metric", "goal", "fixed", "grid", "trials", "random")
# What a spec may rank by: metrics.json's test results; the goal each defaults to.
METRICS = {"test_accuracy": "maximize", "test_loss": "minimize"}
GOALS = ("maximize", "minimize")
# The sweep sets these itself: each trial writes to its own dir, alone.
SWEEP_OWNED = (
    "output_dir", "model_dir", "checkpoint_dir", "tensorboard_dir", "overwrite",
    "num_workers", "worker_service", "worker_port", "join_timeout",
)  # fmt: skip
DISTRIBUTIONS = ("uniform", "log-uniform", "int", "choice")
MAX_TRIALS = 10_000  # an Indexed Job's completions top out there too (without parallelism)
SWEEP_FILE = "sweep.json"

# `train`'s options, for parsing a trial's settings as `train` would.
TRAIN = train_options(click.Command("train", callback=lambda **options: options))
OPTIONS = {
    param.opts[0][2:]: param
    for param in TRAIN.params
    if isinstance(param, click.Option) and not param.hidden and param.name not in SWEEP_OWNED
}
OPTIONS.pop("verbose", None)  # logging, not a setting of the trial


@dataclass(frozen=True)
class Sweep:
    metric: str
    goal: str
    trials: tuple[dict, ...]  # settings of trial i: {flag name: JSON value}, fixed ones too

    @property
    def varied(self) -> list[str]:
        """The settings whose values differ between trials, in spec order."""
        names = dict.fromkeys(name for trial in self.trials for name in trial)
        return [n for n in names if len({_key(t.get(n)) for t in self.trials}) > 1]

    def to_dict(self) -> dict:
        trials = [{"index": i, "settings": s} for i, s in enumerate(self.trials)]
        return {"metric": self.metric, "goal": self.goal, "varied": self.varied, "trials": trials}


def load(path: Path | str) -> Sweep:
    """The sweep a spec file describes, every trial checked."""
    try:
        text = Path(path).read_text() if not storage.is_uri(path) else _read_uri(str(path))
        spec = json.loads(text)
    except OSError as err:
        raise ConfigError(f"sweep spec {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise ConfigError(f"sweep spec {path} is not valid JSON: {err}") from None
    return parse(spec, where=f"sweep spec {path}")


def _read_uri(uri: str) -> str:
    data = storage.read_bytes(uri)
    if data is None:
        raise ConfigError(f"sweep spec {uri}: no such object")
    return data.decode()


def parse(spec, where: str = "sweep spec") -> Sweep:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a JSON object with {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(SPEC_KEYS)})")
    metric = spec.get("metric", "test_accuracy")
    if metric not in METRICS:
        raise ConfigError(f"{where}: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    goal = spec.get("goal", METRICS[metric])
    if goal not in GOALS:
        raise ConfigError(f"{where}: goal must be maximize or minimize, got {goal!r}")
    fixed = _settings(spec.get("fixed", {}), f"{where}: fixed")
    trials = [_settings(t, f"{where}: trials[{i}]") for i, t in enumerate(_list(spec, "trials"))]
    trials += _grid(spec.get("grid"), where)
    trials += _random(spec.get("random"), where)
    if not trials:
        trials = [{}]  # only fixed settings: one trial
    trials = [{**fixed, **trial} for trial in trials]
    if len(trials) > MAX_TRIALS:
        raise ConfigError(f"{where}: {len(trials)} trials, more than {MAX_TRIALS}")
    seen = {}
    for i, trial in enumerate(trials):
        key = _key(trial)
        if key in seen:
            raise ConfigError(f"{where}: trials {seen[key]} and {i} have the same settings")
        seen[key] = i
        check_trial(trial, f"{where}: trial {i}")
    return Sweep(metric, goal, tuple(trials))


def _list(spec: dict, key: str) -> list:
    value = spec.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"sweep spec: {key} must be a list, got {value!r}")
    return value


def _settings(settings, where: str) -> dict:
    """{flag name: value} with names checked and normalised (`learning_rate`
    and `--learning-rate` are `learning-rate`); values are checked per trial."""
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: must map train options to values, got {settings!r}")
    return {option_name(name, where): value for name, value in settings.items()}


def option_name(name: str, where: str) -> str:
    flag = str(name).lstrip("-").replace("_", "-")
    if flag in OPTIONS:
        return flag
    if flag.replace("-", "_") in SWEEP_OWNED:
        raise ConfigError(
            f"{where}: --{flag} is set by the sweep (each trial: one process, its own dir)"
        )
    raise ConfigError(
        f"{where}: unknown option {name!r}; a sweep varies options of `train`: "
        + ", ".join(sorted(OPTIONS))
    )


def _grid(grid, where: str) -> list[dict]:
    """Every combination of the values listed, the last option varying fastest."""
    if grid is None:
        return []
    values = _settings(grid, f"{where}: grid")
    for name, options in values.items():
        if not isinstance(options, list) or not options:
            raise ConfigError(f"{where}: grid {name} must be a non-empty list of values")
    return [dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values())]


def _random(section, where: str) -> list[dict]:
    """`count` draws, each setting from its distribution, reproducible from
    `seed` (Python's random(), stable across versions, unlike numpy's streams)."""
    if section is None:
        return []
    where = f"{where}: random"
    if not isinstance(section, dict) or set(section) - {"count", "seed", "settings"}:
        raise ConfigError(f"{where}: must be {{count, seed, settings}}, got {section!r}")
    count, seed = section.get("count"), section.get("seed", 0)
    if type(count) is not int or count < 1:
        raise ConfigError(f"{where}: count must be a positive whole number, got {count!r}")
    if type(seed) is not int:
        raise ConfigError(f"{where}: seed must be a whole number, got {seed!r}")
    settings = _settings(section.get("settings", {}), f"{where}: settings")
    for name, dist in settings.items():
        _check_distribution(dist, f"{where}: {name}")
    rng = random.Random(seed)
    return [{n: _draw(d, rng.random()) for n, d in settings.items()} for _ in range(count)]


def _check_distribution(dist, where: str) -> None:
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: must be one of {{{': ..., '.join(DISTRIBUTIONS)}: ...}}")
    ((kind, bounds),) = dist.items()
    if kind == "choice":
        if not isinstance(bounds, list) or not bounds:
            raise ConfigError(f"{where}: choice must be a non-empty list")
        return
    numbers = isinstance(bounds, list) and len(bounds) == 2
    numbers = numbers and all(type(b) in (int, float) and math.isfinite(b) for b in bounds)
    if not numbers or bounds[0] > bounds[1]:
        raise ConfigError(f"{where}: {kind} must be [low, high] with low <= high, got {bounds!r}")
    if kind == "log-uniform" and bounds[0] <= 0:
        raise ConfigError(f"{where}: log-uniform needs low > 0, got {bounds!r}")
    if kind == "int" and not all(type(b) is int for b in bounds):
        raise ConfigError(f"{where}: int needs whole-number bounds, got {bounds!r}")


def _draw(dist: dict, u: float):
    ((kind, bounds),) = dist.items()
    if kind == "choice":
        return bounds[min(int(u * len(bounds)), len(bounds) - 1)]
    low, high = bounds
    if kind == "int":
        return min(low + int(u * (high - low + 1)), high)
    if kind == "uniform":
        value = low + u * (high - low)
    else:
        value = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    return float(f"{value:.4g}")  # 4 significant digits: readable in tables and flags


def check_trial(settings: dict, where: str) -> None:
    """Parse a trial as `train` would (click's types, then TrainConfig's checks)."""
    try:
        train_config(settings, Path("sweep") / "trial", environ={})
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def train_args(settings: dict) -> list[str]:
    """The `train` flags of a trial's settings."""
    args = []
    for name, value in settings.items():
        param = OPTIONS[name]
        if param.is_flag and param.secondary_opts:  # --x/--no-x
            if not isinstance(value, bool):
                raise ConfigError(f"--{name} must be true or false, got {value!r}")
            args.append(f"--{name}" if value else param.secondary_opts[0])
        elif param.is_flag:
            if value is not True:
                raise ConfigError(f"--{name} is a flag: true or leave it out, got {value!r}")
            args.append(f"--{name}")
        else:
            if isinstance(value, list):  # hidden-units as [128, 64]
                value = ",".join(map(str, value))
            if isinstance(value, bool | dict | type(None)):
                raise ConfigError(f"--{name}: {json.dumps(value)} is not a value of it")
            args += [f"--{name}", str(value)]
    return args


def train_config(settings: dict, output_dir, environ=os.environ):
    """The TrainConfig of a trial into `output_dir`; MNIST_JOB_* variables
    fill in what the settings leave out, as for `train`."""
    args = [*train_args(settings), "--output-dir", str(output_dir)]
    try:
        ctx = TRAIN.make_context("train", args, default_map=None)
    except click.ClickException as err:
        message = err.format_message()
        param = getattr(err, "param", None)
        if param is not None and param.opts[0][2:] in settings:  # the spec's value, not the env's
            message = re.sub(r" \(env var: '[^']*'\)", "", message)
        raise ConfigError(message) from None
    options = {k: v for k, v in ctx.params.items() if k not in ("verbose", "sagemaker_model_dir")}
    return from_options({**options, "verbosity": 1}, environ)


def trial_dir(sweep_dir, index: int):
    return (
        storage.join(sweep_dir, f"trial-{index}")
        if storage.is_uri(sweep_dir)
        else (Path(sweep_dir) / f"trial-{index}")
    )


def read_json(path) -> dict | None:
    """A JSON file of the sweep dir (or bucket), None if there is none."""
    if storage.is_uri(path):
        data = storage.read_bytes(str(path))
    else:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            data = None
    return None if data is None else json.loads(data)


def write_json(path, obj: dict) -> None:
    if storage.is_uri(path):
        text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
        storage.write_bytes(str(path), text.encode())
    else:
        artifacts.write_json(Path(path), obj)


def record(sweep: Sweep, sweep_dir) -> None:
    """Write `sweep.json`, or refuse a dir that holds another sweep's trials."""
    path = path_in(sweep_dir, SWEEP_FILE)
    found = read_json(path)
    if found is not None and found.get("trials") != sweep.to_dict()["trials"]:
        raise ConfigError(
            f"{path} holds another sweep (its trials differ from this spec's): "
            "choose another --output-dir, or rerun with the spec that made it"
        )
    if found != sweep.to_dict():
        if not storage.is_uri(sweep_dir):
            Path(sweep_dir).mkdir(parents=True, exist_ok=True)
        write_json(path, sweep.to_dict())


def path_in(sweep_dir, name: str):
    """`name` inside the sweep dir: a Path, or a URI in a bucket."""
    return storage.join(sweep_dir, name) if storage.is_uri(sweep_dir) else Path(sweep_dir) / name


def _key(value) -> str:
    return json.dumps(value, sort_keys=True)
