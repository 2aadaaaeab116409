"""What an entry holds, and how it is read and verified before anything is handed out.

Format 2 (``meta.json`` ``"format": "lozoo-zoo-entry/2"``) records the learned-optimizer
architecture in ``config.json`` (``{"architecture": ..., "format_version": 2, ...config}``), in
``meta.json`` and in the safetensors metadata of ``model.safetensors``. Format 1 entries (before
lozoo had more than one architecture: config.json is the bare small_fc_lopt config) still load;
see docs/design/zoo_format.md.

``meta.json`` records ``sha256`` (of the ``model.safetensors`` bytes, what ``sha256sum`` prints),
``theta_sha256`` (:func:`lopt.theta_sha256` of the tensors, the value ``SmallFCLOpt`` stores in its
``state_dict``) and ``files`` (sha256 of every other file but ``meta.json`` itself). Loading checks
all of them, cross-checks ``config.json`` against the tensors and the config embedded in the
safetensors header, and refuses entries holding files it did not write (a pickle especially).
Hashes detect corruption and accidental edits; they are not signatures.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lopt
from lopt.architecture import LEGACY_ARCHITECTURE, read_weights_metadata, theta_sha256
from lopt.weights import load_theta, read_header

from .errors import EntryNotFoundError, IntegrityError
from .store import Location

MODEL = "model.safetensors"
CONFIG = "config.json"
META = "meta.json"
CARD = "README.md"
REQUIRED = (MODEL, CONFIG, META, CARD)
FORMAT_VERSION = 2
FORMAT = f"lozoo-zoo-entry/{FORMAT_VERSION}"
FORMATS = {"lozoo-zoo-entry/1": 1, FORMAT: FORMAT_VERSION}
"""Every ``meta.json`` format this version of lozoo reads, and its number."""
CONFIG_KEYS = ("architecture", "format_version")
"""Keys of a format-2 ``config.json`` that are not fields of the architecture's config."""
RESERVED_META = (
    "format",
    "architecture",
    "name",
    "version",
    "created",
    "lozoo_version",
    "num_params",
    "sha256",
    "theta_sha256",
    "files",
)
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


@dataclass(frozen=True)
class ZooEntryInfo:
    """A listed entry: where it is and its ``meta.json`` (not verified, nothing loaded)."""

    ref: str
    name: str
    version: str
    path: Path
    bundled: bool
    meta: dict[str, Any] = field(default_factory=dict, repr=False)
    problem: str | None = None

    @property
    def sha256(self) -> str:
        return str(self.meta.get("sha256", ""))

    @property
    def created(self) -> str:
        return str(self.meta.get("created", ""))

    @property
    def task_family(self) -> str:
        return str(self.meta.get("task_family", ""))

    @property
    def architecture(self) -> str:
        """The architecture recorded in ``meta.json`` (format 1: small_fc_lopt, the only one)."""
        if not self.meta:
            return ""
        return str(self.meta.get("architecture", LEGACY_ARCHITECTURE))

    @property
    def format_version(self) -> int | None:
        return FORMATS.get(self.meta.get("format"))  # type: ignore[arg-type]


@dataclass(frozen=True)
class ZooEntry:
    """A loaded, verified entry: θ and config ready for its architecture's optimizer.

    ``lopt.make_optimizer(params, weights=entry.ref)`` builds it; ``optimizer_class`` names it.
    """

    ref: str
    name: str
    version: str
    path: Path
    theta: dict[str, Any] = field(repr=False)
    config: Any
    meta: dict[str, Any] = field(repr=False)
    sha256: str
    theta_sha256: str
    bundled: bool
    architecture: str = LEGACY_ARCHITECTURE
    format_version: int = FORMAT_VERSION

    @property
    def user_meta(self) -> dict[str, Any]:
        """``meta`` without the keys the zoo writes itself (hashes, format, name, ...): what
        the publisher supplied, e.g. to carry into a derived entry."""
        return {k: v for k, v in self.meta.items() if k not in RESERVED_META}

    @property
    def optimizer_class(self) -> type:
        """The ``torch.optim`` shell of the entry's architecture (e.g. ``lopt.SmallFCLOpt``)."""
        return lopt.get_architecture(self.architecture).optimizer

    @property
    def card(self) -> str:
        return (self.path / CARD).read_text(encoding="utf-8")


