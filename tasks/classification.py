"""Shared machinery of the image-classification tasks (MLP and conv families).

Lane config of every classification family: ``{"activation": int64 0-d, "init_scale":
float32 0-d}``. The activation index points into the static config's ``activations`` tuple; the
forward pass evaluates every candidate and selects per lane with ``torch.where``
(:func:`tasks.base.select_activation`), so one ``vmap`` covers lanes with different activations.

Init follows Haiku's dense default (docs/design/tasks.md §3): weights truncated normal with std
``1/sqrt(fan_in)`` cut at ±2 std, biases zero; the weights are then multiplied by the lane's
init scale. Conv kernels use the same rule with ``fan_in = in_channels · kh · kw``.

All lozoo classification families use the fixed-task normaliser ``clip(ℓ, 0, 1.5·ln C)``
(docs/design/tasks.md §7) so meta-losses stay comparable across families.
"""

from __future__ import annotations

import math
import os
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.base import (
    ACTIVATIONS,
    Batch,
    LaneCfg,
    Params,
    Task,
    classification_normalizer,
    log_int,
    randint,
    select_activation,
    trunc_normal,
    uniform,
)
from tasks.datasets import DATASET_NAMES, NUM_CLASSES, load_split
from tasks.streams import BatchStream

DEFAULT_ACTIVATIONS = ("relu", "tanh", "gelu", "silu")


def check_activations(names: Sequence[str]) -> None:
    if not names:
        raise ValueError("activations must name at least one activation")
    unknown = [a for a in names if a not in ACTIVATIONS]
    if unknown:
        raise ValueError(f"unknown activations {unknown}; valid: {', '.join(ACTIVATIONS)}")


def check_dataset(dataset: str) -> None:
    if dataset not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASET_NAMES)}")


def as_range(name: str, value: int | float | Sequence[int | float]) -> tuple:
    """Normalise an override: a scalar means a fixed value ``(v, v)``; validate ``lo <= hi``."""
    pair = (value, value) if isinstance(value, (int, float)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, float)) for v in pair) or pair[0] > pair[1]:
        raise ValueError(f"{name} must be a value or a (lo, hi) pair with lo <= hi, got {value!r}")
    return pair


def normalise_image_family(family: Any, int_ranges: Mapping[str, int]) -> None:
    """Shared ``__post_init__`` of the image families (frozen dataclasses).

    Turns scalar overrides into fixed ranges, validates them, and checks the image sizes and
    activations; ``int_ranges`` maps each integer range field to its smallest allowed value.
    """
    sizes = family.image_sizes
    sizes = (sizes,) if isinstance(sizes, int) else tuple(sizes)
    if not sizes or not all(isinstance(s, int) and 1 <= s <= 64 for s in sizes):
        raise ValueError(f"image_sizes must be ints in [1, 64], got {sizes!r}")
    object.__setattr__(family, "image_sizes", sizes)
    for name in (*int_ranges, "init_scale"):
        object.__setattr__(family, name, as_range(name, getattr(family, name)))
    for name, smallest in int_ranges.items():
        lo, hi = getattr(family, name)
        if not (isinstance(lo, int) and isinstance(hi, int)) or lo < smallest:
            raise ValueError(f"{name} must be a range of ints >= {smallest}, got {(lo, hi)!r}")
    if family.init_scale[0] <= 0:
        raise ValueError(f"init_scale must be positive, got {family.init_scale!r}")
    acts = family.activations
    acts = (acts,) if isinstance(acts, str) else tuple(acts)
    check_activations(acts)
    object.__setattr__(family, "activations", acts)


class ImageArchitecture(NamedTuple):
    """One draw of an image family's static choices (the layer width is the family's own)."""

    image_size: int
    depth: int
    width: int
    batch_size: int


def sample_image_architecture(
    gen: torch.Generator, family: Any, width_field: str
) -> ImageArchitecture:
    """The static draws every sampled image family makes, in one fixed order.

    Image side uniform over ``family.image_sizes``, depth a uniform integer in ``family.depth``,
    one layer width ``log_int`` over ``family.<width_field>`` (``width`` for MLPs, ``channels``
    for convnets) and batch size ``log_int`` over ``family.batch_size``. The order is part of the
    seeding contract: the same generator state gives the same task.
    """
    image_size = family.image_sizes[randint(gen, 0, len(family.image_sizes) - 1)]
    depth = randint(gen, *family.depth)
    width = log_int(gen, *getattr(family, width_field))
    batch_size = log_int(gen, *family.batch_size)
    return ImageArchitecture(image_size, depth, width, batch_size)


