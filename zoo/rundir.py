"""Publish a directory (a meta-training run, or another zoo entry) as a zoo entry.

What the directory may hold:

- the weights: ``model.safetensors`` or ``theta.safetensors`` (exactly one of them, or name the
  file with ``weights_file``); safetensors only;
- the learned-optimizer config: embedded in the safetensors metadata with its architecture
  (``lopt.save_theta`` writes both) and/or ``config.json`` (a zoo entry's, format 2 or 1). If
  both are there they must agree. A ``config.json`` that is not an optimizer config (a
  meta-trainer's run config) is kept as ``meta["meta_training"]`` when the weights carry their
  own config;
- ``meta.json`` (optional): merged into the entry's meta. Keys the zoo writes itself (sha256,
  created, ...) are dropped, so a copied zoo entry directory republishes cleanly; its ``name``
  is used when no name is given.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lopt.architecture import UnknownArchitectureError, read_weights_metadata
from lopt.weights import load_theta, read_header

from .api import publish
from .entry import (
    CONFIG,
    META,
    MODEL,
    RESERVED_META,
    ZooEntry,
    looks_like_pickle,
    parse_config_json,
)
from .inputs import Attachments, PathLike
from .refs import Version

WEIGHT_NAMES = (MODEL, "theta.safetensors")


def find_weights(directory: Path, weights_file: str | None = None) -> Path:
    if weights_file is not None:
        path = directory / weights_file
        if not path.is_file():
            raise FileNotFoundError(f"weights file {weights_file!r} not found in {directory}")
        return path
    found = [directory / n for n in WEIGHT_NAMES if (directory / n).is_file()]
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(
            f"{directory} holds both {' and '.join(WEIGHT_NAMES)}; choose one with "
            "weights_file= (CLI: --weights FILE)"
        )
    pickles = sorted(p.name for p in directory.iterdir() if p.is_file() and looks_like_pickle(p))
    hint = (
        f"; {', '.join(pickles)} look(s) like pickles, which lozoo never loads — re-save the "
        "weights with lopt.save_theta"
        if pickles
        else ""
    )
    raise FileNotFoundError(f"no {' or '.join(WEIGHT_NAMES)} in {directory}{hint}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _config_from_json(data: Any) -> tuple[Any, str]:
    if not isinstance(data, Mapping):
        return None, "it is not a JSON object"
    try:
        return parse_config_json(dict(data))[1], ""
    except UnknownArchitectureError:
        raise  # an optimizer config of an architecture lozoo does not know: say so, do not guess
    except (ValueError, TypeError) as err:
        return None, str(err)


def _embedded_config(weights: Path) -> Any:
    from safetensors import SafetensorError

    try:
        header = read_header(weights)
    except (SafetensorError, OSError, ValueError):
        return None  # load_theta below reports the broken file precisely
    return read_weights_metadata(header).config


def read_run_dir(
    directory: PathLike, weights_file: str | None = None
) -> tuple[dict, Any, dict[str, Any]]:
    """``(θ, config, meta)`` from a run directory, with the config rules of the module doc."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"not a directory: {directory}")
    weights = find_weights(directory, weights_file)
    embedded = _embedded_config(weights)
    meta: dict[str, Any] = {}
    if (directory / META).is_file():
        data = _read_json(directory / META)
        if not isinstance(data, dict):
            raise ValueError(f"{directory / META} must hold a JSON object")
        meta = {k: v for k, v in data.items() if k not in RESERVED_META or k == "name"}
    config = embedded
    if (directory / CONFIG).is_file():
        data = _read_json(directory / CONFIG)
        from_json, why = _config_from_json(data)
        if from_json is not None and embedded is not None and from_json != embedded:
            raise ValueError(
                f"architecture mismatch: {directory / CONFIG} ({from_json}) differs from the "
                f"config stored in {weights.name} ({embedded})"
            )
        if from_json is None and embedded is None:
            raise ValueError(
                f"{directory / CONFIG} is not a learned-optimizer config ({why}) and "
                f"{weights.name} carries none in its metadata; write the weights with "
                "lopt.save_theta"
            )
        if from_json is None:
            meta.setdefault("meta_training", data)
        config = config or from_json
    if config is None:
        raise ValueError(
            f"no learned-optimizer config for {weights}: no {CONFIG} in {directory} and none in "
            "the file's metadata (write the weights with lopt.save_theta, or add config.json)"
        )
    theta, config = load_theta(weights, config)
    return theta, config, meta


def publish_dir(
    directory: PathLike,
    name: str | None = None,
    *,
    weights_file: str | None = None,
    version: str | Version | None = None,
    meta: Mapping[str, Any] | None = None,
    card: str | None = None,
    attachments: Attachments = None,
    root: PathLike | None = None,
) -> ZooEntry:
    """Publish the weights in ``directory`` (see the module doc) under ``name``.

    ``meta`` overrides keys of the directory's ``meta.json``. This is also the hook for
    ``python -m metatrain ... --publish NAME``: pass the run directory and the command line.
    """
    theta, config, dir_meta = read_run_dir(directory, weights_file)
    file_name = dir_meta.pop("name", None)
    name = name or file_name
    if not name:
        raise ValueError(
            f"no zoo name given for {directory}: pass name= (CLI: --name family/name) "
            "or put 'name' in its meta.json"
        )
    merged = {**dir_meta, **dict(meta or {})}
    return publish(
        theta,
        config,
        name,
        version=version,
        meta=merged,
        card=card,
        attachments=attachments,
        root=root,
    )
