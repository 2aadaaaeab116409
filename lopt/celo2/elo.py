"""ELO: PyLO's Adafactor-MLP learned optimizer at inference (design: docs/design/celo2.md).

ELO is small_fc_lopt's per-element rule (28 normalised Adafactor/momentum features + 11 tanh
time features → h → h → 2, ``d·exp(exp_mult·m)``) with fixed decays (no decay offsets in θ), a
32-unit MLP and an external learning rate. It has no Newton–Schulz and no output normalisation.
The per-tensor math is :mod:`lopt.core`'s; this module only fixes the configuration and θ.

Step: ``p ← p·(1 − lr·wd) − lr·step_mult·d·exp(exp_mult·m)``; ``lr = 1`` is PyLO's peak
``step_mult = 1e-3``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import core as small_fc_core
from ..architecture import ConfigMixin
from ..config import DECAYS_SPEC, NUM_FEATURES, SmallFCConfig, TieBreak, normalise_decays
from ..functional import apply_decoupled_step

TensorState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class EloConfig(ConfigMixin):
    """ELO's fixed configuration. ``tie_break`` as in small_fc_lopt ("first": the reference
    rule on PyTorch-layout tensors; "last": the rule on the tensor as stored, like PyLO)."""

    architecture: ClassVar[str] = "elo"
    config_label: ClassVar[str] = "ELO"

    hidden_size: int = 32
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    momentum_decays: tuple[float, float, float] = (0.9, 0.99, 0.999)
    rms_decays: tuple[float] = (0.999,)
    adafactor_decays: tuple[float, float, float] = (0.9, 0.99, 0.999)
    tie_break: TieBreak = "first"

    def __post_init__(self) -> None:
        if isinstance(self.hidden_size, bool) or not isinstance(self.hidden_size, int):
            raise ValueError(f"hidden_size must be a positive int, got {self.hidden_size!r}")
        if self.hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {self.hidden_size!r}")
        for name in ("step_mult", "exp_mult"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a finite float, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite float, got {value!r}")
            object.__setattr__(self, name, float(value))
        normalise_decays(self, DECAYS_SPEC)
        if self.tie_break not in ("first", "last"):
            raise ValueError(f"tie_break must be 'first' or 'last', got {self.tie_break!r}")

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        """``w0`` (39, h), ``b0``, ``w1`` (h, h), ``b1``, ``w2`` (h, 2), ``b2``; (in, out)."""
        h = self.hidden_size
        return {"w0": (NUM_FEATURES, h), "b0": (h,), "w1": (h, h), "b1": (h,), "w2": (h, 2),
                "b2": (2,)}  # fmt: skip

    def small_fc_config(self) -> SmallFCConfig:
        """The small_fc_lopt configuration whose per-tensor math ELO runs."""
        return SmallFCConfig(
            hidden_size=self.hidden_size,
            hidden_layers=2,
            step_mult=self.step_mult,
            exp_mult=self.exp_mult,
            initial_momentum_decays=self.momentum_decays,
            initial_rms_decays=self.rms_decays,
            initial_adafactor_decays=self.adafactor_decays,
            tie_break=self.tie_break,
        )

    def decays(self, like: torch.Tensor) -> small_fc_core.Decays:
        """The raw decays as tensors (ELO uses them directly, no reparameterisation)."""
        return tuple(
            torch.tensor(d, dtype=torch.float32, device=like.device)
            for d in (self.momentum_decays, self.rms_decays, self.adafactor_decays)
        )


ELO = EloConfig()


def init_tensor_state(param: torch.Tensor, cfg: EloConfig) -> TensorState:
    """small_fc_lopt's zero state (``m``, ``v`` and ``r``/``c`` or ``vd``) for one tensor."""
    return small_fc_core.init_tensor_state(param, cfg.small_fc_config())


def init_state(params: Mapping[str, torch.Tensor], cfg: EloConfig) -> dict:
    return small_fc_core.init_state(params, cfg.small_fc_config())


def update(
    theta: Mapping[str, torch.Tensor],
    state: Mapping,
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    cfg: EloConfig,
    *,
    lr: float | torch.Tensor = 1.0,
    weight_decay: float | torch.Tensor = 0.0,
    loss: torch.Tensor | None = None,
    num_steps: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """One ELO step: ``p·(1 − lr·wd) − lr·step``; the time features read the pre-step count."""
    del loss, num_steps
    sfc = cfg.small_fc_config()
    t = state["t"]
    new_params: dict[str, torch.Tensor] = {}
    new_tensors: dict[str, TensorState] = {}
    decays = None
    for name, p in params.items():
        decays = decays or cfg.decays(p)
        step, new_tensors[name] = small_fc_core.tensor_step(
            theta, p, grads[name], state["tensors"][name], t, sfc, decays
        )
        new_params[name] = apply_decoupled_step(p, step, lr, weight_decay)
    return new_params, {"t": t + 1, "tensors": new_tensors}
