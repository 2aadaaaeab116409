"""What one evaluation runs: the typed, validated configuration behind ``python -m metatrain.eval``.

Defaults follow the lozoo protocol of docs/design/meta_training.md §10: Adam over the 7-point log
grid {1e-4, 3e-4, ..., 1e-1}, at least 3 seeds, best LR per task by the smoothed final train loss.
Validation happens before any training so that a typo costs a one-line error, not a wasted run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_ADAM_LRS", "EMA_ALPHA", "NORMALIZER_POINTS", "EvalConfig"]

DEFAULT_ADAM_LRS: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
"""The lozoo Adam grid (design §10): 7 log-spaced points, half decades."""
EMA_ALPHA = 0.95
"""Smoothing of train-loss curves for LR selection and the speedup normaliser."""
NORMALIZER_POINTS = 512
"""Evenly spaced steps the Adam envelope is resampled onto (the reference's v1 normaliser)."""
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass
class EvalConfig:
    """One evaluation of a learned optimizer against a tuned Adam on held-out tasks.

    Every field is a CLI flag of ``python -m metatrain.eval`` (``num_tasks`` → ``--num-tasks``).
    """

    optimizer: str
    task_family: str = "mlp_mnist"
    task_option: dict[str, Any] = field(default_factory=dict)
    num_tasks: int = 4
    steps: int = 1000
    seeds: int = 3
    adam_lrs: tuple[float, ...] = DEFAULT_ADAM_LRS
    learned_lr: float = 1.0
    eval_every: int = 100
    val_batches: int = 10
    seed: int = 0
    out: str | None = None
    publish: str | None = None
    progress: bool = True
    threads: int = 0

    def validate(self) -> EvalConfig:
        """Check every field (raises ``ValueError`` naming the flag); sorts the Adam grid."""
        import tasks

        if not isinstance(self.optimizer, str) or not self.optimizer.strip():
            raise ValueError("--optimizer is required: a zoo reference, a run dir or a file")
        if self.task_family not in tasks.FAMILY_NAMES:
            raise ValueError(
                f"unknown task family {self.task_family!r}; valid names: "
                f"{', '.join(tasks.FAMILY_NAMES)}"
            )
        tasks.get_family(self.task_family, **self.task_option)  # bad options fail here
        minimum = {"num_tasks": 1, "steps": 2, "seeds": 1, "val_batches": 1}
        for name, lo in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"--{_flag(name)} must be an integer >= {lo}, got {value!r}")
        for name in ("eval_every", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"--{_flag(name)} must be an integer >= 0, got {value!r}")
        if not self.adam_lrs:
            raise ValueError("--adam-lrs needs at least one learning rate")
        for lr in self.adam_lrs:
            if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
                raise ValueError(f"--adam-lrs must be positive finite numbers, got {lr!r}")
        if len(set(self.adam_lrs)) != len(self.adam_lrs):
            raise ValueError(f"--adam-lrs has duplicates: {list(self.adam_lrs)}")
        if not math.isfinite(self.learned_lr) or self.learned_lr <= 0:
            raise ValueError(f"--learned-lr must be a positive number, got {self.learned_lr!r}")
        if self.publish is not None:
            import zoo

            zoo.validate_name(self.publish)
        self.adam_lrs = tuple(sorted(float(lr) for lr in self.adam_lrs))
        return self

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["adam_lrs"] = list(self.adam_lrs)
        return out


def _flag(name: str) -> str:
    return name.replace("_", "-")
