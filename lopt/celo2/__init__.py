"""The Celo2 family (celo2, celo2_base, pylo_celo2, elo_celo2) and ELO.

Design and layout decisions: docs/design/celo2.md.
"""

from __future__ import annotations

import torch

from . import core, elo
from .config import (
    CELO2,
    CELO2_BASE,
    ELO_CELO2,
    NUM_CHANNELS,
    PYLO_CELO2,
    VARIANTS,
    Celo2BaseConfig,
    Celo2Config,
    EloCelo2Config,
    PyloCelo2Config,
)
from .core import init_state, init_tensor_state, newton_schulz, routes_to_adam, update
from .elo import ELO, EloConfig
from .theta import flatten_theta, init_mlp_theta, unflatten_theta, validate_theta


def init_theta(cfg: Celo2Config, generator: torch.Generator | None = None) -> dict:
    """Fresh Celo2 θ (float32): every weight std·z, z normal truncated to ±2, std 1/sqrt(fan_in)
    with fan-in 30 for all of ``w0``; biases zero."""
    return init_mlp_theta(cfg, NUM_CHANNELS, generator)


def init_elo_theta(cfg: EloConfig, generator: torch.Generator | None = None) -> dict:
    """Fresh ELO θ (float32), initialised like small_fc_lopt's MLP."""
    return init_mlp_theta(cfg, cfg.theta_shapes()["w0"][0], generator)


__all__ = [
    "CELO2",
    "CELO2_BASE",
    "ELO",
    "ELO_CELO2",
    "PYLO_CELO2",
    "VARIANTS",
    "Celo2BaseConfig",
    "Celo2Config",
    "EloCelo2Config",
    "PyloCelo2Config",
    "EloConfig",
    "core",
    "elo",
    "flatten_theta",
    "init_elo_theta",
    "init_state",
    "init_tensor_state",
    "init_theta",
    "newton_schulz",
    "routes_to_adam",
    "unflatten_theta",
    "update",
    "validate_theta",
]
