"""Bookkeeping shared by the antithetic gradient estimators (docs/design/meta_training.md §3-§5).

The base class draws the perturbations from a seed, builds the ``[2N, P]`` lane θs, applies the
loss shaping, makes the result NaN-safe and reports metrics. A subclass supplies only its math:
how to unroll for one outer step (:meth:`Estimator.unroll_step`) and how to turn the per-slot
loss differences into a gradient (:meth:`Estimator.gradient`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from ..shaping import Shaping, masked_mean, none
from ..unroll import UnrollOutput, VectorizedUnroll

NAN_LOSS_VALUE = (
    20.0  # reported instead of a non-finite mean loss (reference: clip_nan_loss_to_value)
)


def perturbations(seed: int, num_pairs: int, num_params: int, sigma: float) -> torch.Tensor:
    """ε = σ·z, z ~ N(0, I), reproducible from an integer seed (workers get seeds, not noise)."""
    gen = torch.Generator().manual_seed(int(seed))
    return sigma * torch.randn(num_pairs, num_params, generator=gen)


def antithetic_sum(weights: torch.Tensor, directions: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(1/N) Σ_i w_i d_i / (2σ²)``: the antithetic estimator's scale with ε = σz (§4)."""
    return (weights.unsqueeze(1) * directions).mean(0) / (2 * sigma**2)


class Estimator(ABC):
    """An antithetic ES-family estimator of ∇θ of the mean normalised inner loss."""

    def __init__(
        self, unroll: VectorizedUnroll, sigma: float = 0.01, shaping: Shaping = none
    ) -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.unroll = unroll
        self.sigma = float(sigma)
        self.shaping = shaping

    @property
    def num_pairs(self) -> int:
        return self.unroll.num_pairs

    @abstractmethod
    def unroll_step(self, theta_lanes: torch.Tensor) -> UnrollOutput:
        """Advance the unroll for one outer step with lane θs ``[2N, P]``."""

    @abstractmethod
    def gradient(self, delta: torch.Tensor, out: UnrollOutput, eps: torch.Tensor) -> torch.Tensor:
        """ĝ ``[P]`` from shaped per-slot differences ``delta [T, N]`` and ε ``[N, P]``."""

    def estimate(self, theta: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict[str, float]]:
        """One gradient estimate at θ ``[P]``; the perturbations are drawn from ``seed``."""
        eps = perturbations(seed, self.num_pairs, theta.numel(), self.sigma)
        out = self.unroll_step(torch.cat([theta + eps, theta - eps]))
        n = self.num_pairs
        loss_pos, loss_neg = out.losses[:, :n], out.losses[:, n:]
        delta = self.shaping(loss_pos - loss_neg, out.mask, loss_pos, loss_neg)
        grad = self.gradient(delta, out, eps)
        finite = torch.isfinite(grad)
        nonfinite = int((~finite).sum())
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        pair_loss = (masked_mean(loss_pos, out.mask) + masked_mean(loss_neg, out.mask)) / 2
        has_data = out.mask.sum(0) > 0
        meta_loss = float(pair_loss[has_data].mean()) if has_data.any() else float("nan")
        if meta_loss != meta_loss or abs(meta_loss) == float("inf"):
            meta_loss = NAN_LOSS_VALUE
        metrics = {
            "meta_loss": meta_loss,
            "inner_loss": out.raw_loss_sum / max(out.raw_loss_count, 1),
            "inner_steps": float(out.inner_steps),
            "nonfinite_grad": float(nonfinite),
            "resets": float((1 - out.mask).sum()),
        }
        return grad, metrics

    # -- checkpointing: the unroll plus whatever a subclass keeps ---------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`extra_state` returned; stateless estimators keep nothing."""

    def state_dict(self) -> dict[str, Any]:
        return {"unroll": self.unroll.state_dict(), "extra": self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unroll.load_state_dict(state["unroll"])
        self.load_extra_state(state["extra"])
