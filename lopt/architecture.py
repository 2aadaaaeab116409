"""The architecture seam: what every learned optimizer in ``lopt`` provides, and a registry by name.

An *architecture* (small_fc_lopt, mlp_lopt, ...) is a family of learned optimizers that share a
network shape and update rule; one set of trained meta-weights θ plus the architecture's config
is one concrete optimizer. The meta-trainer, the evaluation and the zoo handle every architecture
through the record registered here and never name a config field or a θ key themselves
(docs/design/architecture.md).

What an architecture provides (all pure functions; nothing is mutated)::

    Config                     frozen dataclass; ``architecture`` class attribute = registry name;
                               to_dict()/from_dict(d) (unknown keys refused)/to_json()/from_json(),
                               theta_shapes() -> {key: shape} in flatten order, num_params
    init_theta(cfg, generator=None) -> {key: float32 tensor}
    init_state(params, cfg) -> {"t": 0-d float32, "tensors": {name: init_tensor_state(p, cfg)}}
    init_tensor_state(param, cfg) -> {key: float32 tensor}
    update(theta, state, params, grads, cfg, *, lr=1.0, weight_decay=0.0, loss=None,
           num_steps=None) -> (new_params, new_state)

``update`` must be differentiable in θ and ``torch.func.vmap``-able over θ, params, grads and
state, apply decoupled weight decay as ``p·(1 − lr·wd) − lr·step`` and count ``t`` after the
step. ``loss`` (the training loss before the step, a 0-d tensor) and ``num_steps`` (the planned
total number of steps) are for architectures that use them; others ignore them.

This module also holds the pieces that are the same for every architecture: θ flattening (views,
so vmap and autograd see through them), validation, the content hash, and the safetensors
metadata keys that say which architecture a weights file holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

Theta = dict[str, torch.Tensor]

# -- weights-file metadata (safetensors header) --------------------------------------------------
ARCHITECTURE_METADATA_KEY = "lozoo.architecture"
"""Safetensors metadata key naming the architecture of the weights (format 2 and later)."""
CONFIG_METADATA_KEY = "lozoo.config"
"""Safetensors metadata key holding the architecture's config as JSON (format 2 and later)."""
FORMAT_METADATA_KEY = "lozoo.format_version"
"""Safetensors metadata key holding :data:`WEIGHTS_FORMAT_VERSION`."""
LEGACY_CONFIG_METADATA_KEY = "lozoo.small_fc_lopt.config"
"""Format 1 (before the architecture seam): only small_fc_lopt existed and its config sat here."""
LEGACY_ARCHITECTURE = "small_fc_lopt"
"""The architecture of every format-1 file and zoo entry (the only one that existed)."""
WEIGHTS_FORMAT_VERSION = 2


@runtime_checkable
class ArchitectureConfig(Protocol):
    """What the seam needs from an architecture's config (see the module doc)."""

    architecture: ClassVar[str]

    def to_dict(self) -> dict[str, Any]: ...

    def to_json(self) -> str: ...

    def theta_shapes(self) -> dict[str, tuple[int, ...]]: ...

    @property
    def num_params(self) -> int: ...


class ConfigMixin:
    """JSON round trip and θ size for a frozen dataclass config.

    Subclasses set ``architecture`` and implement ``theta_shapes``. Tuples become JSON lists and
    come back as tuples for fields whose annotation is a tuple; unknown keys are refused with the
    list of valid ones (the message names the config by ``config_label``, default the
    architecture name).
    """

    architecture: ClassVar[str] = ""
    config_label: ClassVar[str] = ""

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.theta_shapes().values())

    def to_dict(self) -> dict[str, Any]:
        return {k: _jsonable(v) for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        if not isinstance(data, Mapping):
            raise TypeError(f"a {cls._label()} config must be a mapping, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown {cls._label()} config keys {unknown}; valid keys: {sorted(fields)}"
            )
        kwargs = {}
        for key, value in data.items():
            annotation = str(fields[key].type)
            if isinstance(value, list) and annotation.startswith("tuple"):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))

    @classmethod
    def _label(cls) -> str:
        return cls.config_label or cls.architecture


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


