"""Task families for meta-training learned optimizers, on real offline data.

Usage::

    family = tasks.get_family("mlp_fashion_mnist", canonical=True)
    gen = torch.Generator().manual_seed(0)
    static = family.sample_static(gen)           # frozen, JSON-serialisable (to_dict/from_dict)
    task = family.make_task(static)
    lanes = family.sample_lanes(gen, static, n)  # dict of [n, ...] tensors
    params = task.init_lanes(gen, lanes)         # dict of [n, ...] tensors (init per lane)
    stream = task.batches("train", n, seed)      # next(stream) -> {"x": [n, B, D], "y": [n, B]}
    loss = torch.func.vmap(task.loss)(params, next(stream), lanes)   # [n]

**Grouping architectures for vmap.** One ``vmap`` needs identical shapes in every lane, so a
family's architecture choices (image size, depth, widths, batch size, dataset) live in the static
config and are drawn once per gradient estimator: all lanes of an estimator share one static config
and one :class:`Task`, and differ only in their lane config (activation index, init scale, quadratic
target) and init draw. A trainer that wants architecture diversity within a step runs several
estimators, each with its own static config, and resamples a static config when it resamples the
estimator (docs/design/meta_training.md §7); configs are frozen and hashable, so lanes can equally
be bucketed by config. Data streams are per estimator too: ``task.batches(split, n_pairs, gen)``
gives one stream per perturbation pair, drawn as one stacked tensor.

Families (:data:`FAMILY_NAMES`): ``mlp_mnist``, ``mlp_fashion_mnist`` (sampled, or
``canonical=True`` for the fixed 2,410-parameter task), ``mlp_digits`` (scikit-learn's 8×8
digits), ``conv_mnist``, ``quadratic``. Their
ranges are in each family class's docstring. Data sources: :mod:`tasks.datasets`.

Fixed held-out problems with train/test splits (the generalisation suite's, never meta-trained
on) are in :mod:`tasks.heldout`; the text corpus and character-level transformer in
:mod:`tasks.text`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from tasks.augment import REPARAM_KEY, ReparamFamily, ReparamTask
from tasks.base import (
    LaneCfg,
    Params,
    StaticCfg,
    Task,
    TaskFamily,
    stack_lanes,
    unstack_lane,
)
from tasks.conv import ConvConfig, ConvMnistFamily, ConvTask
from tasks.idx import read_idx
from tasks.image_mlp import (
    CANONICAL_FASHION_MNIST,
    ImageMLPConfig,
    ImageMLPTask,
    MLPDigitsFamily,
    MLPFashionMnistFamily,
    MLPMnistFamily,
)
from tasks.quadratic import QuadraticConfig, QuadraticFamily, QuadraticTask
from tasks.streams import BatchStream

__all__ = [
    "CANONICAL_FASHION_MNIST",
    "FAMILIES",
    "FAMILY_NAMES",
    "BatchStream",
    "ConvConfig",
    "ConvMnistFamily",
    "ConvTask",
    "ImageMLPConfig",
    "ImageMLPTask",
    "LaneCfg",
    "MLPDigitsFamily",
    "MLPFashionMnistFamily",
    "MLPMnistFamily",
    "Params",
    "QuadraticConfig",
    "QuadraticFamily",
    "QuadraticTask",
    "REPARAM_KEY",
    "ReparamFamily",
    "ReparamTask",
    "StaticCfg",
    "Task",
    "TaskFamily",
    "family_option_names",
    "get_family",
    "read_idx",
    "stack_lanes",
    "static_from_dict",
    "unstack_lane",
]

FAMILIES: Mapping[str, type[TaskFamily]] = MappingProxyType(
    {
        "mlp_mnist": MLPMnistFamily,
        "mlp_fashion_mnist": MLPFashionMnistFamily,
        "mlp_digits": MLPDigitsFamily,
        "conv_mnist": ConvMnistFamily,
        "quadratic": QuadraticFamily,
    }
)
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)

_STATIC_KINDS: Mapping[str, type[StaticCfg]] = MappingProxyType(
    {cls.kind: cls for cls in (ImageMLPConfig, ConvConfig, QuadraticConfig)}
)


def family_option_names(name: str) -> tuple[str, ...]:
    """The options :func:`get_family` accepts for ``name``: its typed fields, then
    ``reparam_scale``."""
    if name not in FAMILIES:
        raise ValueError(f"unknown task family {name!r}; valid names: {', '.join(FAMILY_NAMES)}")
    fields = tuple(f.name for f in dataclasses.fields(FAMILIES[name]))  # type: ignore[arg-type]
    return (*fields, REPARAM_KEY)


def get_family(name: str, **overrides: Any) -> TaskFamily:
    """The family called ``name``, with its typed fields overridden by ``overrides``.

    One option is not a field but applies to every family: ``reparam_scale=(lo, hi)`` wraps the
    family in the weight-rescaling augmentation (:class:`tasks.augment.ReparamFamily`).
    """
    valid = family_option_names(name)  # refuses an unknown family
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(
            f"task family {name!r} has no option(s) {', '.join(unknown)}; valid: "
            f"{', '.join(valid)}"
        )
    overrides = dict(overrides)
    reparam = overrides.pop(REPARAM_KEY, None)
    family = FAMILIES[name](**overrides)
    return family if reparam is None else ReparamFamily(family, reparam)


def static_from_dict(data: Mapping[str, Any]) -> StaticCfg:
    """Rebuild any static config from its ``to_dict()`` (dispatching on ``data["kind"]``)."""
    kind = data.get("kind")
    if kind not in _STATIC_KINDS:
        raise ValueError(f"unknown static config kind {kind!r}; valid: {', '.join(_STATIC_KINDS)}")
    return _STATIC_KINDS[kind].from_dict(data)
