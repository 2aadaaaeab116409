"""Meta-parameters θ: init, validation, flattening and safetensors I/O.

θ is a plain ``dict[str, Tensor]`` (keys from :meth:`SmallFCConfig.theta_shapes`). The
meta-trainer works on a flat vector; :func:`flatten_theta` / :func:`unflatten_theta` map
between the two with views, so ``vmap`` and autograd see through them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import DECAY_KEYS, SmallFCConfig

Theta = dict[str, torch.Tensor]

CONFIG_METADATA_KEY = "lozoo.small_fc_lopt.config"


def init_theta(cfg: SmallFCConfig, generator: torch.Generator | None = None) -> Theta:
    """Fresh θ as in the reference (spec §3).

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
            theta[key] = _trunc_normal(w, std, generator)
        else:
            theta[key] = torch.zeros(shape, dtype=torch.float32)
    return theta


def _trunc_normal(out: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    sample = torch.randn(out.shape, generator=generator)
    bad = sample.abs() > 2.0
    while bad.any():
        sample[bad] = torch.randn(int(bad.sum()), generator=generator)
        bad = sample.abs() > 2.0
    return out.copy_(sample * std)


def validate_theta(theta: Mapping[str, torch.Tensor], cfg: SmallFCConfig) -> Theta:
    """Check keys, shapes and finiteness of θ against ``cfg``; return it as float32 tensors."""
    if not isinstance(theta, Mapping):
        raise TypeError(f"meta-weights must be a dict of tensors, got {type(theta).__name__}")
    expected = cfg.theta_shapes()
    missing = sorted(set(expected) - set(theta))
    extra = sorted(set(theta) - set(expected))
    if missing or extra:
        raise ValueError(
            f"meta-weights do not match the config (hidden_size={cfg.hidden_size}, "
            f"hidden_layers={cfg.hidden_layers}): missing keys {missing}, unexpected keys {extra}"
        )
    out: Theta = {}
    for key, shape in expected.items():
        value = theta[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"meta-weight {key!r} must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            raise ValueError(
                f"meta-weight {key!r} has shape {tuple(value.shape)} but the config "
                f"(hidden_size={cfg.hidden_size}, hidden_layers={cfg.hidden_layers}) needs "
                f"{shape}; pass the config the weights were trained with"
            )
        if not torch.isfinite(value).all():
            raise ValueError(f"meta-weight {key!r} contains NaN or inf")
        out[key] = value.detach().to(torch.float32)
    return out


def flatten_theta(theta: Mapping[str, torch.Tensor], cfg: SmallFCConfig) -> torch.Tensor:
    """Concatenate θ into one ``[P]`` vector in the fixed key order of ``cfg.theta_shapes()``."""
    return torch.cat([theta[k].reshape(-1) for k in cfg.theta_shapes()])


def unflatten_theta(flat: torch.Tensor, cfg: SmallFCConfig) -> Theta:
    """Inverse of :func:`flatten_theta`; returns views into ``flat`` (vmap/autograd friendly)."""
    if flat.shape[-1] != cfg.num_params:
        raise ValueError(
            f"flat θ has {flat.shape[-1]} entries but the config needs {cfg.num_params}"
        )
    out: Theta = {}
    offset = 0
    for key, shape in cfg.theta_shapes().items():
        n = math.prod(shape)
        out[key] = flat[..., offset : offset + n].reshape(*flat.shape[:-1], *shape)
        offset += n
    return out


def theta_sha256(theta: Mapping[str, torch.Tensor]) -> str:
    """Content hash of θ (keys, shapes and float32 bytes), independent of file encoding."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(theta):
        t = theta[key].detach().to(torch.float32).contiguous().cpu()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_theta(
    path: str | os.PathLike[str],
    theta: Mapping[str, torch.Tensor],
    cfg: SmallFCConfig,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write θ to a safetensors file, with its config as JSON in the file's metadata.

    The write is atomic (temp file, fsync, rename) so a crash never leaves a half-written file.
    """
    from safetensors.torch import save

    theta = validate_theta(theta, cfg)
    meta = {CONFIG_METADATA_KEY: cfg.to_json()}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    blob = save({k: v.contiguous() for k, v in theta.items()}, metadata=meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_theta(
    path: str | os.PathLike[str], cfg: SmallFCConfig | None = None
) -> tuple[Theta, SmallFCConfig]:
    """Read θ from a safetensors file written by :func:`save_theta` (or any file with θ's keys).

    The config comes from ``cfg`` if given, else from the file's metadata. Pickles are never
    loaded: a file that is not safetensors is rejected with an error that says so.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"meta-weights file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(
            f"meta-weights path {path} is a directory; pass the .safetensors file inside it "
            "(or a zoo reference such as 'small_fc_lopt/mlp_mnist')"
        )
    data = path.read_bytes()
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except (SafetensorError, ValueError, UnicodeDecodeError) as err:
        hint = (
            " (it looks like a pickle; lozoo loads safetensors only)" if data[:1] == b"\x80" else ""
        )
        raise ValueError(
            f"{path} is not a valid safetensors file{hint}: {err}. "
            "Re-save the weights with lopt.save_theta or safetensors.torch.save_file."
        ) from None
    file_meta = header.get("__metadata__") or {}
    if cfg is None:
        if CONFIG_METADATA_KEY not in file_meta:
            raise ValueError(
                f"{path} carries no small_fc_lopt config in its metadata; pass config=... "
                "(e.g. lopt.ORIGINAL or lopt.MULO) when loading it"
            )
        cfg = SmallFCConfig.from_json(file_meta[CONFIG_METADATA_KEY])
    return validate_theta(tensors, cfg), cfg
