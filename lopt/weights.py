"""Meta-weights on disk and by name: safetensors I/O and the resolution of a ``weights=`` argument.

A weights file is a safetensors file of θ whose metadata names the architecture and holds its
config (:func:`lopt.architecture.weights_metadata`). Pickles are never loaded.

Names such as ``"small_fc_lopt/mlp_mnist:1.0.0"`` are resolved by *reference resolvers*. ``lopt``
does not import the zoo: the ``zoo`` package registers its resolver with
:func:`register_ref_resolver` when it is imported, and a reference given before that imports the
modules in :data:`REF_RESOLVER_MODULES` by name. The zoo depends on ``lopt``, never the reverse.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import shadowing
from .architecture import (
    Theta,
    architecture_of,
    get_architecture,
    read_weights_metadata,
    resolve_config,
    validate_theta,
    weights_metadata,
)
from .files import atomic_write


class ResolvedWeights(NamedTuple):
    """θ, its config, and a source record (``{"source": "zoo:family/name:1.0.0"}``)."""

    theta: Theta
    config: Any
    info: dict[str, str]


WeightsSpec = Mapping[str, torch.Tensor] | str | os.PathLike | ResolvedWeights | None


RefResolver = Callable[[str], ResolvedWeights]
_resolvers: list[RefResolver] = []
REF_RESOLVER_MODULES = ("zoo",)
"""Modules imported on the first reference when no resolver is registered (they register one)."""


class RefNotFoundError(LookupError):
    """A reference that no registered resolver knows."""


def register_ref_resolver(resolver: RefResolver) -> RefResolver:
    """Let ``resolver(ref) -> ResolvedWeights`` resolve names; it raises ``LookupError`` (or a
    subclass) for a name it does not know. Registering the same function twice is a no-op."""
    if resolver not in _resolvers:
        _resolvers.append(resolver)
    return resolver


def resolve_ref(ref: str) -> ResolvedWeights:
    """θ and config of a weights reference (a zoo name), through the registered resolvers."""
    failed = []
    if not _resolvers:
        for module in REF_RESOLVER_MODULES:
            try:
                # a `zoo/` folder in the working directory must not stand in for lozoo's zoo
                shadowing.import_sibling(module)
            except ImportError as err:
                failed.append(f"; importing {module} failed: {err}")
    if not _resolvers:
        raise RefNotFoundError(
            f"cannot resolve weights reference {ref!r}: no resolver is registered "
            f"(import one of {', '.join(REF_RESOLVER_MODULES)}, or pass a file path or a dict)"
            + "".join(failed)
        )
    errors = []
    for resolver in _resolvers:
        try:
            return resolver(ref)
        except LookupError as err:
            errors.append(err)
    raise errors[0]


def is_weights_ref(text: str) -> bool:
    """Whether ``text`` reads as ``family/name[:version]`` rather than as a file path.

    One "/", not path-like, no weights-file suffix. Names may contain "." (e.g.
    ``small_fc_lopt/mlp.v2``): the resolver validates the name fully and says precisely what is
    wrong, which beats a misleading "file not found".
    """
    suffixes = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".json")
    name = text.split(":", 1)[0]
    return (
        name.count("/") == 1
        and not name.startswith((".", "/", "~"))
        and not name.lower().endswith(suffixes)
    )


# -- files ---------------------------------------------------------------------------------------
def save_theta(
    path: str | os.PathLike[str],
    theta: Mapping[str, torch.Tensor],
    cfg: Any,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write θ to a safetensors file recording its architecture, config and format version.

    The write is atomic (temp file, fsync, rename) so a crash never leaves a half-written file.
    """
    from safetensors.torch import save

    theta = validate_theta(theta, cfg)
    meta = weights_metadata(cfg)
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    blob = save({k: v.contiguous() for k, v in theta.items()}, metadata=meta)
    return atomic_write(path, _sorted_metadata(blob))


def _sorted_metadata(blob: bytes) -> bytes:
    """The same safetensors bytes with the metadata keys sorted.

    safetensors writes metadata in hash-map order, which differs between processes; sorting
    makes the file a function of θ and config alone, so equal weights have equal sha256.
    """
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned
    return len(text).to_bytes(8, "little") + text + blob[8 + n :]