# -- the registry --------------------------------------------------------------------------------
class UnknownArchitectureError(ValueError):
    """A name that no registered architecture has (the message lists the registered ones)."""


@dataclass(frozen=True)
class Architecture:
    """Everything the rest of lozoo needs to know about one learned-optimizer architecture.

    ``optimizer`` is its ``torch.optim`` shell (a :class:`lopt.LearnedOptimizer` subclass);
    ``presets`` maps preset names to configs and ``default_preset`` names the one used when only
    the architecture is given. ``summary(cfg)`` is a one-line human description (zoo cards and
    listings). ``lanes_update`` optionally computes ``vmap(update)`` over meta-training lanes with
    a batched kernel: preferably a :class:`lopt.kernels.lanes.LaneUpdate` (in place on the
    lane-stacked state, docs/design/lanes.md), or a pure function ``(theta_lanes [L, P], state,
    params, grads, cfg) -> (params, state)``; architectures without one meta-train on the vmapped
    pure-torch ``update`` (or register ``lopt.kernels.lanes.vmapped_lane_update(update,
    unflatten_theta)`` to get the batched inner problems of the fast path).
    """

    name: str
    config_class: type
    init_theta: Callable[..., Theta]
    init_state: Callable[..., dict]
    init_tensor_state: Callable[..., dict[str, torch.Tensor]]
    update: Callable[..., tuple[dict[str, torch.Tensor], dict]]
    optimizer: type
    presets: Mapping[str, Any]
    default_preset: str
    summary: Callable[[Any], str] = field(default=lambda cfg: "")
    lanes_update: Any = None
    description: str = ""

    def preset(self, name: str | None = None):
        """A preset config by name (the default preset for ``None``)."""
        name = self.default_preset if name is None else name
        try:
            return self.presets[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.name} preset {name!r}; valid presets: {sorted(self.presets)}"
            ) from None

    def config_from_dict(self, data: Mapping[str, Any]):
        return self.config_class.from_dict(dict(data))


_REGISTRY: dict[str, Architecture] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_architecture(arch: Architecture, *, replace: bool = False) -> Architecture:
    """Add ``arch`` to the registry under ``arch.name`` and return it.

    Registering the same record twice is a no-op (modules may be re-imported); a different
    record under a taken name is refused unless ``replace=True``.
    """
    if not isinstance(arch, Architecture):
        raise TypeError(f"register_architecture needs an Architecture, got {type(arch).__name__}")
    if not _NAME.match(arch.name):
        raise ValueError(
            f"architecture name {arch.name!r} must be lower-case letters, digits and '_', "
            "starting with a letter (it is used in zoo names and file metadata)"
        )
    if getattr(arch.config_class, "architecture", None) != arch.name:
        raise ValueError(
            f"{arch.config_class.__name__}.architecture must be {arch.name!r} (the registry name), "
            f"got {getattr(arch.config_class, 'architecture', None)!r}"
        )
    if arch.default_preset not in arch.presets:
        raise ValueError(
            f"default preset {arch.default_preset!r} of {arch.name} is not one of its presets "
            f"{sorted(arch.presets)}"
        )
    for pname, cfg in arch.presets.items():
        if not isinstance(cfg, arch.config_class):
            raise TypeError(
                f"preset {pname!r} of {arch.name} is not a {arch.config_class.__name__}"
            )
    old = _REGISTRY.get(arch.name)
    if old is not None and old != arch and not replace:
        raise ValueError(
            f"architecture {arch.name!r} is already registered (by {old.optimizer.__module__}); "
            "pass replace=True to override it"
        )
    _REGISTRY[arch.name] = arch
    return arch


def unregister_architecture(name: str) -> None:
    """Remove an architecture (tests that register throw-away ones clean up with this)."""
    _REGISTRY.pop(name, None)


def architecture_names() -> tuple[str, ...]:
    """Names of every registered architecture, sorted."""
    return tuple(sorted(_REGISTRY))


