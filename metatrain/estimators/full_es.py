"""Full (antithetic) ES over whole inner trainings.

Salimans et al., "Evolution Strategies as a Scalable Alternative to Reinforcement Learning"
(arXiv 1703.03864) for antithetic ES; reference implementation google/learned_optimization
``outer_trainers/full_es.py``.

Every outer step starts fresh tasks on all lanes (the ± copies of a pair share every draw), trains
them for one length L drawn from the estimator's own schedule (rounded down to a multiple of 10,
at least 10) and uses F± = the mean (``"avg"``) or last (``"last"``) normalised loss:
ĝ = (1/N) Σ_i (F⁺_i − F⁻_i) ε_i / (2σ²). No state survives between outer steps.
"""

from __future__ import annotations

from typing import Any

import torch

from ..schedules import Schedule
from ..shaping import Shaping, none
from ..unroll import UnrollOutput, VectorizedUnroll
from .base import Estimator, antithetic_sum

CHUNK = 10  # lengths are multiples of this (the reference's compile chunk)


class FullES(Estimator):
    def __init__(
        self,
        unroll: VectorizedUnroll,
        length_schedule: Schedule,
        sigma: float = 0.01,
        shaping: Shaping = none,
        reduce: str = "avg",
        seed: int = 0,
    ) -> None:
        super().__init__(unroll, sigma, shaping)
        if reduce not in ("avg", "last"):
            raise ValueError(f"full ES reduce must be 'avg' or 'last', got {reduce!r}")
        self.length_schedule = length_schedule
        self.reduce = reduce
        self.generator = torch.Generator().manual_seed(seed)

    def unroll_step(self, theta_lanes: torch.Tensor) -> UnrollOutput:
        length = int(self.length_schedule.sample(1, self.generator)[0])
        length = max(CHUNK, length // CHUNK * CHUNK)
        self.unroll.restart()
        return self.unroll.run(theta_lanes, length)

    def gradient(self, delta: torch.Tensor, out: UnrollOutput, eps: torch.Tensor) -> torch.Tensor:
        per_pair = delta.mean(0) if self.reduce == "avg" else delta[-1]
        per_pair = torch.nan_to_num(per_pair, nan=0.0, posinf=0.0, neginf=0.0)
        return antithetic_sum(per_pair, eps, self.sigma)

    def extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
