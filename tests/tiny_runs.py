"""The tiny mlp_mnist meta-training setting the meta-trainer, executor, eval and notebook tests
share: one 8×8 hidden-16 MLP per task, a few outer steps, a second or two per run on 2 cores."""

from __future__ import annotations

from pathlib import Path

from metatrain import MetaTrainConfig

TINY_MNIST = {"image_sizes": [8], "depth": 1, "width": 16, "batch_size": 32}


def tiny_config(out_dir: str | Path, **overrides) -> MetaTrainConfig:
    """A serial, quiet run writing to ``out_dir``; ``overrides`` replace any field."""
    values = dict(
        task_family="mlp_mnist",
        task_option=dict(TINY_MNIST),
        num_tasks=2,
        truncation_length=3,
        trajectory_length=12,
        min_trajectory_length=4,
        outer_steps=6,
        checkpoint_every=3,
        log_every=1,
        progress=False,
        heldout_tasks=0,  # the held-out monitor has its own tests
        init_from="none",  # a fresh θ: tests compare runs from the seed alone
        num_estimators=1,  # the settings these tests were written for
        resample_every=0,
        outer_lr=1e-3,
        out_dir=str(out_dir),
    )
    values.update(overrides)
    return MetaTrainConfig(**values)
