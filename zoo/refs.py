"""Zoo names, semantic versions and references (``family/name[:version|:latest]``).

Names double as relative paths inside a zoo root, so validation is also the path-traversal
defence: exactly two non-empty parts, lowercase ``[a-z0-9][a-z0-9._-]*`` each, never ``..``, never
absolute, never a backslash. Versions are strict ``MAJOR.MINOR.PATCH`` (no pre-release tags) so
that "newest" is a plain tuple comparison and directory names sort predictably.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidRefError

_PART = re.compile(r"[a-z0-9][a-z0-9._-]*")
_SEMVER = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")
MAX_PART_LEN = 100
LATEST = "latest"
NAME_RULES = "lowercase letters, digits, '_', '-' and '.' (not as the first character)"


@dataclass(frozen=True, order=True)
class Version:
    """A strict semantic version; ordering is numeric (1.10.0 > 1.9.0)."""

    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    def bump_minor(self) -> Version:
        return Version(self.major, self.minor + 1, 0)

    def bump_patch(self) -> Version:
        return Version(self.major, self.minor, self.patch + 1)


FIRST_VERSION = Version(1, 0, 0)


@dataclass(frozen=True)
class Ref:
    """A parsed reference: ``name`` plus an exact ``version`` or ``None`` for the newest."""

    name: str
    version: Version | None = None

    @property
    def family(self) -> str:
        return self.name.split("/")[0]

    @property
    def short(self) -> str:
        return self.name.split("/")[1]

    def __str__(self) -> str:
        return f"{self.name}:{self.version}" if self.version else self.name


def parse_version(text: str) -> Version:
    """Parse ``MAJOR.MINOR.PATCH``; ``1.0``, ``v1.0.0`` or ``1.0.0-rc1`` are rejected."""
    match = _SEMVER.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidRefError(
            f"version {text!r} is not a strict semantic version MAJOR.MINOR.PATCH (e.g. 1.0.0)"
        )
    return Version(*(int(g) for g in match.groups()))


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid ``family/name``, else raise :class:`InvalidRefError`."""
    if not isinstance(name, str):
        raise InvalidRefError(f"zoo name must be a string, got {type(name).__name__}")
    shown = repr(name)
    if not name:
        raise InvalidRefError("zoo name is empty; expected 'family/name' (e.g. small_fc_lopt/mlp)")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[\\/]", name):
        raise InvalidRefError(
            f"zoo name {shown} must not be an absolute path; expected 'family/name'"
        )
    if "\\" in name:
        raise InvalidRefError(f"zoo name {shown} must not contain '\\'; expected 'family/name'")
    if ".." in name:
        raise InvalidRefError(f"zoo name {shown} must not contain '..'; expected 'family/name'")
    parts = name.split("/")
    if len(parts) != 2:
        raise InvalidRefError(
            f"zoo name {shown} must be exactly 'family/name' (one '/'), got {len(parts)} part(s)"
        )
    if not all(parts):
        raise InvalidRefError(f"zoo name {shown} has an empty part; expected 'family/name'")
    for part in parts:
        if len(part) > MAX_PART_LEN:
            raise InvalidRefError(f"zoo name part {part[:20]!r}... is longer than {MAX_PART_LEN}")
        if not _PART.fullmatch(part):
            raise InvalidRefError(f"zoo name part {part!r} in {shown} is invalid: use {NAME_RULES}")
    return name


def parse_ref(ref: str | Ref) -> Ref:
    """Parse ``family/name``, ``family/name:latest`` or ``family/name:1.2.3``."""
    if isinstance(ref, Ref):
        return ref
    if not isinstance(ref, str):
        raise InvalidRefError(f"zoo reference must be a string, got {type(ref).__name__}")
    name, sep, version = ref.partition(":")
    if sep and re.match(r"[A-Za-z]$", name):  # "C:\..." is a Windows path, not name:version
        raise InvalidRefError(f"zoo name {ref!r} must not be an absolute path")
    validate_name(name)
    if not sep or version == LATEST:
        return Ref(name)
    if not version:
        raise InvalidRefError(f"zoo reference {ref!r} has an empty version after ':'")
    return Ref(name, parse_version(version))
