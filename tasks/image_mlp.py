"""Image-MLP task families on MNIST and Fashion-MNIST (docs/design/tasks.md §3, §4, §7).

Model: flatten, then dense layers ``hidden + [10]`` with the lane's activation between layers
(not after the last). Params ``layer{i}.weight`` ``(out, in)`` and ``layer{i}.bias``; the last
layer is the classifier head.
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
    lanes_cross_entropy,
    normalise_image_family,
    sample_classification_lane,
    sample_image_architecture,
)
from tasks.datasets import NUM_CLASSES

__all__ = [
    "CANONICAL_FASHION_MNIST",
    "ImageMLPConfig",
    "ImageMLPTask",
    "MLPDigitsFamily",
    "MLPFashionMnistFamily",
    "MLPMnistFamily",
    "mlp_shapes",
]


@dataclasses.dataclass(frozen=True)
class ImageMLPConfig(StaticCfg):
    """Static config of an image MLP: everything that fixes tensor shapes.

    ``activations`` is the candidate list a lane's activation index points into (it changes no
    shape, but it must be the same for all lanes that are vmapped together).
    """

    kind = "image_mlp"
    dataset: str
    image_size: int
    hidden: tuple[int, ...]
    batch_size: int
    activations: tuple[str, ...] = ("relu",)

    def __post_init__(self) -> None:
        check_dataset(self.dataset)
        check_activations(self.activations)
        for name in ("image_size", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not all(isinstance(w, int) and w >= 1 for w in self.hidden):
            raise ValueError(f"hidden widths must be positive ints, got {self.hidden!r}")


CANONICAL_FASHION_MNIST = ImageMLPConfig(
    dataset="fashion_mnist", image_size=8, hidden=(32,), batch_size=128, activations=("relu",)
)
"""ImageMLP_FashionMnist8_Relu32: 64 → 32 → 10 ReLU, batch 128, 2,410 params (design §3)."""


def mlp_shapes(inputs: int, hidden: tuple[int, ...], outputs: int) -> dict[str, tuple[int, ...]]:
    """``layer{i}.weight`` ``(out, in)`` and ``layer{i}.bias`` of a dense net, in init order."""
    sizes = [inputs, *hidden, outputs]
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        shapes[f"layer{i}.weight"] = (fan_out, fan_in)
        shapes[f"layer{i}.bias"] = (fan_out,)
    return shapes


class ImageMLPTask(ImageClassificationTask):
    """An MLP classifier over flattened ``s×s`` images, built from an :class:`ImageMLPConfig`."""

    flat_inputs = True

    def __init__(
        self, static: ImageMLPConfig, data_dir: str | os.PathLike[str] | None = None
    ) -> None:
        super().__init__(
            static.dataset, static.image_size, static.batch_size, static.activations, data_dir
        )
        self.static = static
        self._shapes = mlp_shapes(static.image_size**2, static.hidden, NUM_CLASSES)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    @torch.no_grad()
    def lanes_grad_and_value(
        self, params: Mapping[str, Tensor], batch: Mapping[str, Tensor], lane_cfg: LaneCfg
    ) -> tuple[dict[str, Tensor], Tensor]:
        """All lanes' forward and hand-written backward as batched matrix products.

        One ``baddbmm`` per layer forward and two ``bmm`` per layer backward over ``[L, ...]``
        weights, activations applied per group of lanes (:class:`LaneActivations`); equal to
        the vmapped reference up to float rounding (tests/test_tasks_lanes.py).
        """
        acts = LaneActivations.of(lane_cfg["activation"], self.activations)
        depth = len(self.static.hidden)
        inputs, pre = [batch["x"]], []
        for i in range(depth):
            weight, bias = params[f"layer{i}.weight"], params[f"layer{i}.bias"]
            z = torch.baddbmm(bias.unsqueeze(1), inputs[-1], weight.transpose(1, 2))
            pre.append(z)
            inputs.append(acts.forward(z))
        # the head computes class-major logits [L, C, B] (see lanes_log_softmax)
        head_w, head_b = params[f"layer{depth}.weight"], params[f"layer{depth}.bias"]
        logits = torch.baddbmm(head_b.unsqueeze(2), head_w, inputs[-1].transpose(1, 2))
        loss, grad_logits = lanes_cross_entropy(logits, batch["y"])
        grads: dict[str, Tensor] = {
            f"layer{depth}.weight": torch.bmm(grad_logits, inputs[depth]),
            f"layer{depth}.bias": grad_logits.sum(2),
        }
        if depth > 0:
            grad_in = torch.bmm(grad_logits.transpose(1, 2), head_w)
            grad_z = acts.backward(grad_in, pre[-1], inputs[depth])
        for i in range(depth - 1, -1, -1):
            grads[f"layer{i}.weight"] = torch.bmm(grad_z.transpose(1, 2), inputs[i])
            grads[f"layer{i}.bias"] = grad_z.sum(1)
            if i > 0:
                grad_in = torch.bmm(grad_z, params[f"layer{i}.weight"])
                grad_z = acts.backward(grad_in, pre[i - 1], inputs[i])
        return {name: grads[name] for name in params}, loss

    def logits(self, params: Mapping[str, Tensor], x: Tensor, lane_cfg: LaneCfg) -> Tensor:
        depth = len(self.static.hidden)
        h = x
        for i in range(depth + 1):
            h = F.linear(h, params[f"layer{i}.weight"], params[f"layer{i}.bias"])
            if i < depth:
                h = self.act(h, lane_cfg)
        return h


@dataclasses.dataclass(frozen=True)
class MLPMnistFamily(TaskFamily):
    """Sampled image MLPs on MNIST.

    Static (per estimator), defaults per design §7:

    - ``image_sizes``: image side, uniform over {8, 14, 28};
    - ``depth``: hidden layers, uniform integer in [1, 3];
    - ``width``: one width for all hidden layers, ``log_int(16, 128)`` ∈ [16, 127];
    - ``batch_size``: ``log_int(32, 256)`` ∈ [32, 255].

    Per lane: ``activation`` index uniform over ``activations`` (relu, tanh, gelu, silu) and
    ``init_scale`` ~ U(0.5, 2).

    Every range is an overridable field; a scalar fixes it (``depth=2`` means exactly 2,
    ``image_sizes=(8,)`` a fixed 8×8). ``log_int(a, a)`` is ``a``. ``data_dir`` is passed to the
    dataset search (tasks.datasets).
    """

    name = "mlp_mnist"
    dataset = "mnist"
    image_sizes: tuple[int, ...] = (8, 14, 28)
    depth: tuple[int, int] = (1, 3)
    width: tuple[int, int] = (16, 128)
    batch_size: tuple[int, int] = (32, 256)
    activations: tuple[str, ...] = DEFAULT_ACTIVATIONS
    init_scale: tuple[float, float] = (0.5, 2.0)
    data_dir: str | None = None

    def __post_init__(self) -> None:
        normalise_image_family(self, {"depth": 0, "width": 1, "batch_size": 1})

    def sample_static(self, gen: torch.Generator) -> ImageMLPConfig:
        drawn = sample_image_architecture(gen, self, "width")
        return ImageMLPConfig(
            dataset=self.dataset,
            image_size=drawn.image_size,
            hidden=(drawn.width,) * drawn.depth,
            batch_size=drawn.batch_size,
            activations=self.activations,
        )

    def sample_lane(self, gen: torch.Generator, static: StaticCfg) -> LaneCfg:
        return sample_classification_lane(gen, _mlp_static(static).activations, self.init_scale)

    def make_task(self, static: StaticCfg) -> ImageMLPTask:
        return ImageMLPTask(_mlp_static(static), data_dir=self.data_dir)


@dataclasses.dataclass(frozen=True)
class MLPFashionMnistFamily(MLPMnistFamily):
    """The :class:`MLPMnistFamily` ranges on Fashion-MNIST, or the canonical fixed task.

    ``canonical=True`` (``get_family("mlp_fashion_mnist", canonical=True)``) makes
    ``sample_static`` always return :data:`CANONICAL_FASHION_MNIST` (8×8, 64→32→10 ReLU, batch
    128, 2,410 params) and ``sample_lane`` return ReLU with init scale 1 (the reference's fixed
    task varies only the init draw between lanes). It cannot be combined with range overrides.
    """

    name = "mlp_fashion_mnist"
    dataset = "fashion_mnist"
    canonical: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.canonical:
            defaults = MLPMnistFamily()
            changed = [
                f.name
                for f in dataclasses.fields(MLPMnistFamily)
                if f.name != "data_dir" and getattr(self, f.name) != getattr(defaults, f.name)
            ]
            if changed:
                raise ValueError(
                    f"canonical=True fixes the task; do not also override {', '.join(changed)}"
                )

    def sample_static(self, gen: torch.Generator) -> ImageMLPConfig:
        return CANONICAL_FASHION_MNIST if self.canonical else super().sample_static(gen)

    def sample_lane(self, gen: torch.Generator, static: StaticCfg) -> LaneCfg:
        if self.canonical:
            return sample_classification_lane(gen, ("relu",), (1.0, 1.0))
        return super().sample_lane(gen, static)


@dataclasses.dataclass(frozen=True)
class MLPDigitsFamily(MLPMnistFamily):
    """The :class:`MLPMnistFamily` ranges on scikit-learn's 8×8 digits (pixels ÷16).

    The images are natively 8×8, so ``image_sizes`` defaults to ``(8,)``; other sizes are
    bilinear resizes of the 8×8 originals. The training split is small (1,150 images), so a
    2,000-step trajectory at batch 64 sees it about 110 times.
    """

    name = "mlp_digits"
    dataset = "digits"
    image_sizes: tuple[int, ...] = (8,)


def _mlp_static(static: StaticCfg) -> ImageMLPConfig:
    if not isinstance(static, ImageMLPConfig):
        raise TypeError(f"expected an ImageMLPConfig, got {type(static).__name__}")
    return static
