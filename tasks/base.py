"""Task and task-family interfaces.

Design: docs/design/tasks.md §1, docs/design/meta_training.md §2 and §11.

Sampling happens at two levels, which is what makes a vectorised unroll possible:

* **static config** (:class:`StaticCfg`): everything that changes a tensor shape — dataset, image
  size, depth, widths, batch size. All lanes of one ``torch.func.vmap`` share it, so it is drawn
  once per gradient estimator (and redrawn only when the estimator is resampled).
* **lane config** (``dict[str, Tensor]``): shape-preserving choices — activation index, init
  scale, quadratic target. These are tensors so that ``torch.stack`` over lanes gives a batched
  config that ``vmap`` can slice; tasks select on them branch-free (``torch.where``), never with
  Python ``if``.

A :class:`Task` is pure: ``loss(params, batch, lane_cfg)`` has no hidden state, so
``torch.func.grad`` and ``vmap(in_dims=0)`` apply directly. Randomness lives outside the loss,
in explicit ``torch.Generator`` arguments, so the same seed always gives the same configs, inits
and batches.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.streams import BatchStream

__all__ = [
    "ACTIVATIONS",
    "LaneCfg",
    "Params",
    "StaticCfg",
    "Task",
    "TaskFamily",
    "classification_normalizer",
    "log_int",
    "select_activation",
    "stack_lanes",
    "trunc_normal",
    "uniform",
]

Params = dict[str, Tensor]
LaneCfg = dict[str, Tensor]
Batch = dict[str, Tensor]

ACTIVATIONS: Mapping[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "relu6": F.relu6,
    "selu": F.selu,
    "sin": torch.sin,
    "cos": torch.cos,
    # The reference's leaky_relu uses slope -0.5 (design §4), not PyTorch's default 0.01.
    "leaky_relu": lambda x: F.leaky_relu(x, -0.5),
}
"""Activations a lane may select, by name. Families list the subset they sample from."""


def select_activation(h: Tensor, index: Tensor, names: Sequence[str]) -> Tensor:
    """Apply ``names[index]`` to ``h`` without Python branching on ``index``.

    Under ``vmap`` ``index`` is a per-lane 0-d tensor, so every candidate is computed and the
    lane's choice is picked with ``torch.where``. ``where`` (unlike a one-hot weighted sum) does
    not let an inf in an unselected branch turn into NaN. With a single candidate this is just
    that activation, at no extra cost.
    """
    out = ACTIVATIONS[names[0]](h)
    for k in range(1, len(names)):
        out = torch.where(index == k, ACTIVATIONS[names[k]](h), out)
    return out


def classification_normalizer(loss: Tensor, num_classes: int) -> Tensor:
    """``clip(loss, 0, 1.5·ln C)``, NaN and ±inf mapped to the maximum (tasks.md §3, §7)."""
    top = 1.5 * math.log(num_classes)
    return torch.nan_to_num(loss, nan=top, posinf=top, neginf=top).clamp(0.0, top)


def uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    """One draw from U(lo, hi) (float64, so narrow ranges are not quantised)."""
    u = torch.rand((), generator=gen, dtype=torch.float64).item()
    return lo + (hi - lo) * u


def log_int(gen: torch.Generator, lo: int, hi: int) -> int:
    """The reference's ``log_int(a, b) = int(exp(U(ln a, ln b)))``, which lies in [a, b−1].

    ``lo == hi`` returns ``lo`` (a fixed value); the clamp guards against ``exp(ln a)`` rounding
    to just below ``a``.
    """
    if lo == hi:
        return lo
    value = int(math.exp(uniform(gen, math.log(lo), math.log(hi))))
    return min(max(value, lo), hi - 1)


def randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in the inclusive range [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=gen).item())


def trunc_normal(shape: Sequence[int], std: float, gen: torch.Generator) -> Tensor:
    """Haiku's dense default: normal(0, std) truncated at ±2 std, no variance correction."""
    w = torch.empty(tuple(shape))
    return torch.nn.init.trunc_normal_(w, std=std, a=-2.0 * std, b=2.0 * std, generator=gen)


