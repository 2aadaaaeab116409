"""Truncated ES: antithetic ES over one truncation of a persistent unroll.

Reference implementation google/learned_optimization ``outer_trainers/truncated_es.py``; the
persistent-unroll setting and its bias are analysed in Vicol et al. 2021 (arXiv 2112.13835).

Both branches start every truncation from the same stored state, and the positive branch's
state is kept afterwards. ĝ = (1/N) Σ_i Δ_i ε_i / (2σ²) with Δ_i the difference of masked-mean
losses. It ignores how earlier truncations' θ shaped the current state, hence its bias.
"""

from __future__ import annotations

import torch

from ..shaping import Shaping, masked_mean, none
from ..unroll import UnrollOutput, VectorizedUnroll
from .base import Estimator, antithetic_sum


class TruncatedES(Estimator):
    def __init__(
        self,
        unroll: VectorizedUnroll,
        truncation_length: int,
        sigma: float = 0.01,
        shaping: Shaping = none,
    ) -> None:
        super().__init__(unroll, sigma, shaping)
        if truncation_length < 1:
            raise ValueError(f"truncation_length must be >= 1, got {truncation_length}")
        self.truncation_length = truncation_length

    def unroll_step(self, theta_lanes: torch.Tensor) -> UnrollOutput:
        out = self.unroll.run(theta_lanes, self.truncation_length)
        self.unroll.copy_positive_to_negative()
        return out

    def gradient(self, delta: torch.Tensor, out: UnrollOutput, eps: torch.Tensor) -> torch.Tensor:
        return antithetic_sum(masked_mean(delta, out.mask), eps, self.sigma)