def get_architecture(name: str) -> Architecture:
    """The registered architecture called ``name``."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownArchitectureError(
            f"unknown learned-optimizer architecture {name!r}; registered architectures: "
            f"{', '.join(architecture_names()) or 'none'}"
        ) from None


def architecture_of(config: Any) -> Architecture:
    """The architecture a config object belongs to."""
    name = getattr(type(config), "architecture", None)
    if not isinstance(name, str) or not name:
        raise TypeError(
            f"{type(config).__name__} is not a learned-optimizer config (it has no "
            "'architecture' class attribute); pass a config such as lopt.ORIGINAL"
        )
    arch = get_architecture(name)
    if not isinstance(config, arch.config_class):
        raise TypeError(
            f"{type(config).__name__} claims architecture {name!r}, whose config class is "
            f"{arch.config_class.__name__}"
        )
    return arch


def resolve_config(spec: Any, options: Mapping[str, Any] | None = None):
    """A config from ``spec`` with ``options`` overriding its fields.

    ``spec`` is a config object, an architecture name (its default preset), ``"ARCH:PRESET"``,
    or a preset name that exactly one architecture has (``"original"``, ``"mulo"``).
    """
    if isinstance(spec, str):
        base = _config_from_name(spec)
    else:
        architecture_of(spec)
        base = spec
    if not options:
        return base
    cls = type(base)
    return cls.from_dict({**base.to_dict(), **dict(options)})


def _config_from_name(spec: str):
    if ":" in spec:
        arch_name, preset_name = spec.split(":", 1)
        return get_architecture(arch_name).preset(preset_name)
    if spec in _REGISTRY:
        return _REGISTRY[spec].preset()
    owners = [a for a in _REGISTRY.values() if spec in a.presets]
    if len(owners) == 1:
        return owners[0].presets[spec]
    presets = sorted(f"{a.name}:{p}" for a in _REGISTRY.values() for p in a.presets)
    if owners:
        raise ValueError(
            f"preset {spec!r} exists in several architectures; say which: "
            + ", ".join(f"{a.name}:{spec}" for a in owners)
        )
    raise UnknownArchitectureError(
        f"unknown learned optimizer {spec!r}: not an architecture "
        f"({', '.join(architecture_names()) or 'none registered'}) nor a preset "
        f"({', '.join(presets)}); use ARCH or ARCH:PRESET"
    )


# -- the interface, dispatched on the config's architecture ----------------------------------------
def init_theta(cfg: Any, generator: torch.Generator | None = None) -> Theta:
    """Fresh θ of ``cfg``'s architecture (``lopt.init_theta(lopt.MLPLOptConfig())``)."""
    return architecture_of(cfg).init_theta(cfg, generator)


def init_state(params: Mapping[str, torch.Tensor], cfg: Any) -> dict:
    """Zero optimizer state of ``cfg``'s architecture for a dict of parameters."""
    return architecture_of(cfg).init_state(params, cfg)


def init_tensor_state(param: torch.Tensor, cfg: Any) -> dict[str, torch.Tensor]:
    """Zero optimizer state of ``cfg``'s architecture for one parameter tensor."""
    return architecture_of(cfg).init_tensor_state(param, cfg)


def update(theta, state, params, grads, cfg, **kwargs):
    """One step of ``cfg``'s architecture (its ``update``; keyword arguments as the interface:
    ``lr``, ``weight_decay``, ``loss``, ``num_steps``)."""
    return architecture_of(cfg).update(theta, state, params, grads, cfg, **kwargs)


def config_from_dict(architecture: str, data: Mapping[str, Any]):
    """Build ``architecture``'s config from a dict (e.g. a zoo entry's ``config.json``)."""
    return get_architecture(architecture).config_from_dict(data)


# -- θ: generic over theta_shapes() ----------------------------------------------------------------
def _describe(cfg: Any) -> str:
    return f"config ({type(cfg).architecture}: {cfg})"


def validate_theta(theta: Mapping[str, torch.Tensor], cfg: Any) -> Theta:
    """Check keys, shapes and finiteness of θ against ``cfg``; return it as float32 tensors."""
    if not isinstance(theta, Mapping):
        raise TypeError(f"meta-weights must be a dict of tensors, got {type(theta).__name__}")
    expected = cfg.theta_shapes()
    missing = sorted(set(expected) - set(theta))
    extra = sorted(set(theta) - set(expected))
    if missing or extra:
        raise ValueError(
            f"meta-weights do not match the {_describe(cfg)}: missing keys {missing}, "
            f"unexpected keys {extra}"
        )
    out: Theta = {}
    for key, shape in expected.items():
        value = theta[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"meta-weight {key!r} must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"meta-weight {key!r} has shape {tuple(value.shape)} but the {_describe(cfg)} "
                f"needs {tuple(shape)}; pass the config the weights were trained with"
            )
        if not torch.isfinite(value).all():
            raise ValueError(f"meta-weight {key!r} contains NaN or inf")
        out[key] = value.detach().to(torch.float32)
    return out