def sample_classification_lane(
    gen: torch.Generator, activations: Sequence[str], init_scale: tuple[float, float]
) -> LaneCfg:
    """Activation index uniform over ``activations``; init scale ~ U(lo, hi)."""
    if len(activations) == 1:
        index = 0
    else:
        index = int(torch.randint(0, len(activations), (), generator=gen).item())
    return {
        "activation": torch.tensor(index, dtype=torch.int64),
        "init_scale": torch.tensor(uniform(gen, *init_scale), dtype=torch.float32),
    }


# -- batched lanes (Task.lanes_grad_and_value; docs/design/lanes.md) ------------------------------
# Derivatives of the activations as autograd computes them (the same ATen backward kernels), so
# the hand-written backward of the batched MLP rounds like the vmapped reference. Activations not
# listed fall back to torch.func.vjp.
_ACTIVATION_BACKWARD: Mapping[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "relu": lambda grad, z, out: torch.ops.aten.threshold_backward(grad, out, 0.0),
    "tanh": lambda grad, z, out: torch.ops.aten.tanh_backward(grad, out),
    "sigmoid": lambda grad, z, out: torch.ops.aten.sigmoid_backward(grad, out),
    "gelu": lambda grad, z, out: torch.ops.aten.gelu_backward(grad, z),
    "silu": lambda grad, z, out: torch.ops.aten.silu_backward(grad, z),
}


def activation_backward(name: str, grad: Tensor, z: Tensor, out: Tensor) -> Tensor:
    """``grad · act'(z)`` for ``out = act(z)`` of the activation called ``name``."""
    backward = _ACTIVATION_BACKWARD.get(name)
    if backward is not None:
        return backward(grad, z, out)
    return torch.func.vjp(ACTIVATIONS[name], z)[1](grad)[0]


class LaneActivations:
    """The lanes of a batch grouped by activation, to apply each activation only where it is used.

    ``index`` is the lane configs' ``activation`` tensor ``[L]`` (host-readable: lane configs
    live on the CPU); ``names`` the static config's candidates. Lanes are selected along axis 0.
    """

    def __init__(self, index: Tensor, names: Sequence[str]) -> None:
        self.names = tuple(names)
        lanes_of: dict[int, list[int]] = {}
        for lane, k in enumerate(index.tolist()):
            lanes_of.setdefault(int(k), []).append(lane)
        self.groups = [
            (self.names[k], torch.tensor(lanes, dtype=torch.long))
            for k, lanes in sorted(lanes_of.items())
        ]

    _cache: ClassVar[dict[int, tuple[Tensor, int, tuple[str, ...], LaneActivations]]] = {}

    @classmethod
    def of(cls, index: Tensor, names: Sequence[str]) -> LaneActivations:
        """Cached per index tensor and version: an unroll's lane configs change only at resets
        (in place, which bumps the version), so the grouping is rebuilt only then."""
        names = tuple(names)
        hit = cls._cache.get(id(index))
        if hit is not None and hit[0] is index and hit[1] == index._version and hit[2] == names:
            return hit[3]
        groups = cls(index, names)
        if len(cls._cache) >= 16:
            cls._cache.clear()
        cls._cache[id(index)] = (index, index._version, names, groups)
        return groups

    @property
    def uniform(self) -> bool:
        return len(self.groups) == 1

    def forward(self, z: Tensor) -> Tensor:
        if self.uniform:
            return ACTIVATIONS[self.groups[0][0]](z)
        out = torch.empty_like(z)
        for name, lanes in self.groups:
            out.index_copy_(0, lanes, ACTIVATIONS[name](z.index_select(0, lanes)))
        return out

    def backward(self, grad: Tensor, z: Tensor, out: Tensor) -> Tensor:
        if self.uniform:
            return activation_backward(self.groups[0][0], grad, z, out)
        dz = torch.empty_like(z)
        for name, lanes in self.groups:
            pick = [x.index_select(0, lanes) for x in (grad, z, out)]
            dz.index_copy_(0, lanes, activation_backward(name, *pick))
        return dz

    def where(self, z: Tensor, lane_dim: int) -> Tensor:
        """Differentiable form for autograd: each used activation on all lanes, then selected."""
        out = ACTIVATIONS[self.groups[0][0]](z)
        shape = [1] * z.dim()
        shape[lane_dim] = -1
        for name, lanes in self.groups[1:]:
            mask = torch.zeros(z.shape[lane_dim], dtype=torch.bool)
            mask[lanes] = True
            out = torch.where(mask.view(shape), ACTIVATIONS[name](z), out)
        return out


