"""θ of the Celo2 family and of ELO: random init (any ``theta_shapes``).

Validation and flattening are the same for every architecture: :mod:`lopt.architecture` has them,
re-exported here for existing imports.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from ..architecture import Theta, flatten_theta, unflatten_theta, validate_theta
from ..theta import trunc_normal

__all__ = ["flatten_theta", "init_mlp_theta", "unflatten_theta", "validate_theta"]


class HasThetaShapes(Protocol):
    def theta_shapes(self) -> dict[str, tuple[int, ...]]: ...


def init_mlp_theta(
    cfg: HasThetaShapes, first_fan_in: int, generator: torch.Generator | None = None
) -> Theta:
    """Weights ``w*`` ~ truncated normal with std 1/sqrt(fan_in), biases zero (float32).

    ``first_fan_in`` is the fan-in used for ``w0`` (Celo2 initialises all 30 first-layer rows
    with 1/sqrt(30), even though tensors of rank <= 1 only read 15 of them).
    """
    theta: Theta = {}
    for key, shape in cfg.theta_shapes().items():
        if key.startswith("w"):
            fan_in = first_fan_in if key == "w0" else shape[0]
            theta[key] = trunc_normal(torch.empty(shape), 1.0 / math.sqrt(fan_in), generator)
        else:
            theta[key] = torch.zeros(shape, dtype=torch.float32)
    return theta
