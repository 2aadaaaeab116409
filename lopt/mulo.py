"""MuLO: small_fc_lopt with µP step scaling (µLO, Thérien et al. 2024, arXiv 2406.00153).

Design notes, including exactly which tensors count as hidden: docs/design/mulo.md. The learned
rule is small_fc_lopt's (:mod:`lopt.core`); MuLO only divides the learning rate of each *hidden*
tensor by its width multiplier ``w``, so its step and its (decoupled) weight decay shrink as the
model widens. No dependency on ``mup``: ``w`` comes from parameter shapes.

A tensor's **width axes** are the axes whose size differs between the model and a copy of it at
another width (``base_shapes``; ``mup`` calls that copy the base or delta model). A tensor with
exactly two width axes is *hidden*; its multiplier is the size of its *last* width axis (fan_in
for PyTorch's ``(out, in, ...)`` weights) divided by the declared ``base_dim``. ``base_dim=1``
(the default) is µLO's convention (``w = fan_in``); ``base_dim=None`` divides by the base copy's
size instead (stock ``mup``). Every other tensor keeps ``w = 1``; more than two width axes is an
error (as in ``mup``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from . import core
from .config import SmallFCConfig
from .functional import apply_decoupled_step
from .optimizer import SmallFCLOpt, WeightsSpec, small_fc_step

Shape = Sequence[int]


def width_axes(shape: Shape, base_shape: Shape, name: str = "parameter") -> tuple[int, ...]:
    """Axes whose size differs between ``shape`` and the other-width ``base_shape``."""
    shape, base_shape = tuple(shape), tuple(base_shape)
    if len(shape) != len(base_shape):
        raise ValueError(
            f"{name} has shape {shape} but rank {len(base_shape)} in the base shapes "
            f"{base_shape}; base_shapes must come from the same architecture at another width"
        )
    return tuple(a for a, (s, b) in enumerate(zip(shape, base_shape)) if s != b)


def width_multiplier(
    shape: Shape, base_shape: Shape, base_dim: float | None = 1, name: str = "parameter"
) -> float:
    """µP width multiplier ``w`` of one tensor: 1 unless it is hidden (two width axes)."""
    axes = width_axes(shape, base_shape, name)
    if len(axes) < 2:
        return 1.0
    if len(axes) > 2:
        raise ValueError(
            f"{name} (shape {tuple(shape)}) has {len(axes)} width axes {axes} against the base "
            f"shape {tuple(base_shape)}; µP scaling is defined for at most two"
        )
    last = axes[-1]
    denominator = base_shape[last] if base_dim is None else base_dim
    return float(shape[last]) / float(denominator)


def width_multipliers(
    shapes: Mapping[str, Shape], base_shapes: Mapping[str, Shape], base_dim: float | None = 1
) -> dict[str, float]:
    """``{name: w}`` for every tensor of ``shapes`` (names must match ``base_shapes``)."""
    if base_dim is not None and not base_dim > 0:
        raise ValueError(f"base_dim must be > 0 or None, got {base_dim!r}")
    missing = sorted(set(shapes) - set(base_shapes))
    if missing:
        raise ValueError(
            f"base_shapes has no entry for {missing}; pass the shapes of the same model built "
            "at another width, e.g. {n: p.shape for n, p in base_model.named_parameters()}"
        )
    return {n: width_multiplier(s, base_shapes[n], base_dim, n) for n, s in shapes.items()}


def update(
    theta: Mapping[str, torch.Tensor],
    state: Mapping,
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    cfg: SmallFCConfig,
    *,
    multipliers: Mapping[str, float],
    lr: float | torch.Tensor = 1.0,
    weight_decay: float = 0.0,
) -> tuple[dict[str, torch.Tensor], dict]:
    """One MuLO step: :func:`lopt.core.update` with ``lr / w`` per tensor (``w`` from
    :func:`width_multipliers`); state is small_fc_lopt's (:func:`lopt.core.init_state`)."""
    decays = core.effective_decays(theta, cfg)
    t = state["t"]
    new_params, new_tensors = {}, {}
    for name, p in params.items():
        step, new_tensors[name] = core.tensor_step(
            theta, p, grads[name], state["tensors"][name], t, cfg, decays
        )
        lr_w = lr / multipliers.get(name, 1.0)
        new_params[name] = apply_decoupled_step(p, step, lr_w, weight_decay)
    return new_params, {"t": t + 1, "tensors": new_tensors}


