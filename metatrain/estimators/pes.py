"""Persistent Evolution Strategies (PES).

Vicol, Metz, Sohl-Dickstein, "Unbiased Gradient Estimation in Unrolled Computation Graphs with
Persistent Evolution Strategies", ICML 2021 (arXiv 2112.13835); reference implementation
google/learned_optimization ``outer_trainers/truncated_pes.py``.

Each lane pair keeps its own ± unroll and an accumulator A_i of every perturbation that shaped its
current trajectory. A slot's loss difference is credited to Â_i = A_i + ε_i while the trajectory
that began before this truncation is running, and to ε_i alone after the lane resets:

    ĝ = (1/N) Σ_i (a_i Â_i + b_i ε_i) / (2σ²),   a_i, b_i = old/new-trajectory masked means of Δ.

``reset_rule="exact"`` (default) keys the split on the reset slot, so the last training slot of
the old trajectory is still credited to Â_i and any number of resets is handled
(docs/design/meta_training.md §4.3); ``"reference"`` keys it on the ``done`` slot like
learned_optimization.
"""

from __future__ import annotations

from typing import Any

import torch

from ..shaping import Shaping, none
from ..unroll import UnrollOutput, VectorizedUnroll
from .base import Estimator, antithetic_sum


class PES(Estimator):
    def __init__(
        self,
        unroll: VectorizedUnroll,
        truncation_length: int,
        sigma: float = 0.01,
        shaping: Shaping = none,
        reset_rule: str = "exact",
    ) -> None:
        super().__init__(unroll, sigma, shaping)
        if truncation_length < 1:
            raise ValueError(f"truncation_length must be >= 1, got {truncation_length}")
        if reset_rule not in ("exact", "reference"):
            raise ValueError(f"reset_rule must be 'exact' or 'reference', got {reset_rule!r}")
        self.truncation_length = truncation_length
        self.reset_rule = reset_rule
        self.accumulator: torch.Tensor | None = None  # [N, P], lazily sized from θ

    def unroll_step(self, theta_lanes: torch.Tensor) -> UnrollOutput:
        if self.accumulator is None:
            self.accumulator = torch.zeros(self.num_pairs, theta_lanes.shape[1])
        return self.unroll.run(theta_lanes, self.truncation_length)

    def gradient(self, delta: torch.Tensor, out: UnrollOutput, eps: torch.Tensor) -> torch.Tensor:
        mask = out.mask
        events = (1 - mask) if self.reset_rule == "exact" else out.done
        new_traj = (events.cumsum(0) > 0).float()  # F_{t,i}: a trajectory ended by slot t
        count = mask.sum(0).clamp_min(1)  # D_i = 0 only if every slot reset: contributes 0
        old_w = (delta * mask * (1 - new_traj)).sum(0) / count
        new_w = (delta * mask * new_traj).sum(0) / count
        acc_hat = self.accumulator + eps
        grad = antithetic_sum(old_w, acc_hat, self.sigma) + antithetic_sum(new_w, eps, self.sigma)
        if self.reset_rule == "exact":
            any_reset = events.sum(0) > 0
            last_slot_reset = events[-1] > 0  # new trajectory has not trained yet: nothing to carry
            keep = torch.where(any_reset.unsqueeze(1), eps, acc_hat)
            self.accumulator = torch.where(
                last_slot_reset.unsqueeze(1), torch.zeros_like(eps), keep
            )
        else:
            self.accumulator = torch.where(new_traj[-1].bool().unsqueeze(1), eps, acc_hat)
        return grad

    def extra_state(self) -> dict[str, Any]:
        return {"accumulator": self.accumulator}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.accumulator = state["accumulator"]
