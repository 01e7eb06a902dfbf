"""Sweep specs: expanded into the trials a user expects, checked by train's own
rules before anything runs, and recorded so a rerun resumes the same sweep."""

from __future__ import annotations

import json

import pytest

from job import sweep
from job.errors import ConfigError
from tests.conftest import ROOT, run_job


def test_a_grid_is_every_combination_over_the_fixed_settings():
    found = sweep.parse(
        {
            "fixed": {"epochs": 2, "learning-rate": 0.5},
            "grid": {"learning_rate": [0.001, 0.01], "--hidden-units": ["128,64", [32]]},
        }
    )
    assert [t["learning-rate"] for t in found.trials] == [0.001, 0.001, 0.01, 0.01]
    assert [t["hidden-units"] for t in found.trials] == ["128,64", [32]] * 2
    assert all(t["epochs"] == 2 for t in found.trials)
    assert found.varied == ["learning-rate", "hidden-units"]
    assert (found.metric, found.goal) == ("test_accuracy", "maximize")


def test_explicit_trials_then_grid_then_random_draws():
    spec = {
        "metric": "test_loss",
        "trials": [{"seed": 7}],
        "grid": {"batch-size": [16, 64]},
        "random": {
            "count": 20,
            "seed": 3,
            "settings": {
                "learning-rate": {"log-uniform": [1e-4, 1e-1]},
                "hidden-units": {"choice": ["64", "128,64"]},
                "seed": {"int": [0, 9]},
                "num-images": {"choice": [0, 5]},
            },
        },
    }
    found = sweep.parse(spec)
    assert found.goal == "minimize"  # the loss: lower is better
    assert found.trials[0] == {"seed": 7}
    assert found.trials[1:3] == ({"batch-size": 16}, {"batch-size": 64})
    drawn = found.trials[3:]
    assert len(drawn) == 20
    rates = [t["learning-rate"] for t in drawn]
    assert all(1e-4 <= r <= 1e-1 for r in rates)
    # Log-uniform: about as many draws below 1e-2.5 as above.
    assert 4 <= sum(r < 10**-2.5 for r in rates) <= 16
    assert {t["hidden-units"] for t in drawn} == {"64", "128,64"}
    assert all(type(t["seed"]) is int and 0 <= t["seed"] <= 9 for t in drawn)
    uniform = {"count": 5, "settings": {"learning-rate": {"uniform": [0.1, 0.2]}}}
    assert all(0.1 <= t["learning-rate"] <= 0.2 for t in sweep.parse({"random": uniform}).trials)
    # Reproducible from the seed; another seed draws others.
    assert sweep.parse(spec).trials == found.trials
    spec["random"]["seed"] = 4
    assert sweep.parse(spec).trials[3:] != drawn


def test_only_fixed_settings_is_one_trial():
    assert sweep.parse({"fixed": {"epochs": 1}}).trials == ({"epochs": 1},)


def test_train_args_are_the_flags_a_user_would_type():
    args = sweep.train_args(
        {"deterministic": False, "hidden-units": [256, 32], "learning-rate": 0.003}
    )
    assert args == ["--no-deterministic", "--hidden-units", "256,32", "--learning-rate", "0.003"]
    config = sweep.train_config({"hidden-units": [256, 32], "seed": 5}, "out", environ={})
    assert (config.hidden_units, config.seed, str(config.output_dir)) == ((256, 32), 5, "out")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"grid": {"learning-rat": [0.1]}}, "unknown option 'learning-rat'"),
        ({"fixed": {"output-dir": "x"}}, "--output-dir is set by the sweep"),
        ({"grid": {"learning-rate": ["fast"]}}, "trial 0: Invalid value for '--learning-rate'"),
        ({"trials": [{"learning-rate": -1}]}, "trial 0: --learning-rate must be a positive"),
        ({"grid": {"epochs": [1, 0]}}, "trial 1: Invalid value for '--epochs'"),
        ({"grid": {"hidden-units": ["128,-1"]}}, "trial 0: Invalid value for '--hidden-units'"),
        ({"grid": {"device": ["tpu"]}}, "'tpu' is not one of"),
        ({"trials": [{"deterministic": "yes"}]}, "--deterministic must be true or false"),
        ({"grid": {"epochs": []}}, "grid epochs must be a non-empty list"),
        ({"grid": {"epochs": [1, 1]}}, "trials 0 and 1 have the same settings"),
        ({"metric": "accuracy"}, "metric must be one of test_accuracy, test_loss"),
        ({"goal": "max"}, "goal must be maximize or minimize"),
        ({"grids": {}}, "unknown key 'grids'"),
        ({"random": {"count": 0, "settings": {}}}, "count must be a positive whole number"),
        (
            {"random": {"count": 2, "settings": {"learning-rate": {"log-uniform": [0, 1]}}}},
            "log-uniform needs low > 0",
        ),
        (
            {"random": {"count": 2, "settings": {"learning-rate": {"normal": [0, 1]}}}},
            "must be one of {uniform",
        ),
        (
            {"random": {"count": 2, "settings": {"epochs": {"int": [1.5, 3]}}}},
            "int needs whole-number bounds",
        ),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_a_bad_spec_is_one_config_error(spec, message):
    with pytest.raises(ConfigError) as raised:
        sweep.parse(spec)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"grid": {"learning-rate": [0.1, "x"]}}', "trial 1: Invalid value for '--learning-rate'"),
        ('{"grid": ', "is not valid JSON"),
        (None, "No such file or directory"),
    ],
)
def test_the_cli_refuses_a_bad_spec_in_one_line_with_exit_2(tmp_path, text, message):
    spec = tmp_path / "spec.json"
    if text is not None:
        spec.write_text(text)
    result = run_job("sweep", "run", str(spec), "--output-dir", str(tmp_path / "sweep"))
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("mnist-job: error: sweep spec") and message in line
    assert not (tmp_path / "sweep").exists(), "nothing runs, nothing is written"


def test_sweep_json_records_the_trials_and_refuses_another_sweep(tmp_path):
    first = sweep.parse({"grid": {"seed": [1, 2]}})
    sweep.record(first, tmp_path)
    recorded = json.loads((tmp_path / "sweep.json").read_text())
    assert recorded["trials"] == [
        {"index": 0, "settings": {"seed": 1}},
        {"index": 1, "settings": {"seed": 2}},
    ]
    assert recorded["varied"] == ["seed"]
    sweep.record(sweep.parse({"grid": {"seed": [1, 2]}, "metric": "test_loss"}), tmp_path)
    assert json.loads((tmp_path / "sweep.json").read_text())["metric"] == "test_loss"
    with pytest.raises(ConfigError, match="holds another sweep"):
        sweep.record(sweep.parse({"grid": {"seed": [1, 3]}}), tmp_path)


def test_the_example_spec_is_valid_and_small():
    example = sweep.load(ROOT / "docs" / "sweep-example.json")
    assert 2 <= len(example.trials) <= 6
    assert all(t["epochs"] <= 2 and t["max-train-samples"] <= 10000 for t in example.trials)