def _shapes_of(base: Mapping[str, Shape] | torch.nn.Module) -> dict[str, tuple[int, ...]]:
    if isinstance(base, torch.nn.Module):
        return {n: tuple(p.shape) for n, p in base.named_parameters()}
    if isinstance(base, Mapping):
        return {n: tuple(s) for n, s in base.items()}
    raise TypeError(
        "base_shapes must be a {name: shape} mapping or an nn.Module built at another width, "
        f"got {type(base).__name__}"
    )


class MuLO(SmallFCLOpt):
    r"""small_fc_lopt with µP learning rates for hidden tensors (PyLO's ``MuLO``).

    Args:
        params: ``model.named_parameters()`` (or param groups of ``(name, tensor)`` pairs): the
            names pair each tensor with its shape in ``base_shapes``.
        base_shapes: the same model at another width, as an ``nn.Module`` or ``{name: shape}``.
        weights, config, lr, weight_decay, maximize, backend, nonfinite: as
            :class:`lopt.SmallFCLOpt`
            (the µLO weights are small_fc_lopt's ``mulo`` preset).
        base_dim: divisor of the hidden fan-in (default 1: ``w = fan_in``, µLO's convention);
            ``None`` uses the base model's size (stock ``mup``).

    Each hidden tensor steps with ``lr / w`` (and decays with ``lr / w · weight_decay``);
    :attr:`width_multipliers` lists ``w`` for every parameter name.
    """

    def __init__(
        self,
        params: Iterable[tuple[str, torch.Tensor]] | Iterable[dict[str, Any]],
        base_shapes: Mapping[str, Shape] | torch.nn.Module,
        weights: WeightsSpec = None,
        config: SmallFCConfig | str | None = None,
        *,
        base_dim: float | None = 1,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        maximize: bool = False,
        backend: str = "auto",
        nonfinite: str = "skip",
    ) -> None:
        if weights is None:
            raise ValueError(
                "MuLO needs meta-weights: import µLO's checkpoint (btherien/mulo) with "
                "'python -m zoo import-pylo DIR --pylo-class MuLO --name mulo/pylo' and pass "
                "weights='mulo/pylo', or pass any small_fc_lopt weights (dict, file or zoo ref)"
            )
        super().__init__(
            params,
            weights,
            config,
            lr=lr,
            weight_decay=weight_decay,
            maximize=maximize,
            backend=backend,
            nonfinite=nonfinite,
        )
        shapes: dict[str, tuple[int, ...]] = {}
        for group in self.param_groups:
            names = group.get("param_names")
            if names is None:
                raise ValueError(
                    "MuLO needs parameter names to find each tensor's base shape: pass "
                    "model.named_parameters() (or groups of (name, tensor) pairs), not "
                    "model.parameters()"
                )
            shapes.update({n: tuple(p.shape) for n, p in zip(names, group["params"])})
        self.base_dim = base_dim
        self.width_multipliers: dict[str, float] = width_multipliers(
            shapes, _shapes_of(base_shapes), base_dim
        )

    def _update_group(self, group: dict[str, Any], work: list, *, loss: Any = None) -> None:
        """One group's step; hidden tensors use ``lr / w`` (see the class doc)."""
        by_multiplier: dict[float, list] = {}
        names = dict(zip(map(id, group["params"]), group["param_names"]))
        for item in work:
            w = self.width_multipliers[names[id(item.param)]]
            by_multiplier.setdefault(w, []).append(item)
        for w, items in by_multiplier.items():
            small_fc_step(
                items,
                self._theta_on,
                self.config,
                lr=group["lr"] / w,
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                backend=self.backend,
            )