@dataclass(frozen=True)
class VerifyResult:
    ref: str
    path: Path
    bundled: bool
    problem: str | None = None
    format_version: int | None = None
    architecture: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def looks_like_pickle(path: Path) -> bool:
    """A raw pickle (protocol ≥ 2 starts with 0x80) or a ``torch.save`` zip archive."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head[:1] == b"\x80" or (head[:4] == b"PK\x03\x04" and b"data.pkl" in head)


def describe(loc: Location) -> str:
    return f"zoo entry {loc.ref} ({loc.zoo_label} zoo, {loc.path})"


def read_meta(loc: Location) -> dict[str, Any]:
    path = loc.path / META
    if not path.is_file():
        raise IntegrityError(f"{describe(loc)}: missing {META}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{describe(loc)}: {META} is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise IntegrityError(f"{describe(loc)}: {META} must hold a JSON object")
    return meta


def info(loc: Location) -> ZooEntryInfo:
    """Lenient read for listings: an unreadable ``meta.json`` becomes ``problem``; an entry
    removed meanwhile raises :class:`EntryNotFoundError`."""
    try:
        meta, problem = read_meta(loc), None
    except (IntegrityError, OSError) as err:
        if not loc.path.is_dir():
            raise removed_error(loc) from None
        if isinstance(err, OSError):
            raise
        meta, problem = {}, str(err)
    return ZooEntryInfo(loc.ref, loc.name, str(loc.version), loc.path, loc.bundled, meta, problem)


def _file_problems(loc: Location, meta: dict[str, Any], verify: bool) -> list[str]:
    files = meta.get("files")
    if not isinstance(files, dict):
        return [f"{META} has no 'files' table of sha256 hashes"]
    present = {p.name for p in loc.path.iterdir()}
    missing = sorted((set(REQUIRED) | set(files)) - present)
    problems = [f"missing file(s) {', '.join(missing)}"] if missing else []
    irregular = sorted(n for n in present if not stat.S_ISREG(os.lstat(loc.path / n).st_mode))
    if irregular:  # a symlink to /dev/zero or a FIFO must not hang (or redirect) verification
        return [*problems, f"{', '.join(irregular)} not regular file(s); symlinks are refused"]
    for extra in sorted(present - set(files) - {META}):
        if looks_like_pickle(loc.path / extra):
            problems.append(
                f"contains {extra}, which looks like a pickle; the zoo holds safetensors only "
                "and never unpickles anything (remove the file)"
            )
        else:
            problems.append(f"contains {extra}, which {META} does not record (remove the file)")
    if verify:
        for fname, expected in sorted(files.items()):
            if fname in missing:
                continue
            actual = file_sha256(loc.path / fname)
            if actual != expected:
                problems.append(
                    f"sha256 mismatch for {fname} (recorded {str(expected)[:12]}…, "
                    f"actual {actual[:12]}…): the file is corrupted or was modified"
                )
        if files.get(MODEL) != meta.get("sha256"):
            problems.append(f"{META} 'sha256' disagrees with its 'files' entry for {MODEL}")
        for key, want in (("name", loc.name), ("version", str(loc.version))):
            if meta.get(key) != want:
                problems.append(
                    f"{META} says {key} {meta.get(key)!r} but the entry's directory is {want!r}"
                )
    return problems


def config_json(cfg: Any) -> dict[str, Any]:
    """The format-2 ``config.json`` of ``cfg``: its architecture, the format and its fields."""
    arch = lopt.architecture_of(cfg)
    return {"architecture": arch.name, "format_version": FORMAT_VERSION, **cfg.to_dict()}


def parse_config_json(data: Any) -> tuple[str, Any, int]:
    """``(architecture, config, format_version)`` of a ``config.json`` object, format 2 or 1.

    Raises ``ValueError``/``TypeError`` (an unknown architecture: ``lopt``'s
    ``UnknownArchitectureError``, which lists the registered ones).
    """
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object, got {type(data).__name__}")
    if "architecture" not in data:  # format 1: the bare small_fc_lopt config
        return LEGACY_ARCHITECTURE, lopt.config_from_dict(LEGACY_ARCHITECTURE, data), 1
    fields = {k: v for k, v in data.items() if k not in CONFIG_KEYS}
    version = data.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"format_version {version!r} is not one this lozoo reads (1..{FORMAT_VERSION}); "
            "upgrade lozoo"
        )
    name = data["architecture"]
    return name, lopt.config_from_dict(name, fields), version


def _read_config(loc: Location) -> tuple[str, Any, int]:
    try:
        data = json.loads((loc.path / CONFIG).read_text(encoding="utf-8"))
        return parse_config_json(data)
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        raise IntegrityError(
            f"{describe(loc)}: {CONFIG} is not a valid learned-optimizer config ({err})"
        ) from None


def _embedded_config(path: Path):
    return read_weights_metadata(read_header(path))


def removed_error(loc: Location) -> EntryNotFoundError:
    return EntryNotFoundError(
        f"zoo entry {loc.ref} not found: it was removed while being read ({loc.path})"
    )


def read_entry(loc: Location, verify: bool = True) -> ZooEntry:
    """Load an entry, raising :class:`IntegrityError` (naming it) before returning anything bad.

    An entry removed while it is read (``zoo remove`` renames it away first) raises
    :class:`EntryNotFoundError`, like one that was never there: missing files then mean
    "gone", not corruption.
    """
    try:
        return _read_entry(loc, verify)
    except Exception:
        if not loc.path.is_dir():
            raise removed_error(loc) from None
        raise


def _read_entry(loc: Location, verify: bool) -> ZooEntry:
    where = describe(loc)
    meta = read_meta(loc)
    problems = _file_problems(loc, meta, verify)
    if problems:
        raise IntegrityError(f"{where}: {'; '.join(problems)}")
    architecture, config, config_format = _read_config(loc)
    entry_format = FORMATS.get(meta.get("format"))  # type: ignore[arg-type]
    if entry_format is None:
        raise IntegrityError(
            f"{where}: {META} has format {meta.get('format')!r}; this lozoo reads "
            f"{', '.join(sorted(FORMATS))} (upgrade lozoo for newer entries)"
        )
    if config_format != entry_format:
        raise IntegrityError(
            f"{where}: {CONFIG} is format {config_format} but {META} says format {entry_format}"
        )
    if meta.get("architecture", LEGACY_ARCHITECTURE) != architecture:
        raise IntegrityError(
            f"{where}: architecture mismatch: {META} says {meta.get('architecture')!r}, "
            f"{CONFIG} says {architecture!r}"
        )
    try:
        theta, _ = load_theta(loc.path / MODEL, config)
    except ValueError as err:
        if looks_like_pickle(loc.path / MODEL):
            raise IntegrityError(
                f"{where}: {MODEL} is a pickle (torch.save output), not safetensors; the zoo "
                "holds safetensors only and never unpickles anything"
            ) from None
        kind = "architecture mismatch between config.json and model.safetensors: "
        if "not a valid safetensors" in str(err):
            kind = ""
        raise IntegrityError(f"{where}: {kind}{err}") from None
    try:
        header = _embedded_config(loc.path / MODEL)
    except ValueError as err:
        raise IntegrityError(f"{where}: config stored in {MODEL} is invalid ({err})") from None
    embedded = header.config
    if header.architecture is not None and header.architecture != architecture:
        raise IntegrityError(
            f"{where}: architecture mismatch: {CONFIG} says {architecture!r} but {MODEL} holds "
            f"{header.architecture!r} weights"
        )
    if embedded is not None and embedded != config:
        raise IntegrityError(
            f"{where}: architecture mismatch: {CONFIG} ({config}) differs from the config "
            f"stored with the weights in {MODEL} ({embedded})"
        )
    content_sha = theta_sha256(theta)
    if verify:
        if meta.get("theta_sha256") != content_sha:
            raise IntegrityError(
                f"{where}: theta sha256 mismatch (recorded {str(meta.get('theta_sha256'))[:12]}…, "
                f"loaded {content_sha[:12]}…)"
            )
        if meta.get("num_params") != config.num_params:
            raise IntegrityError(
                f"{where}: {META} says num_params {meta.get('num_params')} but the config has "
                f"{config.num_params}"
            )
    return ZooEntry(
        ref=loc.ref,
        name=loc.name,
        version=str(loc.version),
        path=loc.path,
        theta=theta,
        config=config,
        meta=meta,
        sha256=file_sha256(loc.path / MODEL),
        theta_sha256=content_sha,
        bundled=loc.bundled,
        architecture=architecture,
        format_version=entry_format,
    )


def check(loc: Location) -> VerifyResult:
    """Verify one entry; an entry removed meanwhile raises :class:`EntryNotFoundError`."""
    try:
        entry = read_entry(loc, verify=True)
    except IntegrityError as err:
        found = info(loc)
        return VerifyResult(
            loc.ref,
            loc.path,
            loc.bundled,
            str(err),
            found.format_version,
            found.architecture or None,
        )
    return VerifyResult(
        loc.ref, loc.path, loc.bundled, None, entry.format_version, entry.architecture
    )
