"""``--init-from REF``: start meta-training from existing meta-weights instead of a fresh θ.

REF is anything ``python -m metatrain.eval --optimizer`` accepts — a zoo reference
(``small_fc_lopt/mlp_mnist``), a meta-training run directory or a ``.safetensors`` file — and
also a run directory that is still running or was stopped before writing its final weights (its
latest checkpoint's θ is used). Typical use: specialise a published optimizer to a family, or
continue from a finished run with different settings.

The weights define the architecture. It must be the one this run meta-trains (same kind and
same θ shapes), otherwise the run stops with an error naming both. The source's non-shape
settings (e.g. small_fc_lopt's ``step_mult``) are adopted, because θ was trained for them;
``--lopt-option`` entries given explicitly still win.

The default, ``auto``, starts from the architecture's bundled default weights when they exist
and fit (for small_fc_lopt h=4: ``small_fc_lopt/mlp_mnist``, what ``SmallFCLOpt(params)`` uses),
so the bare ``python -m metatrain --task-family F`` specialises the default optimizer to F
instead of starting over; ``none`` starts from a fresh random θ. Why this default:
docs/design/mixture.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import lopt

__all__ = ["AUTO", "DEFAULT_WEIGHTS", "FRESH", "InitFrom", "default_weights_ref", "resolve_init"]

AUTO = "auto"
"""``--init-from auto``: the architecture's bundled default weights when they fit, else fresh."""
FRESH = ("none", "")
"""``--init-from none``: a fresh random θ (as does an unset value)."""


DEFAULT_WEIGHTS: dict[str, str] = {
    "small_fc_lopt": lopt.DEFAULT_ZOO_REF,
    "celo2": "celo2/mixture_8x8",
}
"""Architecture name → the bundled weights ``--init-from auto`` starts from."""


def default_weights_ref(run_config: Any) -> str | None:
    """The zoo reference of the default weights of ``run_config``'s architecture, or ``None``.

    Only references whose θ shapes equal the run's qualify (a different hidden size has no
    default weights).
    """
    ref = DEFAULT_WEIGHTS.get(lopt.architecture_of(run_config).name)
    if ref is None:
        return None
    import zoo

    try:
        entry = zoo.load(ref)
    except (zoo.ZooError, OSError):
        return None
    if type(entry.config) is not type(run_config):
        return None
    if entry.config.theta_shapes() != run_config.theta_shapes():
        return None
    return ref


@dataclass(frozen=True)
class InitFrom:
    """Initial θ for a run, the optimizer config to run it with, and a record for config.json."""

    theta: dict[str, torch.Tensor]
    config: Any
    record: dict[str, Any]


def _describe(config: Any) -> str:
    return f"{lopt.architecture_of(config).name} with {config.num_params} meta-parameters"


def _from_checkpoint(ref: str, path: Path) -> tuple[dict[str, torch.Tensor], Any, str]:
    from .checkpoint import latest_checkpoint, load_checkpoint
    from .config import MetaTrainConfig

    ckpt_path = latest_checkpoint(path)
    config_path = path / "config.json"
    if ckpt_path is None or not config_path.is_file():
        raise ValueError(
            f"--init-from {ref!r}: the directory holds neither final weights (theta.safetensors) "
            "nor a checkpoint with its config.json; give a zoo reference, a run directory or a "
            ".safetensors file"
        )
    saved = MetaTrainConfig.from_dict(json.loads(config_path.read_text())["metatrain"])
    config = saved.lopt_config()
    flat = load_checkpoint(ckpt_path)["learner"]["theta"]
    theta = {k: v.clone() for k, v in lopt.unflatten_theta(flat, config).items()}
    return theta, config, str(ckpt_path.resolve())


def resolve_init(ref: str | None, run_config: Any, lopt_option: dict[str, Any]) -> InitFrom | None:
    """Load REF and check it against ``run_config`` (the run's optimizer config).

    ``lopt_option`` are the run's explicit ``--lopt-option`` overrides; they are applied on top
    of the source's config. ``None``/``"none"`` mean a fresh θ (returns ``None``), ``"auto"``
    the architecture's default weights if it has any (else ``None``). Raises ``ValueError`` with
    one clear line on any mismatch.
    """
    from .evaluation.source import resolve_optimizer

    if ref is None or ref.strip().lower() in FRESH:
        return None
    auto = ref.strip().lower() == AUTO
    if auto:
        ref = default_weights_ref(run_config)
        if ref is None:
            return None

    path = Path(ref).expanduser()
    has_weights = path.is_dir() and any(
        (path / name).is_file() for name in ("theta.safetensors", "model.safetensors")
    )
    if path.is_dir() and not has_weights:
        theta, source_config, resolved = _from_checkpoint(ref, path)
        sha = lopt.theta_sha256(theta)
        kind = "checkpoint"
    else:
        try:
            source = resolve_optimizer(ref)
        except ValueError as err:
            raise ValueError(str(err).replace("--optimizer", "--init-from", 1)) from None
        theta, source_config = dict(source.theta), source.config
        resolved, sha, kind = source.resolved, source.sha256, source.kind
    if type(source_config) is not type(run_config) or (
        source_config.theta_shapes() != run_config.theta_shapes()
    ):
        raise ValueError(
            f"--init-from {ref!r} holds {_describe(source_config)}, but this run meta-trains "
            f"{_describe(run_config)}; choose weights of that architecture or change --lopt / "
            "--lopt-option to match them"
        )
    # run_config already carries lopt_option, so equal shapes above mean equal shapes here
    config = type(source_config).from_dict({**source_config.to_dict(), **lopt_option})
    record = {"ref": AUTO if auto else ref, "kind": kind, "resolved": resolved, "theta_sha256": sha}
    return InitFrom(theta=theta, config=config, record=record)
