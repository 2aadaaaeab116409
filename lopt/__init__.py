"""lozoo learned optimizers: the architecture registry, its architectures and their shells.

Every architecture registers itself with :func:`register_architecture` (see
:mod:`lopt.architecture`, docs/design/architecture.md). ``lopt.init_theta``, ``init_state``,
``init_tensor_state`` and ``update`` dispatch on the config's architecture, so they work for any
of them; small_fc_lopt's own functions are in :mod:`lopt.core` and :mod:`lopt.theta`.
"""

from . import shadowing  # noqa: F401  (first: a `zoo/` folder in the cwd must not hide our zoo)
from .architecture import (
    Architecture,
    ConfigMixin,
    UnknownArchitectureError,
    architecture_names,
    architecture_of,
    config_from_dict,
    flatten_theta,
    get_architecture,
    init_state,
    init_tensor_state,
    init_theta,
    register_architecture,
    resolve_config,
    theta_sha256,
    unflatten_theta,
    unregister_architecture,
    update,
    validate_theta,
)
from .config import MULO, ORIGINAL, PRESETS, SmallFCConfig, preset
from .core import effective_decays, factored_dims, tensor_features, tensor_step
from .nonfinite import NonFiniteGradientError, guarded_update
from .optimizer import DEFAULT_ZOO_REF, SmallFCLOpt, resolve_weights
from .shell import LearnedOptimizer, make_optimizer
from .small_fc import SMALL_FC_LOPT
from .weights import ResolvedWeights, load_theta, register_ref_resolver, save_theta

# Architectures beyond small_fc_lopt register themselves on import (after the seam above).
from .mlp_lopt import MLPLOpt, MLPLOptConfig  # noqa: E402  isort: skip
from .mulo import MuLO  # noqa: E402  isort: skip
from .velo import VeLO, VeLOConfig  # noqa: E402  isort: skip

__all__ = [
    "MLPLOpt",
    "MLPLOptConfig",
    "MuLO",
    "VeLO",
    "VeLOConfig",
    "DEFAULT_ZOO_REF",
    "MULO",
    "ORIGINAL",
    "PRESETS",
    "SMALL_FC_LOPT",
    "Architecture",
    "ConfigMixin",
    "LearnedOptimizer",
    "NonFiniteGradientError",
    "ResolvedWeights",
    "SmallFCConfig",
    "SmallFCLOpt",
    "UnknownArchitectureError",
    "architecture_names",
    "celo2",
    "architecture_of",
    "config_from_dict",
    "effective_decays",
    "factored_dims",
    "flatten_theta",
    "get_architecture",
    "guarded_update",
    "init_state",
    "init_tensor_state",
    "init_theta",
    "load_theta",
    "make_optimizer",
    "preset",
    "register_architecture",
    "register_ref_resolver",
    "resolve_config",
    "resolve_weights",
    "save_theta",
    "tensor_features",
    "tensor_step",
    "theta_sha256",
    "unflatten_theta",
    "unregister_architecture",
    "update",
    "validate_theta",
]

# Registers celo2, celo2_base, pylo_celo2, elo_celo2 and elo (after the seam it builds on).
from . import celo2  # noqa: E402
