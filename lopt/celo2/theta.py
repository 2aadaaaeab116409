"""θ of the Celo2 family and of ELO: init, validation and flattening (any ``theta_shapes``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import torch

Theta = dict[str, torch.Tensor]


class HasThetaShapes(Protocol):
    def theta_shapes(self) -> dict[str, tuple[int, ...]]: ...


def truncated_normal(
    shape: tuple[int, ...], std: float, generator: torch.Generator | None
) -> torch.Tensor:
    """``std·z`` with z standard normal truncated to [-2, 2], no variance re-correction."""
    sample = torch.randn(shape, generator=generator)
    bad = sample.abs() > 2.0
    while bad.any():
        sample[bad] = torch.randn(int(bad.sum()), generator=generator)
        bad = sample.abs() > 2.0
    return sample * std


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
            theta[key] = truncated_normal(shape, 1.0 / math.sqrt(fan_in), generator)
        else:
            theta[key] = torch.zeros(shape, dtype=torch.float32)
    return theta


def validate_theta(theta: Mapping[str, torch.Tensor], cfg: HasThetaShapes, what: str) -> Theta:
    """Check θ's keys, shapes and finiteness; return float32 tensors."""
    if not isinstance(theta, Mapping):
        raise TypeError(
            f"{what} meta-weights must be a dict of tensors, got {type(theta).__name__}"
        )
    expected = cfg.theta_shapes()
    missing = sorted(set(expected) - set(theta))
    extra = sorted(set(theta) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{what} meta-weights: missing keys {missing}, unexpected keys {extra}; "
            f"expected {list(expected)}"
        )
    out: Theta = {}
    for key, shape in expected.items():
        value = theta[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{what} meta-weight {key!r} must be a tensor, got {type(value).__name__}"
            )
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{what} meta-weight {key!r} has shape {tuple(value.shape)}, expected {shape}"
            )
        if not torch.isfinite(value).all():
            raise ValueError(f"{what} meta-weight {key!r} contains NaN or inf")
        out[key] = value.detach().to(torch.float32)
    return out


def flatten_theta(theta: Mapping[str, torch.Tensor], cfg: HasThetaShapes) -> torch.Tensor:
    """θ as one vector in ``theta_shapes`` order (row-major)."""
    return torch.cat([theta[k].reshape(-1) for k in cfg.theta_shapes()])


def unflatten_theta(flat: torch.Tensor, cfg: HasThetaShapes) -> Theta:
    """Views of ``flat`` with θ's keys and shapes (autograd and vmap see through them)."""
    theta: Theta = {}
    offset = 0
    for key, shape in cfg.theta_shapes().items():
        n = math.prod(shape)
        theta[key] = flat[..., offset : offset + n].reshape(*flat.shape[:-1], *shape)
        offset += n
    if offset != flat.shape[-1]:
        raise ValueError(f"flat θ has {flat.shape[-1]} entries, the config needs {offset}")
    return theta
