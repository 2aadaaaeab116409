"""``lopt.SmallFCLOpt``: small_fc_lopt as a drop-in ``torch.optim.Optimizer``.

A thin shell over :mod:`lopt.core` on the shared base :class:`lopt.LearnedOptimizer`, which owns
weights, hyper-parameters, param groups, lazy fp32 state and ``state_dict`` resume. This module
adds what is particular to small_fc_lopt: the default zoo entry and the fused kernels
(:mod:`lopt.kernels`) that compute each tensor's step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from . import core, kernels
from .architecture import Theta
from .config import SmallFCConfig
from .shell import LearnedOptimizer, TensorWork, check_hyper
from .weights import WeightsSpec
from .weights import resolve_weights as _resolve_any

DEFAULT_ZOO_REF = "small_fc_lopt/mlp_mnist"

_check_hyper = check_hyper  # the pre-seam name, still imported by other shells


def resolve_weights(
    weights: WeightsSpec, config: SmallFCConfig | str | None
) -> tuple[Theta, SmallFCConfig, dict[str, str]]:
    """``(θ, config, source info)`` of small_fc_lopt meta-weights (see :func:`lopt.weights.
    resolve_weights`); ``None`` means the default zoo entry :data:`DEFAULT_ZOO_REF`."""
    found = _resolve_any(
        weights,
        config,
        architecture="small_fc_lopt",
        default_ref=DEFAULT_ZOO_REF,
        owner="SmallFCLOpt",
    )
    return found.theta, found.config, found.info


class SmallFCLOpt(LearnedOptimizer):
    r"""The small_fc_lopt learned optimizer (Metz et al. 2022, arXiv 2203.11860).

    Each parameter tensor is updated by a tiny per-element MLP fed with momentum, RMS and
    Adafactor features (design: ``docs/design/small_fc_lopt.md``)::

        p ← p·(1 − lr·weight_decay) − lr · step_mult · d · exp(exp_mult · m)

    Args:
        params: iterable of tensors or of param-group dicts.
        weights: meta-weights θ: a dict of tensors, a ``.safetensors`` path, or a zoo reference
            (``"small_fc_lopt/mlp_mnist"``, ``"name:1.0.0"``). ``None`` loads the default zoo
            entry :data:`DEFAULT_ZOO_REF`.
        config: the :class:`SmallFCConfig` (or preset name) θ was trained with. Files and zoo
            entries carry their own config; for a dict it defaults to the preset whose shapes
            match.
        lr: multiplier of the learned step (default 1.0), so every ``lr_scheduler`` works.
        weight_decay: decoupled (AdamW-style) weight decay, applied as ``p·(1 − lr·wd)``.
        maximize: maximise the objective instead of minimising it.
        num_steps: accepted like every learned optimizer's; small_fc_lopt ignores it.
        backend: ``"auto"`` (default: the compiled kernel of each parameter's device when it is
            available, else the pure-torch backend with a one-time warning), ``"torch"``,
            ``"cpp"`` (compiled CPU kernel) or ``"cuda"`` (compiled CUDA kernel); see
            :mod:`lopt.kernels.dispatch`. It is not part of the state: a checkpoint saved with
            one backend resumes with any other.
        nonfinite: ``"skip"`` (default) or ``"raise"``: what a gradient holding NaN or ±inf
            does, the same on every backend (see :class:`lopt.LearnedOptimizer`).

    Meta-weights are shared by all parameters and are not optimizer state: ``state_dict()``
    records their sha256 and source, not the tensors.
    """

    architecture: ClassVar[str] = "small_fc_lopt"
    default_weights: ClassVar[str | None] = DEFAULT_ZOO_REF
    config: SmallFCConfig

    @classmethod
    def check_backend(cls, backend: str) -> str:
        return kernels.check_backend(backend)

    def _update_group(
        self, group: dict[str, Any], work: list[TensorWork], *, loss: Any = None
    ) -> None:
        small_fc_step(
            work,
            self._theta_on,
            self.config,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            backend=self.backend,
        )


def small_fc_step(
    work: list[tuple[torch.Tensor, torch.Tensor, dict]],
    theta_on: Callable[[torch.device], Theta],
    cfg: SmallFCConfig,
    *,
    lr: float,
    weight_decay: float,
    maximize: bool,
    backend: str = "auto",
) -> None:
    """Functional routine behind :meth:`SmallFCLOpt.step`: updates params and state in place.

    Each tensor is stepped by the ``lozoo::small_fc_step_`` op of the chosen backend (see
    :mod:`lopt.kernels`): float32 math and state whatever the parameter dtype, the state tensors
    updated in place, then ``p ← p·(1 − lr·wd) − lr·step`` written back in the parameter's dtype.
    """
    prepared: dict[torch.device, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    for p, grad, state in work:
        if p.device not in prepared:
            prepared[p.device] = kernels.theta_args(theta_on(p.device), cfg)
        decays, layers = prepared[p.device]
        d1, d0 = core.factored_dims(p.shape, cfg.tie_break) or (-1, -1)
        step_fn = kernels.step_function(backend, p.device)
        # The op updates a contiguous tensor in place; e.g. a channels_last conv weight is
        # stepped in a contiguous copy and copied back.
        target = p if p.is_contiguous() else p.contiguous()
        step_fn(
            target, grad, state["m"], state["v"], state.get("r"), state.get("c"), state.get("vd"),
            decays, layers, d1, d0, float(state["step"]), lr, weight_decay, cfg.step_mult,
            cfg.exp_mult, maximize,
        )  # fmt: skip
        if target is not p:
            p.copy_(target)
        state["step"] += 1
