"""job.summaries: what a Summaries writes, read back from its event files where
TensorBoard looks for it (runs `train`, `validation`, and the log dir itself)."""

from __future__ import annotations

import pytest
import tensorflow as tf
from tensorboard.plugins.hparams import metadata as hparams_metadata

from job.plots import predictions_panel
from job.summaries import Summaries
from tests.events import image_tags, scalars

RECORD = {"epoch": 1, "loss": 0.5, "accuracy": 0.8, "val_loss": 0.4, "val_accuracy": 0.85}


def approx(*points: tuple[int, float]) -> list:
    """[(step, value)] as read back: values are float32."""
    return [(step, pytest.approx(value)) for step, value in points]


def test_epoch_scalars_land_in_the_train_and_validation_runs_at_the_epoch(tmp_path):
    summaries = Summaries(tmp_path)
    summaries.epoch(RECORD, learning_rate=0.001)
    summaries.epoch({**RECORD, "epoch": 2, "loss": 0.3, "val_accuracy": 0.9})
    summaries.close()
    train, validation = scalars(tmp_path / "train"), scalars(tmp_path / "validation")
    assert train["epoch_loss"] == approx((1, 0.5), (2, 0.3))
    assert train["epoch_accuracy"] == approx((1, 0.8), (2, 0.8))
    assert train["learning_rate"] == approx((1, 0.001))
    assert validation["epoch_loss"] == approx((1, 0.4), (2, 0.4))
    assert validation["epoch_accuracy"] == approx((1, 0.85), (2, 0.9))
    assert "learning_rate" not in validation
    assert scalars(tmp_path) == {}  # nothing of the epochs in the root run


def test_a_resumed_run_continues_the_same_epoch_axis(tmp_path):
    first = Summaries(tmp_path)
    first.epoch(RECORD)
    first.close()
    resumed = Summaries(tmp_path)  # a new process, the same log dir
    resumed.epoch({**RECORD, "epoch": 2})
    resumed.close()
    steps = [step for step, _ in scalars(tmp_path / "train")["epoch_loss"]]
    assert steps == [1, 2]


def test_chunk_writes_batch_loss_into_train_at_the_global_step(tmp_path):
    summaries = Summaries(tmp_path)
    summaries.chunk(512, 0.7)
    summaries.chunk(1024, 0.6)
    summaries.close()
    found = scalars(tmp_path / "train")
    assert found["batch_loss"] == approx((512, 0.7), (1024, 0.6))
    assert "batch_loss" not in scalars(tmp_path / "validation")


def session_start_hparams(log_dir) -> dict:
    """The settings the hparams dashboard shows for the run in `log_dir`."""
    for path in log_dir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data
                if plugin.plugin_name == hparams_metadata.PLUGIN_NAME:
                    info = hparams_metadata.parse_session_start_info_plugin_data(plugin.content)
                    return {
                        name: getattr(v, v.WhichOneof("kind")) for name, v in info.hparams.items()
                    }
    return {}


def test_hparams_writes_the_settings_and_test_scalars_into_the_root_run(tmp_path):
    summaries = Summaries(tmp_path)
    settings = {
        "epochs": 2,
        "batch_size": 32,
        "hidden_units": [128, 64],
        "seed": None,
        "deterministic": True,
        "output_dir": "/somewhere",  # not a hparam: left out
    }
    summaries.hparams(settings, {"loss": 0.3, "accuracy": 0.91}, step=2)
    summaries.close()
    root = scalars(tmp_path)
    assert root["test_loss"] == approx((2, 0.3))
    assert root["test_accuracy"] == approx((2, 0.91))
    assert session_start_hparams(tmp_path) == {
        "epochs": 2,
        "batch_size": 32,
        "hidden_units": "128,64",  # the dashboard takes no lists
        "seed": "none",  # nor None
        "deterministic": True,
    }
    assert "test_loss" not in scalars(tmp_path / "train")


def test_image_goes_to_the_validation_run(tmp_path, tiny):
    png = predictions_panel(tiny.x_test[:3], tiny.y_test[:3], tiny.y_test[:3])
    summaries = Summaries(tmp_path)
    summaries.image("predictions", png, step=2)
    summaries.close()
    assert image_tags(tmp_path / "validation") == {"predictions"}


def every_call(summaries: Summaries, tiny) -> None:
    from job.model import build_model

    png = predictions_panel(tiny.x_test[:1], tiny.y_test[:1], tiny.y_test[:1])
    summaries.graph(build_model((4,)))
    summaries.epoch(RECORD, learning_rate=0.001)
    summaries.chunk(10, 0.5)
    summaries.hparams({"epochs": 1}, {"loss": 0.3}, step=1)
    summaries.image("predictions", png, step=1)
    summaries.flush()


def test_summaries_of_none_write_nothing(tmp_path, tiny, monkeypatch):
    # Every worker but the chief: the same calls, no files anywhere.
    monkeypatch.chdir(tmp_path)
    summaries = Summaries(None)
    every_call(summaries, tiny)
    summaries.close()
    assert list(tmp_path.iterdir()) == []


def test_close_is_safe_to_call_twice_and_later_calls_write_nothing(tmp_path, tiny):
    summaries = Summaries(tmp_path)
    summaries.epoch(RECORD)
    summaries.close()
    summaries.close()
    every_call(summaries, tiny)
    assert [step for step, _ in scalars(tmp_path / "train")["epoch_loss"]] == [1]
    assert scalars(tmp_path) == {}


def test_graph_is_written_for_the_graphs_tab(tmp_path):
    from job.model import build_model

    summaries = Summaries(tmp_path)
    summaries.graph(build_model((4,)))
    summaries.close()
    graphs = [
        event.graph_def
        for path in (tmp_path / "train").glob("events.out.tfevents.*")
        for event in tf.compat.v1.train.summary_iterator(str(path))
        if event.graph_def
    ]
    assert len(graphs) == 1
    graph = tf.compat.v1.GraphDef.FromString(graphs[0])
    assert any(node.op == "MatMul" for node in graph.node)
