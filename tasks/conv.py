"""Small sampled convnets on MNIST (docs/design/tasks.md §7, ``conv_mnist``; no reference task).

Model: ``depth`` 3×3 convolutions, each with stride 2 and padding 1 (so every layer halves the
side, rounding up), the lane's activation after each, then global average pooling and a linear
head to 10 classes. All conv layers have the same channel count, so every conv after the first
has an ``(c, c, 3, 3)`` kernel whose two largest dims tie — deliberately exercising the learned
optimizer's factored-dims tie rule. Params, PyTorch layout: ``conv{i}.weight`` ``(out, in, 3,
3)``, ``conv{i}.bias``, ``head.weight`` ``(10, c)``, ``head.bias``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.base import LaneCfg, StaticCfg, TaskFamily
from tasks.classification import (
    DEFAULT_ACTIVATIONS,
    ImageClassificationTask,
    LaneActivations,
    check_activations,
    check_dataset,
    lanes_cross_entropy_loss,
    normalise_image_family,
    sample_classification_lane,
    sample_image_architecture,
)
from tasks.datasets import NUM_CLASSES

__all__ = ["ConvConfig", "ConvMnistFamily", "ConvTask"]

KERNEL = 3
STRIDE = 2


@dataclasses.dataclass(frozen=True)
class ConvConfig(StaticCfg):
    """Static config of a small convnet: one entry of ``channels`` per conv layer."""

    kind = "conv"
    dataset: str
    image_size: int
    channels: tuple[int, ...]
    batch_size: int
    activations: tuple[str, ...] = ("relu",)

    def __post_init__(self) -> None:
        check_dataset(self.dataset)
        check_activations(self.activations)
        for name in ("image_size", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not self.channels or not all(isinstance(c, int) and c >= 1 for c in self.channels):
            raise ValueError(f"channels must be one or more positive ints, got {self.channels!r}")


class ConvTask(ImageClassificationTask):
    """A stride-2 convnet with global average pooling, built from a :class:`ConvConfig`."""

    flat_inputs = False

    def __init__(self, static: ConvConfig, data_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(
            static.dataset, static.image_size, static.batch_size, static.activations, data_dir
        )
        self.static = static
        self._shapes: dict[str, tuple[int, ...]] = {}
        in_ch = 1
        for i, out_ch in enumerate(static.channels):
            self._shapes[f"conv{i}.weight"] = (out_ch, in_ch, KERNEL, KERNEL)
            self._shapes[f"conv{i}.bias"] = (out_ch,)
            in_ch = out_ch
        self._shapes["head.weight"] = (NUM_CLASSES, in_ch)
        self._shapes["head.bias"] = (NUM_CLASSES,)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def lanes_grad_and_value(
        self, params: Mapping[str, Tensor], batch: Mapping[str, Tensor], lane_cfg: LaneCfg
    ) -> tuple[dict[str, Tensor], Tensor]:
        """All lanes at once: lanes become channel groups of one grouped convolution per layer.

        ``x [L, B, 1, s, s]`` is laid out as ``[B, L·1, s, s]`` and layer i's kernels ``[L, out,
        in, 3, 3]`` as ``[L·out, in, 3, 3]`` with ``groups=L``; the head is a ``baddbmm``.
        Gradients by autograd on this batched graph; equal to the vmapped reference up to float
        rounding (tests/test_tasks_lanes.py).
        """
        acts = LaneActivations.of(lane_cfg["activation"], self.activations)
        x = batch["x"]
        lanes, size = x.shape[0], x.shape[1]
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            h = x.transpose(0, 1).reshape(size, lanes * x.shape[2], *x.shape[3:])
            for i, out_ch in enumerate(self.static.channels):
                w = leaves[f"conv{i}.weight"]
                w = w.reshape(lanes * out_ch, *w.shape[2:])
                b = leaves[f"conv{i}.bias"].reshape(-1)
                h = F.conv2d(h, w, b, stride=STRIDE, padding=KERNEL // 2, groups=lanes)
                h = h.view(size, lanes, out_ch, *h.shape[2:])
                h = acts.where(h, lane_dim=1).view(size, lanes * out_ch, *h.shape[3:])
            pooled = h.mean(dim=(-2, -1)).view(size, lanes, -1).transpose(0, 1)
            head_w, head_b = leaves["head.weight"], leaves["head.bias"]
            logits = torch.baddbmm(head_b.unsqueeze(2), head_w, pooled.transpose(1, 2))
            loss = lanes_cross_entropy_loss(logits, batch["y"])  # class-major logits
            grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
        return dict(zip(leaves, grads, strict=True)), loss.detach()

    def logits(self, params: Mapping[str, Tensor], x: Tensor, lane_cfg: LaneCfg) -> Tensor:
        h = x
        for i in range(len(self.static.channels)):
            w, b = params[f"conv{i}.weight"], params[f"conv{i}.bias"]
            h = self.act(F.conv2d(h, w, b, stride=STRIDE, padding=KERNEL // 2), lane_cfg)
        return F.linear(h.mean(dim=(-2, -1)), params["head.weight"], params["head.bias"])


@dataclasses.dataclass(frozen=True)
class ConvMnistFamily(TaskFamily):
    """Sampled small convnets on MNIST.

    Static (per estimator):

    - ``image_sizes``: image side, uniform over {8, 14} (28 via override; a 28×28 convnet costs
      ~4× a 14×14 one per step, too much for CPU meta-training budgets);
    - ``depth``: conv layers, uniform integer in [2, 3] (a single stride-2 conv before the global
      pool sees only 3×3 patches and barely learns: Adam gets such nets ~10 % below chance in
      200 steps, so they would mostly add noise to meta-training);
    - ``channels``: one count for all conv layers, ``log_int(8, 32)`` ∈ [8, 31];
    - ``batch_size``: ``log_int(32, 128)`` ∈ [32, 127] (narrower than the MLPs: convs cost more
      per example on CPU).

    Per lane: ``activation`` index uniform over relu, tanh, gelu, silu; ``init_scale`` ~
    U(0.5, 2). Kernel 3, stride 2, padding 1, global average pool, linear head. Scalars fix a
    range, as in :class:`tasks.image_mlp.MLPMnistFamily`.
    """

    name = "conv_mnist"
    dataset = "mnist"
    image_sizes: tuple[int, ...] = (8, 14)
    depth: tuple[int, int] = (2, 3)
    channels: tuple[int, int] = (8, 32)
    batch_size: tuple[int, int] = (32, 128)
    activations: tuple[str, ...] = DEFAULT_ACTIVATIONS
    init_scale: tuple[float, float] = (0.5, 2.0)
    data_dir: str | None = None

    def __post_init__(self) -> None:
        normalise_image_family(self, {"depth": 1, "channels": 1, "batch_size": 1})

    def sample_static(self, gen: torch.Generator) -> ConvConfig:
        drawn = sample_image_architecture(gen, self, "channels")
        return ConvConfig(
            dataset=self.dataset,
            image_size=drawn.image_size,
            channels=(drawn.width,) * drawn.depth,
            batch_size=drawn.batch_size,
            activations=self.activations,
        )

    def sample_lane(self, gen: torch.Generator, static: StaticCfg) -> LaneCfg:
        return sample_classification_lane(gen, _conv_static(static).activations, self.init_scale)

    def make_task(self, static: StaticCfg) -> ConvTask:
        return ConvTask(_conv_static(static), data_dir=self.data_dir)


def _conv_static(static: StaticCfg) -> ConvConfig:
    if not isinstance(static, ConvConfig):
        raise TypeError(f"expected a ConvConfig, got {type(static).__name__}")
    return static
