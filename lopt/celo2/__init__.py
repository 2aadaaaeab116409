"""The Celo2 family (celo2, celo2_base, pylo_celo2, elo_celo2) and ELO.

Design and layout decisions: docs/design/celo2.md.
"""

from __future__ import annotations

from . import core, elo
from .config import (
    CELO2,
    CELO2_BASE,
    ELO_CELO2,
    PYLO_CELO2,
    VARIANTS,
    Celo2BaseConfig,
    Celo2Config,
    EloCelo2Config,
    PyloCelo2Config,
)
from .core import init_state, init_tensor_state, newton_schulz, routes_to_adam, update
from .elo import ELO, EloConfig
from .optimizer import Celo2, Celo2Base, Elo, EloCelo2, PyloCelo2
from .registry import ARCHITECTURES, init_elo_theta, init_theta
from .theta import flatten_theta, unflatten_theta, validate_theta

__all__ = [
    "ARCHITECTURES",
    "CELO2",
    "CELO2_BASE",
    "ELO",
    "ELO_CELO2",
    "PYLO_CELO2",
    "VARIANTS",
    "Celo2",
    "Celo2Base",
    "Celo2BaseConfig",
    "Celo2Config",
    "Elo",
    "EloCelo2",
    "EloCelo2Config",
    "PyloCelo2",
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
