"""PyLO's CELO2 / ELO_CELO2 (``CELO2MLP``) and ELO (``MetaMLP``) checkpoints → lozoo θ.

Key mapping (docs/design/celo2.md has the full table)::

    CELO2MLP  w0.0 … w0.13 (f_i, 8), stacked row-wise by integer suffix -> w0 (30, 8)
              b0 (8)                                                   -> b0
              dense_w.0 (8, 8) / dense_b.0                             -> w1 / b1
              dense_w.1 (8, 3) / dense_b.1                             -> w2 / b2
    (no transposition: CELO2MLP already stores (in, out) and computes x @ w)

    MetaMLP   network.input / linear_0 / output .weight (out, in)      -> w0 / w1 / w2, transposed
              … .bias                                                  -> b0 / b1 / b2
"""

from __future__ import annotations

import re

import torch

from lopt.celo2.config import GROUP_WIDTHS, HIDDEN_SIZE, NUM_OUTPUTS

from .pylo_velo import LayoutError

_W0 = re.compile(r"w0\.(\d+)")
CELO2_CONFIG = {
    "activation": "relu",
    "feature_dims": list(GROUP_WIDTHS),
    "hidden_layers": 2,
    "hidden_size": HIDDEN_SIZE,
    "output_size": NUM_OUTPUTS,
}
"""What ``PyTorchModelHubMixin`` records for the published CELO2MLP (the only supported shape)."""


def is_celo2_mlp(keys: set[str]) -> bool:
    return "w0.0" in keys and "dense_w.0" in keys


def _check(key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(tensor.shape) != shape:
        raise LayoutError(f"CELO2MLP {key} has shape {tuple(tensor.shape)}, expected {shape}")
    if not tensor.is_floating_point():
        raise LayoutError(f"CELO2MLP {key} is {tensor.dtype}, not floating point")
    return tensor.to(torch.float32)


def celo2_theta_from_pylo(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Celo2 θ from a CELO2MLP state dict (30-8-8-3, the architecture PyLO ships)."""
    groups = len(GROUP_WIDTHS)
    expected = {f"w0.{i}" for i in range(groups)} | {"b0"}
    expected |= {"dense_w.0", "dense_b.0", "dense_w.1", "dense_b.1"}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise LayoutError(
            f"not the published CELO2MLP (14 first-layer groups, 8-8-3): missing keys {missing}, "
            f"unexpected keys {extra}"
        )
    # by integer suffix: "w0.10" sorts before "w0.2" as a string
    w0 = [_check(f"w0.{i}", tensors[f"w0.{i}"], (width, HIDDEN_SIZE))
          for i, width in enumerate(GROUP_WIDTHS)]  # fmt: skip
    return {
        "w0": torch.cat(w0, dim=0),
        "b0": _check("b0", tensors["b0"], (HIDDEN_SIZE,)),
        "w1": _check("dense_w.0", tensors["dense_w.0"], (HIDDEN_SIZE, HIDDEN_SIZE)),
        "b1": _check("dense_b.0", tensors["dense_b.0"], (HIDDEN_SIZE,)),
        "w2": _check("dense_w.1", tensors["dense_w.1"], (HIDDEN_SIZE, NUM_OUTPUTS)),
        "b2": _check("dense_b.1", tensors["dense_b.1"], (NUM_OUTPUTS,)),
    }


def celo2_config_problems(config: dict) -> list[str]:
    """Where a CELO2MLP config.json disagrees with the published architecture."""
    return [
        f"config.json says {key}={config[key]!r} but lozoo's Celo2 has {value!r}"
        for key, value in CELO2_CONFIG.items()
        if key in config and config[key] != value
    ]


def elo_theta_from_linears(
    linears: list[tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """ELO θ from the three Linear layers ``(weight (out, in), bias)`` of a MetaMLP 39→h→h→2."""
    if len(linears) != 3:
        raise LayoutError(
            f"ELO is a 39→h→h→2 MetaMLP (hidden_layers=1), but this one has {len(linears)} "
            "Linear layers"
        )
    theta = {}
    for k, (weight, bias) in enumerate(linears):
        theta[f"w{k}"] = weight.to(torch.float32).t().contiguous()
        theta[f"b{k}"] = bias.to(torch.float32).clone()
    return theta