def lanes_log_softmax(logits: Tensor) -> Tensor:
    """``log_softmax`` over axis 1 of class-major logits ``[L, C, B]``.

    Class-major because reductions over a short trailing axis (10 classes) are an order of
    magnitude slower on the CPU than over axis 1 with the batch contiguous behind it.
    """
    shifted = logits - logits.amax(1, keepdim=True)
    return shifted - shifted.exp().sum(1, keepdim=True).log()


def lanes_cross_entropy_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy per lane ``[L]`` of class-major logits ``[L, C, B]``, labels ``[L, B]``
    (differentiable; the convnets' batched path uses it under autograd)."""
    log_probs = lanes_log_softmax(logits)
    return -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1).mean(1)


def lanes_cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy per lane and its gradient: ``(loss [L], dloss/dlogits [L, C, B])``.

    ``logits`` are class-major ``[L, C, B]``, ``labels`` ``[L, B]``; the gradient is
    ``(softmax − onehot) / B``, also class-major.
    """
    batch = logits.shape[2]
    log_probs = lanes_log_softmax(logits)
    index = labels.unsqueeze(1)
    loss = -log_probs.gather(1, index).squeeze(1).mean(1)
    grad = log_probs.exp_()
    grad.scatter_add_(1, index, torch.full(index.shape, -1.0, dtype=grad.dtype))
    return loss, grad.mul_(1.0 / batch)


class ImageClassificationTask(Task):
    """An image classifier over MNIST-like data; subclasses define shapes and ``logits``."""

    num_classes = NUM_CLASSES
    flat_inputs: ClassVar[bool] = True
    """True if batches carry flat ``[B, s·s]`` vectors (MLPs), False for ``[B, 1, s, s]``."""

    def __init__(
        self,
        dataset: str,
        image_size: int,
        batch_size: int,
        activations: tuple[str, ...],
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.dataset = dataset
        self.image_size = image_size
        self.batch_size = batch_size
        self.activations = activations
        self.data_dir = data_dir

    @abstractmethod
    def logits(self, params: Mapping[str, Tensor], x: Tensor, lane_cfg: LaneCfg) -> Tensor:
        """``[B, C]`` logits for a batch ``x`` as drawn from this task's streams."""

    def init(self, gen: torch.Generator, lane_cfg: Mapping[str, Tensor]) -> Params:
        scale = float(lane_cfg["init_scale"])
        params: Params = {}
        for name, shape in self.param_shapes().items():
            if name.endswith(".bias"):
                params[name] = torch.zeros(shape)
            else:
                fan_in = math.prod(shape[1:])  # (out, in) or (out, in, kh, kw)
                params[name] = trunc_normal(shape, 1.0 / math.sqrt(fan_in), gen).mul_(scale)
        return params

    def act(self, h: Tensor, lane_cfg: LaneCfg) -> Tensor:
        """The lane's activation, selected branch-free (vmap-safe)."""
        return select_activation(h, lane_cfg["activation"], self.activations)

    def loss(self, params: Mapping[str, Tensor], batch: Batch, lane_cfg: LaneCfg) -> Tensor:
        return F.cross_entropy(self.logits(params, batch["x"], lane_cfg), batch["y"])

    def normalizer(self, loss: Tensor) -> Tensor:
        return classification_normalizer(loss, self.num_classes)

    def metrics(
        self, params: Mapping[str, Tensor], batch: Batch, lane_cfg: LaneCfg
    ) -> dict[str, Tensor]:
        logits = self.logits(params, batch["x"], lane_cfg)
        return {
            "loss": F.cross_entropy(logits, batch["y"]),
            "accuracy": (logits.argmax(-1) == batch["y"]).to(torch.float32).mean(),
        }

    def batches(
        self,
        split: str,
        n_streams: int,
        gen_or_seed: torch.Generator | int,
        *,
        device: torch.device | str | None = None,
    ) -> BatchStream:
        """Streams of ``{"x": [n, B, s·s] or [n, B, 1, s, s] float32, "y": [n, B] int64}``."""
        self._check_split(split)
        x, y = load_split(
            self.dataset, split, self.image_size, data_dir=self.data_dir, device=device
        )
        if self.flat_inputs:
            x = x.view(len(x), -1)
        return BatchStream({"x": x, "y": y}, n_streams, self.batch_size, gen_or_seed, name=split)
