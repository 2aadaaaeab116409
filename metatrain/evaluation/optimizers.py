"""Batched functional optimizers: many optimizer instances × seeds advance in one call.

The evaluation trains every optimizer (the learned one and Adam at each grid LR) on every seed of
a task. Looping ``torch.optim`` over 8 optimizers × 3 seeds would pay Python and dispatch
overhead 24 times per step; instead parameters are stacked ``[n, S, ...]`` (``n`` optimizer
instances, ``S`` seeds) and each optimizer updates its whole block at once. :class:`AdamGrid`
reproduces ``torch.optim.Adam`` (tested against it); :class:`LearnedOptimizer` runs the
architecture's functional ``update`` under ``torch.func.vmap`` so per-tensor statistics (e.g.
small_fc_lopt's feature normalisation) stay per seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

import lopt
from lopt.tree import tree_map

from .config import ADAM_BETAS, ADAM_EPS

__all__ = ["AdamGrid", "BatchedOptimizer", "LearnedOptimizer"]

Params = dict[str, Tensor]


class BatchedOptimizer(Protocol):
    """``size`` optimizer instances over params stacked ``[size, S, ...]``."""

    name: str
    size: int

    def labels(self) -> list[str]:
        """One label per instance (e.g. ``adam lr=0.001``)."""
        ...

    def init(self, params: Mapping[str, Tensor]) -> Any: ...

    def update(
        self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: Any
    ) -> tuple[Params, Any]: ...


class AdamGrid:
    """``torch.optim.Adam`` (no weight decay, no amsgrad) at several learning rates at once.

    The math is torch's single-tensor Adam: ``m ← lerp(m, g, 1−β1)``, ``v ← β2·v + (1−β2)·g²``,
    ``p ← p − (lr / (1−β1ᵗ)) · m / (√v / √(1−β2ᵗ) + ε)``.
    """

    name = "adam"

    def __init__(
        self,
        lrs: Sequence[float],
        betas: tuple[float, float] = ADAM_BETAS,
        eps: float = ADAM_EPS,
    ) -> None:
        self.lrs = tuple(float(lr) for lr in lrs)
        self.size = len(self.lrs)
        self._lrs = torch.tensor(self.lrs, dtype=torch.float64)
        self.betas = betas
        self.eps = eps

    def labels(self) -> list[str]:
        return [f"adam lr={lr:g}" for lr in self.lrs]

    def init(self, params: Mapping[str, Tensor]) -> dict[str, Any]:
        return {
            "t": 0,
            "m": {k: torch.zeros_like(v) for k, v in params.items()},
            "v": {k: torch.zeros_like(v) for k, v in params.items()},
        }

    def update(
        self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: dict[str, Any]
    ) -> tuple[Params, dict[str, Any]]:
        b1, b2 = self.betas
        t = state["t"] + 1
        bc1 = 1 - b1**t
        bc2_sqrt = math.sqrt(1 - b2**t)
        new_params, new_m, new_v = {}, {}, {}
        for name, p in params.items():
            g = grads[name]
            m = torch.lerp(state["m"][name], g, 1 - b1)
            v = state["v"][name] * b2 + (1 - b2) * (g * g)
            step_size = (self._lrs / bc1).to(p.dtype).view(-1, *[1] * (p.dim() - 1))
            denom = v.sqrt() / bc2_sqrt + self.eps
            new_params[name] = p - step_size * (m / denom)
            new_m[name], new_v[name] = m, v
        return new_params, {"t": t, "m": new_m, "v": new_v}


class LearnedOptimizer:
    """A learned optimizer with fixed meta-weights θ (one instance), via its architecture's
    functional ``update`` (any registered architecture).

    ``lr`` multiplies the learned step exactly as the ``torch.optim`` shell's ``lr=`` does.
    ``num_steps`` (the evaluation's planned steps) reaches architectures that use it.
    """

    name = "learned"
    size = 1

    def __init__(
        self,
        theta: Mapping[str, Tensor],
        config: Any,
        lr: float = 1.0,
        label: str = "",
        num_steps: int | None = None,
    ) -> None:
        self.theta = dict(theta)
        self.config = config
        self.arch = lopt.architecture_of(config)
        self.num_steps = num_steps
        self.lr = float(lr)
        self.label = label or "learned"
        self._step = torch.func.vmap(self._one, randomness="error")

    def labels(self) -> list[str]:
        return [self.label]

    def _one(self, params: Params, grads: Params, state: dict) -> tuple[Params, dict]:
        return self.arch.update(
            self.theta, state, params, grads, self.config, lr=self.lr, num_steps=self.num_steps
        )

    def init(self, params: Mapping[str, Tensor]) -> dict:
        flat = {k: v.flatten(0, 1) for k, v in params.items()}  # [1·S, ...]
        one = self.arch.init_state({k: v[0] for k, v in flat.items()}, self.config)
        n = next(iter(flat.values())).shape[0]
        return tree_map(lambda x: x.unsqueeze(0).expand(n, *x.shape).clone(), one)

    def update(
        self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: dict
    ) -> tuple[Params, dict]:
        lead = next(iter(params.values())).shape[:2]
        flat_p = {k: v.flatten(0, 1) for k, v in params.items()}
        flat_g = {k: v.flatten(0, 1) for k, v in grads.items()}
        new_p, new_state = self._step(flat_p, flat_g, state)
        return {k: v.view(*lead, *v.shape[1:]) for k, v in new_p.items()}, new_state
