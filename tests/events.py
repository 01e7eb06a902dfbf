"""What a run wrote to TensorBoard, read back from its event files."""

from __future__ import annotations

import tensorflow as tf


def _values(log_dir, plugin: str):
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == plugin:
                    yield event.step, value


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from every event file in a TensorBoard run dir."""
    found: dict[str, list] = {}
    for step, value in _values(log_dir, "scalars"):
        found.setdefault(value.tag, []).append((step, float(tf.make_ndarray(value.tensor))))
    return found


def image_tags(log_dir) -> set[str]:
    return {value.tag for _, value in _values(log_dir, "images")}
