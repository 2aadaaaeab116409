"""lozoo learned optimizers: the small_fc_lopt functional core and its torch.optim shell."""

from . import shadowing  # noqa: F401  (first: a `zoo/` folder in the cwd must not hide our zoo)
from .config import MULO, ORIGINAL, PRESETS, SmallFCConfig, preset
from .core import (
    effective_decays,
    factored_dims,
    init_state,
    init_tensor_state,
    tensor_features,
    tensor_step,
    update,
)
from .optimizer import DEFAULT_ZOO_REF, SmallFCLOpt, resolve_weights
from .theta import (
    flatten_theta,
    init_theta,
    load_theta,
    save_theta,
    theta_sha256,
    unflatten_theta,
    validate_theta,
)

__all__ = [
    "DEFAULT_ZOO_REF",
    "MULO",
    "ORIGINAL",
    "PRESETS",
    "SmallFCConfig",
    "SmallFCLOpt",
    "effective_decays",
    "factored_dims",
    "flatten_theta",
    "init_state",
    "init_tensor_state",
    "init_theta",
    "load_theta",
    "preset",
    "resolve_weights",
    "save_theta",
    "tensor_features",
    "tensor_step",
    "theta_sha256",
    "unflatten_theta",
    "update",
    "validate_theta",
]
