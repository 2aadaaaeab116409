"""mlp_lopt: learned_optimization's ``MLPLOpt`` (LOLv2), a per-parameter MLP without second moments.

Every element of a parameter tensor is stepped by one small MLP (shared by all elements and
tensors) whose inputs are the gradient, the parameter, six momenta and an embedding of the step
counter (docs/design/mlp_lopt.md)::

    m_k ← β_k·m_k + (1 − β_k)·g                     β = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
    x   = [g, p, m_1..m_6] · rsqrt(1e-5 + mean over the tensor of x²)   (per channel, 8)
    [d, e] = MLP([x, tanh(t/τ − 1) for τ in 1, 3, …, 1e5])                  (19 → h → … → 2)
    step = step_mult · d · exp(exp_mult · e);   p ← p·(1 − lr·wd) − lr·step

The decays are fixed (not meta-learned), the counter ``t`` is the pre-increment value, and no
bias correction is applied anywhere. θ is the MLP alone: ``w0 (19, h), b0 (h,), …, wL (h, 2)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from . import core
from .architecture import Architecture, ConfigMixin, Theta, register_architecture
from .config import TIME_SCALES
from .functional import apply_decoupled_step
from .shell import LearnedOptimizer
from .theta import trunc_normal

MOMENTUM_DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
NUM_TIME_FEATURES = len(TIME_SCALES)


@dataclass(frozen=True)
class MLPLOptConfig(ConfigMixin):
    """Architecture of an mlp_lopt optimizer (learned_optimization's defaults).

    ``hidden_layers`` counts hidden layers as the reference does (``[h] * hidden_layers + [2]``).
    """

    architecture: ClassVar[str] = "mlp_lopt"
    hidden_size: int = 32
    hidden_layers: int = 2
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    momentum_decays: tuple[float, ...] = MOMENTUM_DECAYS

    def __post_init__(self) -> None:
        for name in ("hidden_size", "hidden_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("step_mult", "exp_mult"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite float, got {value!r}")
        decays = tuple(float(d) for d in self.momentum_decays)
        if not decays or not all(0.0 <= d < 1.0 for d in decays):
            raise ValueError(f"momentum_decays must be decays in [0, 1), got {decays!r}")
        object.__setattr__(self, "momentum_decays", decays)

    @property
    def num_element_features(self) -> int:
        """Normalised per-element inputs: gradient, parameter and one per momentum decay."""
        return 2 + len(self.momentum_decays)

    def layer_sizes(self) -> list[tuple[int, int]]:
        """(fan_in, fan_out) of each weight matrix, in order w0, w1, ..."""
        inputs = self.num_element_features + NUM_TIME_FEATURES
        dims = [inputs] + [self.hidden_size] * self.hidden_layers + [2]
        return list(zip(dims[:-1], dims[1:]))

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        """Keys and shapes of θ; weights are (in, out) as in the reference."""
        shapes: dict[str, tuple[int, ...]] = {}
        for k, (fan_in, fan_out) in enumerate(self.layer_sizes()):
            shapes[f"w{k}"] = (fan_in, fan_out)
            shapes[f"b{k}"] = (fan_out,)
        return shapes


REFERENCE = MLPLOptConfig()
"""learned_optimization's defaults: 19 → 32 → 32 → 2, step_mult and exp_mult 1e-3 (1,762 θ)."""
SMALL = MLPLOptConfig(hidden_size=8)
"""A narrow variant (19 → 8 → 8 → 2, 250 θ) for quick meta-training on CPU."""
PRESETS: dict[str, MLPLOptConfig] = {"lolv2": REFERENCE, "lolv2_small": SMALL}


def init_theta(cfg: MLPLOptConfig, generator: torch.Generator | None = None) -> Theta:
    """Fresh θ as Haiku's MLP initialises it: weights truncated normal (±2 std) with std
    ``1/sqrt(fan_in)``, biases zero."""
    theta: Theta = {}
    for key, shape in cfg.theta_shapes().items():
        if key.startswith("w"):
            std = 1.0 / math.sqrt(shape[0])
            theta[key] = trunc_normal(torch.empty(shape, dtype=torch.float32), std, generator)
        else:
            theta[key] = torch.zeros(shape, dtype=torch.float32)
    return theta


def init_tensor_state(param: torch.Tensor, cfg: MLPLOptConfig) -> dict[str, torch.Tensor]:
    """Zero momenta ``m`` of shape S+(6,) (a scalar is stored with S = (1,))."""
    shape = tuple(param.shape) or (1,)
    m = torch.zeros(shape + (len(cfg.momentum_decays),), dtype=torch.float32, device=param.device)
    return {"m": m}


def init_state(params: Mapping[str, torch.Tensor], cfg: MLPLOptConfig) -> dict:
    """``{"t": 0-d float32, "tensors": {name: init_tensor_state(p)}}``."""
    device = next(iter(params.values())).device if params else None
    return {
        "t": torch.zeros((), dtype=torch.float32, device=device),
        "tensors": {name: init_tensor_state(p, cfg) for name, p in params.items()},
    }


def tensor_step(
    theta: Mapping[str, torch.Tensor],
    param: torch.Tensor,
    grad: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    t: torch.Tensor | float,
    cfg: MLPLOptConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The learned step of one tensor: ``(step, new_state)`` with ``p_new = p − step``."""
    scalar = param.dim() == 0
    if scalar:  # the per-tensor normaliser needs an element axis
        param, grad = param.reshape(1), grad.reshape(1)
    g = grad.unsqueeze(-1)
    betas = torch.tensor(cfg.momentum_decays, dtype=g.dtype, device=g.device)
    m = core.ema(betas, state["m"], g)
    features = torch.cat([g, param.unsqueeze(-1), m], dim=-1)
    # Normalisation and the constant time features are folded into the first layer (exact up
    # to rounding), as in small_fc_lopt: no per-element work on 11 constant channels.
    scale = core.feature_scale(features)
    w0, b0 = core.first_layer(theta, scale, t, cfg.num_element_features)
    out = core.mlp_outputs(theta, features, w0, b0, len(cfg.layer_sizes()))
    step = core.step_from_outputs(out, cfg)
    return (step.reshape(()) if scalar else step), {"m": m}


def update(
    theta: Mapping[str, torch.Tensor],
    state: Mapping,
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    cfg: MLPLOptConfig,
    *,
    lr: float | torch.Tensor = 1.0,
    weight_decay: float = 0.0,
    loss: torch.Tensor | None = None,
    num_steps: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """One mlp_lopt step over a dict of parameters (the module doc's math).

    Pure and differentiable in θ, ``vmap``-able over θ, params, grads and state. ``loss`` and
    ``num_steps`` are not inputs of mlp_lopt (its notion of progress is ``t``).
    """
    del loss, num_steps
    t = state["t"]
    new_params: dict[str, torch.Tensor] = {}
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in params.items():
        step, tensors[name] = tensor_step(theta, p, grads[name], state["tensors"][name], t, cfg)
        new_params[name] = apply_decoupled_step(p, step, lr, weight_decay)
    return new_params, {"t": t + 1, "tensors": tensors}


class MLPLOpt(LearnedOptimizer):
    r"""learned_optimization's MLPLOpt as a ``torch.optim`` optimizer.

    ``p ← p·(1 − lr·weight_decay) − lr · step_mult · d · exp(exp_mult · e)`` with ``(d, e)`` the
    per-element MLP's outputs (see :mod:`lopt.mlp_lopt`). Arguments as
    :class:`lopt.LearnedOptimizer`; ``weights`` is required (e.g. ``"mlp_lopt/quick"`` after
    ``python -m metatrain --lopt mlp_lopt --quick --publish mlp_lopt/quick``).
    """

    architecture: ClassVar[str] = "mlp_lopt"


def summary(cfg: MLPLOptConfig) -> str:
    widths = "→".join(str(n) for n in (cfg.layer_sizes()[0][0], *[cfg.hidden_size] *
                                       cfg.hidden_layers, 2))  # fmt: skip
    return (
        f"An mlp_lopt learned optimizer (learned_optimization's MLPLOpt): MLP {widths} on "
        f"gradient, parameter and {len(cfg.momentum_decays)} momenta, step_mult "
        f"{cfg.step_mult:g}, {cfg.num_params:,} meta-parameters."
    )


MLP_LOPT: Architecture = register_architecture(
    Architecture(
        name="mlp_lopt",
        config_class=MLPLOptConfig,
        init_theta=init_theta,
        init_state=init_state,
        init_tensor_state=init_tensor_state,
        update=update,
        optimizer=MLPLOpt,
        presets=PRESETS,
        default_preset="lolv2",
        summary=summary,
        description="learned_optimization's MLPLOpt (LOLv2): per-parameter MLP, momenta only",
    )
)

__all__: list[Any] = [
    "MLPLOpt",
    "MLPLOptConfig",
    "MLP_LOPT",
    "MOMENTUM_DECAYS",
    "PRESETS",
    "REFERENCE",
    "SMALL",
    "init_state",
    "init_tensor_state",
    "init_theta",
    "tensor_step",
    "update",
]
