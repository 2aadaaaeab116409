"""VeLO's meta-parameters θ: random init and validation (keys: :meth:`VeLOConfig.theta_shapes`)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..theta import _trunc_normal
from .config import VeLOConfig

Theta = dict[str, torch.Tensor]


def init_theta(cfg: VeLOConfig, generator: torch.Generator | None = None) -> Theta:
    """A random θ in float32, for tests and meta-training from scratch (not the published VeLO).

    Linear weights and every bank are truncated normals with std ``1/sqrt(fan_in)`` (cut at ±2
    std, as Haiku initialises); biases and the learned initial LSTM state are zero.
    """
    theta: Theta = {}
    for key, shape in cfg.theta_shapes().items():
        if key.endswith("_w") or key.startswith("bank_w"):
            fan_in = shape[-2]
            theta[key] = _trunc_normal(torch.empty(shape), 1.0 / math.sqrt(fan_in), generator)
        else:
            theta[key] = torch.zeros(shape, dtype=torch.float32)
    return theta


def validate_theta(theta: Mapping[str, torch.Tensor], cfg: VeLOConfig) -> Theta:
    """Check keys, shapes and finiteness of θ against ``cfg``; return float32 tensors."""
    if not isinstance(theta, Mapping):
        raise TypeError(f"VeLO meta-weights must be a dict of tensors, got {type(theta).__name__}")
    expected = cfg.theta_shapes()
    missing, extra = sorted(set(expected) - set(theta)), sorted(set(theta) - set(expected))
    if missing or extra:
        raise ValueError(
            f"VeLO meta-weights do not match the config: missing keys {missing}, unexpected "
            f"keys {extra}"
        )
    out: Theta = {}
    for key, shape in expected.items():
        value = theta[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"meta-weight {key!r} must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            raise ValueError(
                f"VeLO meta-weight {key!r} has shape {tuple(value.shape)} but the config needs "
                f"{shape}; pass the VeLOConfig the weights were trained with"
            )
        if not torch.isfinite(value).all():
            raise ValueError(f"meta-weight {key!r} contains NaN or inf")
        out[key] = value.detach().to(torch.float32)
    return out
