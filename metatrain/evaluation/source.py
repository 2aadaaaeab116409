"""Resolve ``--optimizer REF`` to meta-weights plus what is known about how they were trained.

REF may be a meta-training run directory, a ``.safetensors`` file or a zoo reference. Besides θ
and its config, the evaluation needs the meta-training config (to prove its held-out seeds
disjoint, :mod:`metatrain.evaluation.seeds`) and provenance (to carry into a published entry).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import lopt

__all__ = ["LearnedSource", "resolve_optimizer"]

_WEIGHT_FILES = ("theta.safetensors", "model.safetensors")


@dataclass(frozen=True)
class LearnedSource:
    """Meta-weights to evaluate and where they came from.

    ``kind`` is ``"zoo"``, ``"run_dir"`` or ``"file"``; ``resolved`` the exact zoo ref
    (``name:version``) or absolute path; ``metatrain`` the ``MetaTrainConfig.to_dict()`` of the
    run that produced θ when known; ``provenance`` the metadata a published entry inherits.
    """

    ref: str
    kind: str
    resolved: str
    theta: dict[str, torch.Tensor] = field(repr=False)
    config: Any  # the architecture config θ was trained with
    sha256: str
    metatrain: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "kind": self.kind,
            "resolved": self.resolved,
            "theta_sha256": self.sha256,
            "architecture": lopt.architecture_of(self.config).name,
            "lopt_config": self.config.to_dict(),
        }


def resolve_optimizer(ref: str, weights_file: str | None = None) -> LearnedSource:
    """Load REF; raises ``ValueError`` with one clear line if it is none of the accepted kinds.

    A directory wins over a zoo reference of the same spelling only if it holds weights, so that
    ``runs/mnist`` (a run dir) and ``small_fc_lopt/mlp_mnist`` (a zoo name) both do the obvious.
    ``weights_file`` picks a run directory's weights by name (e.g. ``theta_best.safetensors``,
    the best held-out θ) instead of its final θ.
    """
    path = Path(ref).expanduser()
    note = ""
    if weights_file is not None and not path.is_dir():
        raise ValueError(f"weights file {weights_file!r}: {ref!r} is not a run directory")
    if path.is_dir():
        if weights_file is not None or any((path / name).is_file() for name in _WEIGHT_FILES):
            return _from_run_dir(ref, path, weights_file)
        note = f" (the directory holds no {' or '.join(_WEIGHT_FILES)}: is the run finished?)"
    if path.is_file():
        return _from_file(ref, path)
    import zoo

    try:
        entry = zoo.load(ref)
    except (zoo.ZooError, OSError) as err:
        kinds = "a meta-training run directory, a .safetensors file or a zoo reference"
        raise ValueError(f"--optimizer {ref!r} is not {kinds}{note}: {err}") from None
    meta = dict(entry.meta)
    provenance = entry.user_meta
    provenance.pop("annotates", None)
    return LearnedSource(
        ref=ref,
        kind="zoo",
        resolved=entry.ref,
        theta=entry.theta,
        config=entry.config,
        sha256=entry.theta_sha256,
        metatrain=_metatrain_from_meta(meta),
        provenance=provenance,
    )


def _from_run_dir(ref: str, path: Path, weights_file: str | None = None) -> LearnedSource:
    import zoo

    try:
        theta, cfg, meta = zoo.read_run_dir(path, weights_file)
    except (zoo.ZooError, OSError, ValueError) as err:
        raise ValueError(f"--optimizer {ref!r}: cannot read the run directory: {err}") from None
    run_config = _read_json(path / "config.json")
    summary = _read_json(path / "summary.json")
    metatrain = _metatrain_from_run(run_config)
    provenance = dict(meta)
    provenance.pop("meta_training", None)
    if metatrain is not None:
        provenance.update(
            task_family=metatrain.get("task_family"),
            metatrain_config=metatrain,
            outer_steps=metatrain.get("outer_steps"),
            seed=metatrain.get("seed"),
        )
    if run_config and run_config.get("command"):
        provenance["command"] = run_config["command"]
    # the summary knows what ran: --max-time may stop a run before its planned outer steps
    for key in ("outer_steps", "wall_time_s", "final_meta_loss"):
        if summary and summary.get(key) is not None:
            provenance[key] = summary[key]
    provenance["run_dir"] = str(path.resolve())
    return LearnedSource(
        ref=ref,
        kind="run_dir",
        resolved=str(path.resolve()),
        theta=theta,
        config=cfg,
        sha256=lopt.theta_sha256(theta),
        metatrain=metatrain,
        provenance=provenance,
    )


def _from_file(ref: str, path: Path) -> LearnedSource:
    try:
        theta, cfg = lopt.load_theta(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"--optimizer {ref!r}: {err}") from None
    # A theta.safetensors inside a run dir still knows its run: look next to it.
    metatrain = _metatrain_from_run(_read_json(path.parent / "config.json"))
    provenance: dict[str, Any] = {"weights_file": str(path.resolve())}
    if metatrain is not None:
        provenance.update(task_family=metatrain.get("task_family"), metatrain_config=metatrain)
    return LearnedSource(
        ref=ref,
        kind="file",
        resolved=str(path.resolve()),
        theta=theta,
        config=cfg,
        sha256=lopt.theta_sha256(theta),
        metatrain=metatrain,
        provenance=provenance,
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _metatrain_from_run(run_config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if run_config and isinstance(run_config.get("metatrain"), dict):
        return dict(run_config["metatrain"])
    return None


def _metatrain_from_meta(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run config from zoo metadata: ``--publish`` and ``publish_dir`` store it differently."""
    if isinstance(meta.get("metatrain_config"), dict):
        return dict(meta["metatrain_config"])
    training = meta.get("meta_training")
    return _metatrain_from_run(training if isinstance(training, Mapping) else None)
