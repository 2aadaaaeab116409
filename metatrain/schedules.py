"""Truncation schedules: how many inner steps a trajectory lasts.

Design: docs/design/meta_training.md §2.4.

A schedule is a small frozen dataclass with one method, ``sample(n, generator) -> LongTensor[n]``,
called per lane pair at init and whenever a trajectory finishes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NEVER = 2**62  # "no end": is_done never becomes True (full ES lanes)


@dataclass(frozen=True)
class Constant:
    """Every trajectory lasts ``length`` inner steps."""

    length: int

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"Constant schedule needs length >= 1, got {self.length}")

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.full((n,), self.length, dtype=torch.long)


@dataclass(frozen=True)
class LogUniform:
    """``floor(exp(U(ln low, ln high)))``: lengths in ``[low, high)``, log-uniformly spread."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low < self.high:
            raise ValueError(
                f"LogUniform schedule needs 1 <= low < high, got low={self.low}, high={self.high}"
            )

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        log_len = math.log(self.low) + u * (math.log(self.high) - math.log(self.low))
        return torch.exp(log_len).floor().long().clamp(self.low, self.high - 1)


@dataclass(frozen=True)
class NeverEnding:
    """Trajectories never end on their own (required by full ES, which restarts them itself)."""

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.full((n,), NEVER, dtype=torch.long)


Schedule = Constant | LogUniform | NeverEnding


def make_schedule(kind: str, length: int, min_length: int | None = None) -> Schedule:
    """Build a schedule from CLI-style settings: ``constant`` uses ``length``; ``loguniform`` draws
    in ``[min_length, length)``."""
    if kind == "constant":
        return Constant(length)
    if kind == "loguniform":
        return LogUniform(min_length if min_length is not None else max(1, length // 10), length)
    if kind == "never":
        return NeverEnding()
    raise ValueError(f"unknown truncation schedule {kind!r}; valid: constant, loguniform, never")