def read_header(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata dict of a safetensors file ({} if it has none)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_theta(path: str | os.PathLike[str], cfg: Any = None) -> tuple[Theta, Any]:
    """Read θ from a safetensors file written by :func:`save_theta` (or any file with θ's keys).

    The config comes from ``cfg`` if given, else from the file's metadata (format 2 or 1). Pickles
    are never loaded: a file that is not safetensors is rejected with an error that says so.
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
    if cfg is None:
        cfg = read_weights_metadata(header.get("__metadata__")).config
        if cfg is None:
            raise ValueError(
                f"{path} records no learned-optimizer architecture or config in its metadata; "
                "pass config=... (e.g. lopt.ORIGINAL or lopt.MULO) when loading it"
            )
    return validate_theta(tensors, cfg), cfg


# -- weights= of an optimizer shell ---------------------------------------------------------------
def resolve_weights(
    weights: WeightsSpec,
    config: Any = None,
    *,
    architecture: str | None = None,
    default_ref: str | None = None,
    owner: str = "the optimizer",
) -> ResolvedWeights:
    """Turn any accepted meta-weights spec into ``(θ, config, source info)``.

    Accepted: a θ dict, a :class:`ResolvedWeights`, a path to a ``.safetensors`` file, or a
    reference such as ``"small_fc_lopt/mlp_mnist"`` / ``"name:1.2.0"``. ``None`` means
    ``default_ref``. ``config`` is a config object or a preset name of ``architecture``; when
    ``architecture`` is given the weights must belong to it.
    """
    arch = get_architecture(architecture) if architecture is not None else None
    cfg = _config_arg(config, arch)
    default = weights is None
    if default:
        if default_ref is None:
            raise ValueError(
                f"{owner} has no default meta-weights; pass weights= (a zoo reference, a "
                ".safetensors file or a dict of tensors)"
            )
        weights = default_ref
    if isinstance(weights, ResolvedWeights):  # already resolved (lopt.make_optimizer)
        if cfg is not None and cfg != weights.config:
            raise ValueError(f"config {cfg} differs from the weights' config {weights.config}")
        return _checked(weights, arch, owner)
    if isinstance(weights, Mapping):
        cfg = cfg or _infer_config(weights, arch, owner)
        return _checked(ResolvedWeights(validate_theta(weights, cfg), cfg, {"source": "dict"}),
                        arch, owner)  # fmt: skip
    if isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        if os.path.isfile(path) or not is_weights_ref(path):
            theta, file_cfg = load_theta(path, cfg)
            info = {"source": f"file:{os.path.abspath(path)}"}
            return _checked(ResolvedWeights(theta, file_cfg, info), arch, owner)
        try:
            found = resolve_ref(path)
        except LookupError as err:
            if default:
                raise type(err)(
                    f"{owner}(weights=None) loads the default zoo entry {default_ref!r}, "
                    f"which is not installed: {err}"
                ) from None
            if ":" in path:
                raise
            raise type(err)(f"{err} (no file named {path!r} exists either)") from None
        if cfg is not None and cfg != found.config:
            raise ValueError(
                f"weights {path} were trained with config {found.config}, which differs from "
                f"the config passed ({cfg}); drop config=..."
            )
        return _checked(found, arch, owner)
    raise TypeError(
        "weights must be a dict of tensors, a path to a .safetensors file or a zoo reference, "
        f"got {type(weights).__name__}"
    )


def _config_arg(config: Any, arch) -> Any:
    if config is None:
        return None
    if isinstance(config, str):
        return arch.preset(config) if arch is not None else resolve_config(config)
    architecture_of(config)
    return config


def _checked(found: ResolvedWeights, arch, owner: str) -> ResolvedWeights:
    got = architecture_of(found.config)
    if arch is not None and got is not arch:
        raise ValueError(
            f"{owner} runs the {arch.name} architecture, but these meta-weights are {got.name} "
            f"({found.info.get('source')}); use lopt.{got.optimizer.__name__} or "
            "lopt.make_optimizer(params, weights=...), which picks the architecture itself"
        )
    return found


def _infer_config(theta: Mapping[str, torch.Tensor], arch, owner: str) -> Any:
    shapes = {k: tuple(v.shape) for k, v in theta.items() if isinstance(v, torch.Tensor)}
    candidates = [arch] if arch is not None else []
    for cand in candidates:
        for cfg in cand.presets.values():
            if shapes == cfg.theta_shapes():
                return cfg
    hint = f"{arch.config_class.__name__}(...)" if arch is not None else "an architecture config"
    raise ValueError(
        f"meta-weights match no preset architecture; pass config={hint} (got shapes {shapes})"
    )
