"""What a generalisation-suite evaluation runs: run configs, tuning grids and the suite config.

Every optimizer is tuned the same way (docs/design/generalisation.md): a log-spaced grid of
learning rates around the optimizer's own centre, crossed with {constant, cosine} schedules and
decoupled weight decay {0, 0.01}; the best config by final train loss on seed 0 is re-run on the
other seeds. For a learned optimizer "lr" is the multiplier of its learned step (centre 1).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ABLATION_AXES",
    "DEFAULT_WEIGHT_DECAYS",
    "HALF_DECADES",
    "SCHEDULES",
    "RunConfig",
    "SuiteConfig",
    "lr_grid",
    "run_grid",
]

SCHEDULES = ("constant", "cosine")
DEFAULT_WEIGHT_DECAYS = (0.0, 0.01)
ABLATION_AXES = ("schedule", "weight_decay")
HALF_DECADES = tuple(m * 10.0**e for e in range(-6, 3) for m in (1.0, 3.0))
"""The lr values a grid is drawn from: 1e-6, 3e-6, ..., 100, 300 (half-decade steps)."""


@dataclass(frozen=True, order=True)
class RunConfig:
    """The tuned hyper-parameters of one run."""

    lr: float
    schedule: str = "constant"
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        wd = self.weight_decay
        if not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0):
            raise ValueError(f"weight_decay must be a non-negative number, got {wd!r}")
        object.__setattr__(self, "lr", float(self.lr))
        object.__setattr__(self, "weight_decay", float(wd))

    @property
    def label(self) -> str:
        return f"lr={self.lr:g} {self.schedule} wd={self.weight_decay:g}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return cls(**data)

    def schedule_factor(self, step: int, total: int) -> float:
        """Multiplier of ``lr`` at update ``step`` (0-based) of ``total``: 1, or cosine to 0."""
        if self.schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * step / total))


def lr_grid(centre: float, points: int) -> tuple[float, ...]:
    """``points`` consecutive half-decade values around ``centre`` (extra point above it)."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ValueError(f"--lr-points must be an integer >= 1, got {points!r}")
    i = min(range(len(HALF_DECADES)), key=lambda j: abs(math.log(HALF_DECADES[j] / centre)))
    lo = max(0, min(i - (points - 1) // 2, len(HALF_DECADES) - points))
    return HALF_DECADES[lo : lo + points]


def run_grid(
    lrs: tuple[float, ...],
    schedules: tuple[str, ...] = SCHEDULES,
    weight_decays: tuple[float, ...] = DEFAULT_WEIGHT_DECAYS,
) -> list[RunConfig]:
    """Every (lr, schedule, weight decay) combination, in a fixed order."""
    return [RunConfig(lr, s, wd) for s, wd, lr in itertools.product(schedules, weight_decays, lrs)]


@dataclass
class SuiteConfig:
    """One ``python -m metatrain.eval --suite generalisation`` invocation (flags ↔ fields)."""

    optimizer: str
    problems: tuple[str, ...] = ()  # empty: every held-out problem
    seeds: int = 3
    lr_points: int = 3
    lrs: tuple[float, ...] = ()  # explicit grid; empty: lr_points around the optimizer's centre
    schedules: tuple[str, ...] = SCHEDULES
    weight_decays: tuple[float, ...] = DEFAULT_WEIGHT_DECAYS
    steps_scale: float = 1.0
    ablate: tuple[str, ...] = ()
    reference: str = "adamw"
    max_time: float = 0.0
    out: str | None = None
    publish: str | None = None
    cache_dir: str | None = None
    progress: bool = True
    threads: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> SuiteConfig:
        from tasks.heldout import PROBLEM_NAMES

        if not isinstance(self.optimizer, str) or not self.optimizer.strip():
            raise ValueError("--optimizer is required: adamw, muon, sgd, a zoo reference or a run")
        unknown = [p for p in self.problems if p not in PROBLEM_NAMES]
        if unknown:
            valid = ", ".join(PROBLEM_NAMES)
            raise ValueError(f"unknown held-out problem(s) {', '.join(unknown)}; valid: {valid}")
        self.problems = tuple(self.problems) or PROBLEM_NAMES
        for name, lo in (("seeds", 1), ("lr_points", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be an integer >= {lo}, got {value!r}"
                )
        for lr in self.lrs:
            RunConfig(lr)
        if len(set(self.lrs)) != len(self.lrs):
            raise ValueError(f"--lrs has duplicates: {list(self.lrs)}")
        bad = [s for s in self.schedules if s not in SCHEDULES]
        if bad or not self.schedules:
            raise ValueError(
                f"--schedules takes {', '.join(SCHEDULES)}, got {list(self.schedules)}"
            )
        if not self.weight_decays:
            raise ValueError("--weight-decays needs at least one value")
        for wd in self.weight_decays:
            RunConfig(1.0, weight_decay=wd)
        if not (math.isfinite(self.steps_scale) and 0 < self.steps_scale <= 100):
            raise ValueError(f"--steps-scale must be in (0, 100], got {self.steps_scale!r}")
        bad = [a for a in self.ablate if a not in ABLATION_AXES]
        if bad:
            raise ValueError(
                f"--ablate takes {', '.join(ABLATION_AXES)} (comma-separated), got {', '.join(bad)}"
            )
        if not (math.isfinite(self.max_time) and self.max_time >= 0):
            raise ValueError(
                f"--max-time must be >= 0 seconds (0: no limit), got {self.max_time!r}"
            )
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"--threads must be an integer >= 0, got {self.threads!r}")
        if self.publish is not None:
            import zoo

            zoo.validate_name(self.publish)
        self.lrs = tuple(sorted(float(x) for x in self.lrs))
        self.schedules = tuple(dict.fromkeys(self.schedules))
        self.weight_decays = tuple(sorted(dict.fromkeys(float(w) for w in self.weight_decays)))
        self.ablate = tuple(dict.fromkeys(self.ablate))
        return self

    def steps_for(self, base_steps: int) -> int:
        return max(2, round(base_steps * self.steps_scale))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("problems", "lrs", "schedules", "weight_decays", "ablate"):
            out[key] = list(out[key])
        return out
