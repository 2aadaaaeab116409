"""Analytic quadratics with known optima, for estimator tests and smoke runs.

Design: docs/design/tasks.md §5.

Per lane a target ``c ~ N(0, I)`` for every parameter; loss ``Σ_k Σ (c_k − p_k)²``; init
``p ~ N(0, I)``; identity normaliser; optimum ``p = c`` with loss 0 (:meth:`QuadraticTask.optimum`).

Parameter shapes are configurable: the default is one vector ``{"p": (10,)}`` (only the learned
optimizer's non-factored path); ``shapes={"w": (4, 5), "b": (5,)}`` adds a matrix so estimator
tests also exercise the factored path.

There is no data. So that trainers need no special case, :meth:`QuadraticTask.batches` returns
an ordinary :class:`BatchStream` over a single dummy example: every batch is
``{"x": zeros [n, 1, 1]}``, which the loss ignores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from tasks.base import Batch, LaneCfg, Params, StaticCfg, Task, TaskFamily
from tasks.streams import BatchStream

__all__ = ["QuadraticConfig", "QuadraticFamily", "QuadraticTask"]

Shapes = tuple[tuple[str, tuple[int, ...]], ...]


def _normalise_shapes(shapes: Mapping[str, Sequence[int]] | Sequence) -> Shapes:
    items = shapes.items() if isinstance(shapes, Mapping) else shapes
    out = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"shapes entries must be (name, dims) pairs, got {item!r}")
        name, dims = item
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        if (
            not isinstance(name, str)
            or not name
            or not all(isinstance(d, int) and d >= 1 for d in dims)
        ):
            raise ValueError(f"bad parameter shape {name!r}: {dims!r} (need a name, dims >= 1)")
        out.append((name, dims))
    if not out or len({n for n, _ in out}) != len(out):
        raise ValueError(f"shapes must name one or more distinct parameters, got {shapes!r}")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class QuadraticConfig(StaticCfg):
    """Parameter names and shapes, as ``((name, dims), ...)`` so the config stays hashable."""

    kind = "quadratic"
    shapes: Shapes = (("p", (10,)),)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", _normalise_shapes(self.shapes))


class QuadraticTask(Task):
    """``Σ (c − p)²`` with a per-lane target ``c`` (lane keys ``target.<name>``)."""

    num_classes = None

    def __init__(self, static: QuadraticConfig) -> None:
        self.static = static

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.static.shapes)

    def init(self, gen: torch.Generator, lane_cfg: Mapping[str, Tensor]) -> Params:
        return {name: torch.randn(dims, generator=gen) for name, dims in self.static.shapes}

    def loss(self, params: Mapping[str, Tensor], batch: Batch, lane_cfg: LaneCfg) -> Tensor:
        terms = [
            (lane_cfg[f"target.{name}"] - params[name]).square().sum()
            for name, _ in self.static.shapes
        ]
        return torch.stack(terms).sum()

    def normalizer(self, loss: Tensor) -> Tensor:
        return loss

    def metrics(
        self, params: Mapping[str, Tensor], batch: Batch, lane_cfg: LaneCfg
    ) -> dict[str, Tensor]:
        return {"loss": self.loss(params, batch, lane_cfg)}

    def optimum(self, lane_cfg: Mapping[str, Tensor]) -> Params:
        """The minimiser ``p = c`` (loss exactly 0); works on single or stacked lane configs."""
        return {name: lane_cfg[f"target.{name}"].clone() for name, _ in self.static.shapes}

    def batches(
        self,
        split: str,
        n_streams: int,
        gen_or_seed: torch.Generator | int,
        *,
        device: torch.device | str | None = None,
    ) -> BatchStream:
        """A stream of dummy batches ``{"x": zeros [n, 1, 1]}`` (the loss reads no data)."""
        self._check_split(split)
        dummy = {"x": torch.zeros(1, 1, device=device)}
        return BatchStream(dummy, n_streams, 1, gen_or_seed, name=split)


@dataclasses.dataclass(frozen=True)
class QuadraticFamily(TaskFamily):
    """Quadratics ``Σ (c − p)²``: fixed shapes (static), a fresh target per lane.

    ``dim`` sets the default single vector ``{"p": (dim,)}``; ``shapes`` (a mapping such as
    ``{"w": (4, 5), "b": (5,)}``) replaces it. Static sampling consumes no randomness: the
    shapes are the whole static config.
    """

    name = "quadratic"
    dim: int = 10
    shapes: Mapping[str, Sequence[int]] | Shapes | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim must be a positive int, got {self.dim!r}")
        if self.shapes is not None and self.dim != 10:
            raise ValueError("give either dim or shapes, not both")
        shapes = self.shapes if self.shapes is not None else {"p": (self.dim,)}
        object.__setattr__(self, "shapes", _normalise_shapes(shapes))

    def sample_static(self, gen: torch.Generator) -> QuadraticConfig:
        return QuadraticConfig(shapes=self.shapes)  # type: ignore[arg-type]

    def sample_lane(self, gen: torch.Generator, static: StaticCfg) -> LaneCfg:
        if not isinstance(static, QuadraticConfig):
            raise TypeError(f"expected a QuadraticConfig, got {type(static).__name__}")
        return {f"target.{name}": torch.randn(dims, generator=gen) for name, dims in static.shapes}

    def make_task(self, static: StaticCfg) -> QuadraticTask:
        if not isinstance(static, QuadraticConfig):
            raise TypeError(f"expected a QuadraticConfig, got {type(static).__name__}")
        return QuadraticTask(static)