def stack_lanes(trees: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Stack per-lane dicts (lane configs or params) into one dict of ``[n, ...]`` tensors."""
    if not trees:
        raise ValueError("stack_lanes needs at least one lane")
    keys = list(trees[0])
    for i, tree in enumerate(trees):
        if list(tree) != keys:
            raise ValueError(f"lane {i} has keys {list(tree)}, lane 0 has {keys}")
    return {k: torch.stack([tree[k] for tree in trees]) for k in keys}


def unstack_lane(tree: Mapping[str, Tensor], i: int) -> dict[str, Tensor]:
    """Lane ``i`` of a stacked dict (the inverse of :func:`stack_lanes` for one lane)."""
    return {k: v[i] for k, v in tree.items()}


def _tuplify(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_tuplify(v) for v in value)
    return value


def _listify(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_listify(v) for v in value]
    return value


S = TypeVar("S", bound="StaticCfg")


@dataclasses.dataclass(frozen=True)
class StaticCfg:
    """Base of the frozen, JSON-serialisable static (shape) configs.

    Being frozen makes configs hashable, so a trainer can bucket or cache by config. Every
    sequence field is a tuple; :meth:`to_dict` turns them into lists (JSON) and
    :meth:`from_dict` turns them back. ``kind`` names the config class in the dict so that
    :func:`tasks.static_from_dict` can rebuild any config from a checkpoint.
    """

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            out[f.name] = _listify(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any]) -> S:
        data = dict(data)
        kind = data.pop("kind", cls.kind)
        if kind != cls.kind:
            raise ValueError(f"{cls.__name__}.from_dict: kind is {kind!r}, expected {cls.kind!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__}.from_dict: unknown keys {unknown}; valid: {sorted(names)}"
            )
        return cls(**{k: _tuplify(v) for k, v in data.items()})


class Task(ABC):
    """One inner problem: a model, its init, a pure loss and batch streams per split.

    Attributes: ``static`` (the config it was built from), ``num_classes`` (``None`` when the
    task has no classes). Params are ``dict[str, Tensor]`` in PyTorch layout (Linear
    ``(out, in)``, conv ``(out, in, kh, kw)``), which the learned optimizer's factored-dims tie
    rule depends on.
    """

    static: StaticCfg
    num_classes: int | None = None
    splits: ClassVar[tuple[str, ...]] = ("train", "inner_valid", "outer_valid", "test")

    @abstractmethod
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name → shape of every parameter, in init order."""

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes().values())

    @abstractmethod
    def init(self, gen: torch.Generator, lane_cfg: Mapping[str, Tensor]) -> Params:
        """Fresh parameters for one lane. Called outside ``vmap``; consumes ``gen``."""

    @abstractmethod
    def loss(self, params: Mapping[str, Tensor], batch: Batch, lane_cfg: LaneCfg) -> Tensor:
        """Scalar training loss; pure, so usable with ``torch.func.grad`` and ``vmap``."""

    @abstractmethod
    def normalizer(self, loss: Tensor) -> Tensor:
        """Elementwise map of raw losses to the meta-loss scale (meta_training.md §2.5)."""

    @abstractmethod
    def metrics(
        self, params: Mapping[str, Tensor], batch: Batch, lane_cfg: LaneCfg
    ) -> dict[str, Tensor]:
        """Evaluation metrics; always includes ``loss`` (and ``accuracy`` for classifiers)."""

    @abstractmethod
    def batches(
        self,
        split: str,
        n_streams: int,
        gen_or_seed: torch.Generator | int,
        *,
        device: torch.device | str | None = None,
    ) -> BatchStream:
        """``n_streams`` independent endless streams of ``split``, drawn as ``[n, B, ...]``."""

    def lanes_grad_and_value(
        self, params: Mapping[str, Tensor], batch: Batch, lane_cfg: LaneCfg
    ) -> tuple[Params, Tensor]:
        """Gradients and losses of many lanes at once: ``(grads [L, ...], loss [L])``.

        ``params``, ``batch`` and ``lane_cfg`` carry a leading lane axis L. The default is
        ``vmap(grad_and_value(loss))``, the reference; families override it with a batched
        forward/backward (bmm, grouped convolution) that is tested equal to it. Runs under
        ``torch.no_grad()`` too; returns no autograd graph.
        """
        fn = torch.func.vmap(torch.func.grad_and_value(self.loss), randomness="error")
        return fn(params, batch, lane_cfg)

    def init_lanes(self, gen: torch.Generator, lane_cfgs: Mapping[str, Tensor]) -> Params:
        """Init every lane of a stacked lane config in order; returns stacked params."""
        n = len(next(iter(lane_cfgs.values()))) if lane_cfgs else 0
        if n == 0:
            raise ValueError("init_lanes needs a stacked lane config with at least one lane")
        return stack_lanes([self.init(gen, unstack_lane(lane_cfgs, i)) for i in range(n)])

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(self.splits)}")


class TaskFamily(ABC):
    """A distribution over tasks: ``sample_static`` → ``make_task``; ``sample_lane`` per lane.

    Concrete families are frozen dataclasses whose fields are the typed, overridable ranges.
    """

    name: ClassVar[str]

    @abstractmethod
    def sample_static(self, gen: torch.Generator) -> StaticCfg:
        """Draw the shape-determining config shared by all lanes of one estimator."""

    @abstractmethod
    def sample_lane(self, gen: torch.Generator, static: StaticCfg) -> LaneCfg:
        """Draw one lane's shape-preserving choices as tensors (stackable across lanes)."""

    @abstractmethod
    def make_task(self, static: StaticCfg) -> Task:
        """Build the task for a static config (cheap: data is loaded on first ``batches``)."""

    def sample_lanes(self, gen: torch.Generator, static: StaticCfg, n: int) -> LaneCfg:
        """``n`` lane configs drawn in order and stacked to ``[n, ...]``."""
        return stack_lanes([self.sample_lane(gen, static) for _ in range(n)])
