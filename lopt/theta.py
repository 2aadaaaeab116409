"""small_fc_lopt's meta-parameters θ: their initialisation.

θ is a plain ``dict[str, Tensor]`` (keys from :meth:`SmallFCConfig.theta_shapes`). What is the
same for every architecture — validation, flattening to the meta-trainer's vector (views, so
``vmap`` and autograd see through them), hashing and safetensors I/O — lives in
:mod:`lopt.architecture` and :mod:`lopt.weights` and is re-exported here for existing imports.
"""

from __future__ import annotations

import math

import torch

from .architecture import Theta, flatten_theta, theta_sha256, unflatten_theta, validate_theta
from .config import DECAY_KEYS, SmallFCConfig
from .weights import load_theta, save_theta

__all__ = [
    "Theta",
    "flatten_theta",
    "init_theta",
    "trunc_normal",
    "load_theta",
    "save_theta",
    "theta_sha256",
    "unflatten_theta",
    "validate_theta",
]


def init_theta(cfg: SmallFCConfig, generator: torch.Generator | None = None) -> Theta:
    """Fresh θ as in the reference (docs/design/small_fc_lopt.md §3).

    Weights: truncated normal with std ``1/sqrt(fan_in)`` truncated at ±2 std (absolute bounds,
    no variance correction, like Haiku's ``TruncatedNormal``). Biases zero. Decay offsets zero,
    or the config's ``init_decay_offsets`` (the µLO preset fixes them).
    """
    theta: Theta = {}
    for key, shape in cfg.theta_shapes().items():
        if key in DECAY_KEYS:
            values = cfg.init_decay_offsets.get(key, (0.0,) * shape[0])
            theta[key] = torch.tensor(values, dtype=torch.float32)
        elif key.startswith("w"):
            std = 1.0 / math.sqrt(shape[0])
            w = torch.empty(shape, dtype=torch.float32)
            # trunc_normal_ takes no generator: draw normals and resample the tails instead.
            theta[key] = trunc_normal(w, std, generator)
        else:
            theta[key] = torch.zeros(shape, dtype=torch.float32)
    return theta


def trunc_normal(out: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """Fill ``out`` with ``std·z``, z standard normal truncated to ±2 (Haiku's TruncatedNormal
    with absolute bounds and no variance correction), drawn from ``generator``."""
    sample = torch.randn(out.shape, generator=generator)
    bad = sample.abs() > 2.0
    while bad.any():
        sample[bad] = torch.randn(int(bad.sum()), generator=generator)
        bad = sample.abs() > 2.0
    return out.copy_(sample * std)
