"""Held-out problems: fixed real-data problems no lozoo optimizer is meta-trained on.

The generalisation benchmark (``python -m metatrain.eval --suite generalisation``) trains every
optimizer on these. Unlike the task families they are single, fixed problems (one architecture,
one data set, one batch size, one horizon) with a ``train`` and a ``test`` split:

=================== ============================================ ======= =========
problem             model / data                                  batch   steps
=================== ============================================ ======= =========
``digits_mlp``      MLP 64-64-10 (ReLU), scikit-learn digits 8×8   64      2,000
``fmnist_mlp``      MLP 784-128-128-10 (ReLU), Fashion-MNIST       128     3,000
``fmnist_conv``     conv 16, conv 32 (3×3, stride 2, ReLU), global  128     1,500
                    average pool, linear; Fashion-MNIST 28×28
``text_transformer`` 2-layer decoder-only transformer, width 64,   32      1,000
                    context 64, characters of Debian's fortunes
``digits_mlp_long`` ``digits_mlp`` at 10× the steps                64      20,000
=================== ============================================ ======= =========

The first four are the core problems (:data:`CORE_PROBLEMS`), the ones an optimizer is judged
on; ``digits_mlp_long`` is an extra (:data:`EXTRA_PROBLEMS`), a horizon study that runs by
default but counts towards no goal.

The transformer trains for 1,000 steps (not 2,000): at about 38 ms a step on one core it is
the suite's most expensive problem, and 1,000 steps keep one optimizer's whole suite (grid and
seeds, 14 runs per problem) within 30 minutes on 2 cores.

Data (offline only): Fashion-MNIST through :mod:`tasks.datasets` (train = the first 80 % of the
official training set, test = the official test set); scikit-learn's bundled digits (1,797
images, 0–16 grey levels scaled to [0, 1]) split 80/20 per class by a fixed hash; the text corpus
of :mod:`tasks.text`. Inits follow the task families (truncated normal 1/√fan_in, zero biases).

``get_problem(name)`` returns a :class:`HeldOutProblem`; ``problem.make_task()`` a
:class:`tasks.Task` (pure loss over a params dict), ``problem.fixed_lane()`` its lane config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor

from tasks.base import StaticCfg, Task
from tasks.classification import ImageClassificationTask, sample_classification_lane
from tasks.conv import ConvConfig, ConvTask
from tasks.datasets import hashed_class_split, load_raw
from tasks.image_mlp import ImageMLPConfig, ImageMLPTask, mlp_shapes
from tasks.streams import BatchStream
from tasks.text import CharTransformerConfig, CharTransformerTask

__all__ = [
    "CORE_PROBLEMS",
    "EXTRA_PROBLEMS",
    "PROBLEMS",
    "PROBLEM_NAMES",
    "DigitsMLPConfig",
    "DigitsMLPTask",
    "HeldOutProblem",
    "data_fingerprint",
    "get_problem",
    "hidden_matrices",
    "load_digits_split",
]

DIGITS_CLASSES = 10
DIGITS_TRAIN_FRACTION = 0.8

_DIGITS_LOCK = threading.Lock()
_DIGITS: dict[str, tuple[Tensor, Tensor]] = {}


def load_digits_split(split: str) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits: ``(x [N, 64] float32 in [0, 1], y [N] int64)`` of one split.

    80 % of every class goes to ``train`` and the rest to ``test``, in an order fixed by an
    integer hash of the example index (the same on every machine and version).
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; the digits problem has train and test")
    with _DIGITS_LOCK:
        if not _DIGITS:
            try:
                from sklearn.datasets import load_digits
            except ImportError as err:
                raise FileNotFoundError(
                    "the digits problems need scikit-learn's bundled digits: pip install "
                    "scikit-learn"
                ) from err
            data = load_digits()
            pixels = np.asarray(data.data, dtype=np.float32) / 16.0
            labels = np.asarray(data.target, dtype=np.int64)
            splits = hashed_class_split(labels, DIGITS_CLASSES, DIGITS_TRAIN_FRACTION)
            for name, idx in zip(("train", "test"), splits, strict=True):
                _DIGITS[name] = (torch.from_numpy(pixels[idx]), torch.from_numpy(labels[idx]))
        return _DIGITS[split]


@dataclasses.dataclass(frozen=True)
class DigitsMLPConfig(StaticCfg):
    """An MLP over scikit-learn's flattened 8×8 digits."""

    kind = "digits_mlp"
    hidden: tuple[int, ...] = (64,)
    batch_size: int = 64
    activations: tuple[str, ...] = ("relu",)


class DigitsMLPTask(ImageMLPTask):
    """:class:`tasks.ImageMLPTask`'s model on scikit-learn's digits (train / test splits)."""

    splits = ("train", "test")

    def __init__(self, static: DigitsMLPConfig | None = None) -> None:
        static = static or DigitsMLPConfig()
        ImageClassificationTask.__init__(self, "digits", 8, static.batch_size, static.activations)
        self.static = static  # type: ignore[assignment]  # logits() reads only .hidden
        self._shapes = mlp_shapes(64, static.hidden, DIGITS_CLASSES)

    def batches(
        self,
        split: str,
        n_streams: int,
        gen_or_seed: torch.Generator | int,
        *,
        device: torch.device | str | None = None,
    ) -> BatchStream:
        self._check_split(split)
        x, y = load_digits_split(split)
        if device is not None:
            x, y = x.to(device), y.to(device)
        return BatchStream({"x": x, "y": y}, n_streams, self.batch_size, gen_or_seed, name=split)


