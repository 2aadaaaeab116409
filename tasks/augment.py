"""Task augmentation by weight rescaling (the Celo2 recipe's "reparam, global" augmentation).

Every task sample (a lane's init and every reset) draws one global scale
``s = exp(U(ln lo, ln hi))``. The optimizer sees parameters stored as ``init / s`` while the
loss evaluates the model at ``params · s``, for every parameter, biases included. The model
function is unchanged, but the parameter scale the optimizer sees and its gradients (``s`` times
larger) change by up to six orders of magnitude, so a learned optimizer cannot rely on the
particular scale of the meta-training tasks. The normaliser is untouched.

``s`` is part of the lane config (``"reparam_scale"``, a 0-d float32 tensor), drawn after the
wrapped family's own lane choices from the same generator, so the + and − lanes of a pair share
it and a checkpointed lane keeps it. Use it as a task option:
``tasks.get_family("mlp_mnist", reparam_scale=(1e-3, 1e3))`` (CLI:
``--task-option reparam_scale=[0.001,1000]``). Design notes: docs/design/mixture.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from tasks.base import Batch, LaneCfg, Params, StaticCfg, Task, TaskFamily, uniform
from tasks.streams import BatchStream

__all__ = ["REPARAM_KEY", "ReparamFamily", "ReparamTask", "check_scale_range"]

REPARAM_KEY = "reparam_scale"
"""The lane-config key (and the task option) of the augmentation."""


def check_scale_range(value: Any) -> tuple[float, float]:
    """``(lo, hi)`` with ``0 < lo <= hi``, finite; raises ``ValueError`` naming the option."""
    pair = (value, value) if isinstance(value, (int, float)) else value
    try:
        lo, hi = (float(v) for v in pair)
    except (TypeError, ValueError):
        raise ValueError(
            f"{REPARAM_KEY} must be a (lo, hi) range of positive numbers, e.g. [0.001, 1000]; "
            f"got {value!r}"
        ) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise ValueError(
            f"{REPARAM_KEY} must satisfy 0 < lo <= hi (finite), e.g. [0.001, 1000]; got {value!r}"
        )
    return lo, hi


class ReparamTask(Task):
    """``base`` with parameters stored as ``θ / s`` and evaluated at ``θ · s`` (per lane ``s``)."""

    def __init__(self, base: Task) -> None:
        self.base = base
        self.static = base.static
        self.num_classes = base.num_classes
        self.splits = base.splits

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.base.param_shapes()

    @staticmethod
    def _scaled(params: Mapping[str, Tensor], lane_cfg: Mapping[str, Tensor]) -> Params:
        s = lane_cfg[REPARAM_KEY]
        return {k: v * s for k, v in params.items()}

    def init(self, gen: torch.Generator, lane_cfg: Mapping[str, Tensor]) -> Params:
        s = lane_cfg[REPARAM_KEY]
        return {k: v / s for k, v in self.base.init(gen, lane_cfg).items()}

    def loss(self, params: Mapping[str, Tensor], batch: Batch, lane_cfg: LaneCfg) -> Tensor:
        return self.base.loss(self._scaled(params, lane_cfg), batch, lane_cfg)

    def lanes_grad_and_value(
        self, params: Mapping[str, Tensor], batch: Batch, lane_cfg: LaneCfg
    ) -> tuple[Params, Tensor]:
        """The base task's batched gradients at ``params · s``, times ``s`` (the chain rule)."""
        s = lane_cfg[REPARAM_KEY]

        def per_lane(x: Tensor) -> Tensor:
            return s.view(-1, *[1] * (x.dim() - 1))

        scaled = {k: v * per_lane(v) for k, v in params.items()}
        grads, loss = self.base.lanes_grad_and_value(scaled, batch, lane_cfg)
        return {k: g * per_lane(g) for k, g in grads.items()}, loss

    def normalizer(self, loss: Tensor) -> Tensor:
        return self.base.normalizer(loss)

    def metrics(
        self, params: Mapping[str, Tensor], batch: Batch, lane_cfg: LaneCfg
    ) -> dict[str, Tensor]:
        return self.base.metrics(self._scaled(params, lane_cfg), batch, lane_cfg)

    def batches(
        self,
        split: str,
        n_streams: int,
        gen_or_seed: torch.Generator | int,
        *,
        device: torch.device | str | None = None,
    ) -> BatchStream:
        return self.base.batches(split, n_streams, gen_or_seed, device=device)


class ReparamFamily(TaskFamily):
    """``base`` with the weight-rescaling augmentation; static configs are ``base``'s own."""

    def __init__(self, base: TaskFamily, scale_range: Any = (1e-3, 1e3)) -> None:
        if isinstance(base, ReparamFamily):
            raise ValueError(f"{base.name} is already augmented with {REPARAM_KEY}")
        self.base = base
        self.scale_range = check_scale_range(scale_range)
        self.name = base.name  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"ReparamFamily({self.base!r}, scale_range={self.scale_range})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ReparamFamily)
            and other.base == self.base
            and other.scale_range == self.scale_range
        )

    def __hash__(self) -> int:
        return hash((self.base, self.scale_range))

    def sample_static(self, gen: torch.Generator) -> StaticCfg:
        return self.base.sample_static(gen)

    def sample_lane(self, gen: torch.Generator, static: StaticCfg) -> LaneCfg:
        lane = dict(self.base.sample_lane(gen, static))
        lo, hi = self.scale_range
        scale = math.exp(uniform(gen, math.log(lo), math.log(hi)))
        lane[REPARAM_KEY] = torch.tensor(scale, dtype=torch.float32)
        return lane

    def make_task(self, static: StaticCfg) -> ReparamTask:
        return ReparamTask(self.base.make_task(static))