def flatten_theta(theta: Mapping[str, torch.Tensor], cfg: Any) -> torch.Tensor:
    """Concatenate θ into one ``[P]`` vector in the key order of ``cfg.theta_shapes()``."""
    return torch.cat([theta[k].reshape(-1) for k in cfg.theta_shapes()])


def unflatten_theta(flat: torch.Tensor, cfg: Any) -> Theta:
    """Inverse of :func:`flatten_theta` (leading batch dims allowed); returns views of ``flat``.

    Views, not copies: under ``torch.func.vmap`` and autograd the per-key tensors must stay
    connected to the flat vector the meta-trainer perturbs and differentiates.
    """
    if flat.shape[-1] != cfg.num_params:
        raise ValueError(
            f"flat θ has {flat.shape[-1]} entries but the config needs {cfg.num_params} "
            f"({type(cfg).architecture})"
        )
    out: Theta = {}
    offset = 0
    for key, shape in cfg.theta_shapes().items():
        n = math.prod(shape)
        out[key] = flat[..., offset : offset + n].view(*flat.shape[:-1], *shape)
        offset += n
    return out


def theta_sha256(theta: Mapping[str, torch.Tensor]) -> str:
    """Content hash of θ (keys, shapes and float32 bytes), independent of file encoding."""
    h = hashlib.sha256()
    for key in sorted(theta):
        t = theta[key].detach().to(torch.float32).contiguous().cpu()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# -- weights-file metadata -----------------------------------------------------------------------
def weights_metadata(cfg: Any) -> dict[str, str]:
    """The safetensors metadata that records ``cfg``'s architecture, config and file format."""
    return {
        ARCHITECTURE_METADATA_KEY: architecture_of(cfg).name,
        CONFIG_METADATA_KEY: cfg.to_json(),
        FORMAT_METADATA_KEY: str(WEIGHTS_FORMAT_VERSION),
    }


@dataclass(frozen=True)
class WeightsHeader:
    """What a weights file's metadata says about itself (``config`` is None if it has none)."""

    architecture: str | None
    config: Any
    format_version: int


def read_weights_metadata(metadata: Mapping[str, str] | None) -> WeightsHeader:
    """Parse the architecture, config and format version out of a safetensors metadata dict.

    Format 1 files (written before the seam) carry only the small_fc_lopt config under
    :data:`LEGACY_CONFIG_METADATA_KEY`; files with no lozoo metadata at all give
    ``WeightsHeader(None, None, 0)``. A malformed config raises ``ValueError``.
    """
    meta = dict(metadata or {})
    if ARCHITECTURE_METADATA_KEY in meta:
        name = meta[ARCHITECTURE_METADATA_KEY]
        try:
            version = int(meta.get(FORMAT_METADATA_KEY, WEIGHTS_FORMAT_VERSION))
        except ValueError:
            raise ValueError(
                f"{FORMAT_METADATA_KEY} must be an integer, got {meta[FORMAT_METADATA_KEY]!r}"
            ) from None
        if version > WEIGHTS_FORMAT_VERSION:
            raise ValueError(
                f"weights file format {version} is newer than this lozoo reads "
                f"({WEIGHTS_FORMAT_VERSION}); upgrade lozoo"
            )
        text = meta.get(CONFIG_METADATA_KEY)
        cfg = get_architecture(name).config_class.from_json(text) if text else None
        return WeightsHeader(name, cfg, version)
    if LEGACY_CONFIG_METADATA_KEY in meta:
        arch = get_architecture(LEGACY_ARCHITECTURE)
        return WeightsHeader(
            LEGACY_ARCHITECTURE, arch.config_class.from_json(meta[LEGACY_CONFIG_METADATA_KEY]), 1
        )
    return WeightsHeader(None, None, 0)
