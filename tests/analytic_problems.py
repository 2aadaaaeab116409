"""Analytic inner problems that plug into metatrain.unroll.VectorizedUnroll for estimator tests."""

from __future__ import annotations

from collections.abc import Callable

import torch


class ObjectiveProblem:
    """A stateless "inner problem" whose slots report F(θ_lane): ES as a function of θ alone."""

    def __init__(self, objective: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.objective = objective

    def fresh(self, n: int, generator: torch.Generator) -> dict:
        return {"unused": torch.zeros(n, 1)}

    def next_batch(self) -> dict:
        return {}

    def step(self, theta_lanes, state, batch):
        return state, self.objective(theta_lanes)

    def normalizer(self, loss):
        return loss

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DriftProblem:
    """Lane state ``s``; each update is ``s ← s + θ``; the recorded loss is ½‖s‖² before it.

    ``t`` counts updates since the lane's last reset (so the tests can read the timeline), and
    ``nan_lanes`` makes chosen lanes report NaN losses (robustness tests).
    """

    def __init__(self, s0: torch.Tensor, nan_lanes: tuple[int, ...] = ()) -> None:
        self.s0 = s0
        self.nan_lanes = nan_lanes

    def fresh(self, n: int, generator: torch.Generator) -> dict:
        return {"s": self.s0.expand(n, -1).clone(), "t": torch.zeros(n)}

    def next_batch(self) -> dict:
        return {}

    def step(self, theta_lanes, state, batch):
        s = state["s"]
        loss = 0.5 * s.square().sum(1)
        if self.nan_lanes:
            loss = loss.clone()
            loss[list(self.nan_lanes)] = float("nan")
        return {"s": s + theta_lanes, "t": state["t"] + 1}, loss

    def normalizer(self, loss):
        # like the classification normaliser: non-finite losses map to the clip maximum
        return torch.nan_to_num(loss, nan=50.0, posinf=50.0, neginf=50.0).clamp(0, 50.0)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