class _FashionMLPTask(ImageMLPTask):
    splits = ("train", "test")


class _FashionConvTask(ConvTask):
    splits = ("train", "test")


@dataclasses.dataclass(frozen=True)
class HeldOutProblem:
    """One fixed problem of the generalisation suite: how to build it and how long to train."""

    name: str
    title: str
    steps: int
    build: Callable[[], Task] = dataclasses.field(repr=False)
    data: str = ""

    def make_task(self) -> Task:
        return self.build()

    def fixed_lane(self) -> dict[str, Tensor]:
        """The lane config of a fixed problem: its one activation (ReLU), init scale 1."""
        return sample_classification_lane(torch.Generator(), ("relu",), (1.0, 1.0))

    def with_steps(self, steps: int) -> HeldOutProblem:
        return dataclasses.replace(self, steps=int(steps))


def _fmnist_mlp() -> Task:
    return _FashionMLPTask(
        ImageMLPConfig(dataset="fashion_mnist", image_size=28, hidden=(128, 128), batch_size=128)
    )


def _fmnist_conv() -> Task:
    return _FashionConvTask(
        ConvConfig(dataset="fashion_mnist", image_size=28, channels=(16, 32), batch_size=128)
    )


def _text() -> Task:
    return CharTransformerTask(CharTransformerConfig())


_FM = "Fashion-MNIST IDX (train: first 48,000 of the training set; test: official 10,000)"
_DIG = "scikit-learn digits (1,797 8×8 images; 80/20 per-class split)"
_TEXT = "Debian fortunes (tasks.text), 1 in 10 entries held out"
_ALL = (
    HeldOutProblem("digits_mlp", "digits MLP 64-64-10, B64", 2000, DigitsMLPTask, _DIG),
    HeldOutProblem("fmnist_mlp", "F-MNIST MLP 784-128-128-10, B128", 3000, _fmnist_mlp, _FM),
    HeldOutProblem("fmnist_conv", "F-MNIST conv 16-32 + linear, B128", 1500, _fmnist_conv, _FM),
    HeldOutProblem("text_transformer", "char transformer 2×64, ctx 64, B32", 1000, _text, _TEXT),
    HeldOutProblem("digits_mlp_long", "digits MLP, 10× horizon", 20000, DigitsMLPTask, _DIG),
)
PROBLEMS: Mapping[str, HeldOutProblem] = MappingProxyType({p.name: p for p in _ALL})
PROBLEM_NAMES: tuple[str, ...] = tuple(PROBLEMS)
CORE_PROBLEMS: tuple[str, ...] = ("digits_mlp", "fmnist_mlp", "fmnist_conv", "text_transformer")
"""The four problems an optimizer is judged on (the goal counts of ``--compare``)."""
EXTRA_PROBLEMS: tuple[str, ...] = tuple(n for n in PROBLEM_NAMES if n not in CORE_PROBLEMS)
"""Problems evaluated by default but outside the goals (``digits_mlp_long``: a horizon study)."""


def get_problem(name: str) -> HeldOutProblem:
    if name not in PROBLEMS:
        raise ValueError(f"unknown held-out problem {name!r}; valid: {', '.join(PROBLEM_NAMES)}")
    return PROBLEMS[name]


def hidden_matrices(task: Task) -> list[str]:
    """Names of the hidden weight matrices: what Muon-style optimizers orthogonalise.

    Every weight between the input and the output layer: MLP weights but the last (the
    classifier), conv kernels, transformer block matrices; never embeddings, output heads,
    biases or LayerNorm gains.
    """
    if isinstance(task, CharTransformerTask):
        return task.hidden_matrices()
    if isinstance(task, ConvTask):
        return [n for n in task.param_shapes() if n.startswith("conv") and n.endswith("weight")]
    if isinstance(task, ImageMLPTask):
        depth = len(task.static.hidden)
        return [f"layer{i}.weight" for i in range(depth)]
    raise TypeError(f"no hidden-matrix rule for {type(task).__name__}")


def data_fingerprint(task: Task) -> str:
    """Identifies the exact data a problem trains on (part of the result-cache key)."""
    if isinstance(task, CharTransformerTask):
        return task.data_fingerprint()
    if isinstance(task, DigitsMLPTask):
        digest = hashlib.sha256()
        for split in ("train", "test"):
            x, y = load_digits_split(split)
            digest.update(x.numpy().tobytes())
            digest.update(y.numpy().tobytes())
        return f"digits:{digest.hexdigest()}"
    if isinstance(task, ImageClassificationTask):
        return f"{task.dataset}:{load_raw(task.dataset, task.data_dir).fingerprint}"
    raise TypeError(f"no data fingerprint for {type(task).__name__}")
