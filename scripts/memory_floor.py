#!/usr/bin/env python3
"""The least memory TensorFlow needs for this job, whatever our code does.

    python scripts/memory_floor.py import   # import tensorflow, nothing else
    python scripts/memory_floor.py step     # + Keras, the model and one XLA-compiled
                                            #   training chunk on 64 blank images

`make bench` runs them as separate processes, `step` twice with XLA's compile
cache (compiled, then loaded as every run after a machine's first does), and
records their peak RSS and anonymous memory next to the job's. The job cannot
peak below `step`: that is before any of MNIST's 55 MB is loaded.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace


def compiled_step() -> None:
    import tensorflow as tf

    from job.config import IMAGE_SHAPE, TrainConfig
    from job.loop import Trainer, epoch_order
    from job.model import build_model, build_optimizer

    config = TrainConfig()  # the seed's model, batch and optimizer

    size = 64
    blank = SimpleNamespace(
        size=size, images=tf.zeros((size, *IMAGE_SHAPE), tf.uint8), labels=tf.zeros(size, tf.int32)
    )
    model = build_model(config.hidden_units)
    optimizer = build_optimizer(config.learning_rate)
    optimizer.build(model.trainable_variables)
    strategy = tf.distribute.get_strategy()
    trainer = Trainer(model, optimizer, strategy, config.batch_size, jit_compile=True)
    order = epoch_order(config.seed, 0, size, config.batch_size)
    trainer.run_chunk(blank, order, 0, len(order), stop_requested=False)


if __name__ == "__main__":
    from job.heap import return_large_blocks_when_freed
    from job.lean_imports import keep_out_of_keras

    # As the CLI starts every command.
    keep_out_of_keras()
    return_large_blocks_when_freed()
    if sys.argv[1:] == ["import"]:
        import tensorflow  # noqa: F401
    elif sys.argv[1:] == ["step"]:
        compiled_step()
    else:
        sys.exit(__doc__)
