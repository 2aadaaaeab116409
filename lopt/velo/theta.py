"""VeLO's meta-parameters θ: random init (keys: :meth:`VeLOConfig.theta_shapes`).

Validation is :func:`lopt.architecture.validate_theta`, re-exported here.
"""

from __future__ import annotations

import math

import torch

from ..architecture import Theta, validate_theta
from ..theta import trunc_normal
from .config import VeLOConfig

__all__ = ["init_theta", "validate_theta"]


def init_theta(cfg: VeLOConfig, generator: torch.Generator | None = None) -> Theta:
    """A random θ in float32, for tests and meta-training from scratch (not the published VeLO).

    Linear weights and every bank are truncated normals with std ``1/sqrt(fan_in)`` (cut at ±2
    std, as Haiku initialises); biases and the learned initial LSTM state are zero.
    """
    theta: Theta = {}
    for key, shape in cfg.theta_shapes().items():
        if key.endswith("_w") or key.startswith("bank_w"):
            fan_in = shape[-2]
            theta[key] = trunc_normal(torch.empty(shape), 1.0 / math.sqrt(fan_in), generator)
        else:
            theta[key] = torch.zeros(shape, dtype=torch.float32)
    return theta
