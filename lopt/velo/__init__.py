"""VeLO (Metz et al. 2022): per-tensor LSTM + hypernetwork over per-element MLP banks.

Functional core in :mod:`lopt.velo.core`, ``torch.optim`` shell :class:`VeLO`. Design notes,
the exact step and the lr / weight-decay conventions: docs/design/velo.md.
"""

from .config import VELO, VeLOConfig
from .core import (
    MissingInputError,
    compute_steps,
    factored_dims,
    init_state,
    init_tensor_state,
    update,
)
from .optimizer import VeLO
from .theta import init_theta, validate_theta

__all__ = [
    "VELO",
    "MissingInputError",
    "VeLO",
    "VeLOConfig",
    "compute_steps",
    "factored_dims",
    "init_state",
    "init_tensor_state",
    "init_theta",
    "update",
    "validate_theta",
]
