"""On-disk layout of a zoo, name locks and the atomic publish / remove primitives.

Layout of a zoo root (the user zoo and the bundled zoo are identical in shape)::

    ROOT/
      FAMILY/NAME/MAJOR.MINOR.PATCH/   one immutable entry
        model.safetensors  config.json  meta.json  README.md  [attachments]
      FAMILY/NAME/.tmp-*/              a publish in progress (or a crashed one)
      .locks/FAMILY/NAME.lock          exclusive lock per name (publish, remove)

Readers never lock. They only see directories whose names are valid semantic versions, and such a
directory only ever appears through one ``os.rename`` of a fully written and fsynced staging
directory, so a half-written entry is never visible. Removal renames the entry out of the way
(to a hidden ``.trash-*`` dir) before deleting it, for the same reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import EntryExistsError, EntryNotFoundError, InvalidRefError, ZooError
from .refs import _PART, Ref, Version, parse_version

ENV_VAR = "LOZOO_ZOO"
BUNDLED_ROOT = Path(__file__).resolve().parent / "bundled"
"""The read-only zoo shipped inside the package (tests monkeypatch this attribute)."""
LOCK_TIMEOUT_S = 120.0
STAGING_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


def user_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The writable zoo: ``root`` if given, else ``$LOZOO_ZOO``, else ``user_cache_dir/zoo``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("lozoo")) / "zoo"


def bundled_root() -> Path:
    return BUNDLED_ROOT


@dataclass(frozen=True)
class Location:
    """Where one entry lives; ``bundled`` entries are read-only."""

    name: str
    version: Version
    path: Path
    bundled: bool

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def zoo_label(self) -> str:
        return "bundled" if self.bundled else "user"


def _versions_in(root: Path, name: str, bundled: bool) -> list[Location]:
    name_dir = root / name
    out = []
    if not name_dir.is_dir():
        return out
    for child in name_dir.iterdir():
        if child.name.startswith(".") or not child.is_dir():
            continue  # staging/trash dirs and stray files are invisible by construction
        try:
            version = parse_version(child.name)
        except InvalidRefError:
            continue
        out.append(Location(name, version, child, bundled))
    return out


def scan(root: Path, bundled: bool) -> tuple[list[Location], list[str]]:
    """All entries under ``root`` plus human-readable notes about directories that are ignored."""
    entries: list[Location] = []
    strays: list[str] = []
    if not root.is_dir():
        return entries, strays
    for family in sorted(root.iterdir()):
        if family.name.startswith(".") or not family.is_dir():
            continue
        if not _PART.fullmatch(family.name) or ".." in family.name:
            strays.append(f"{family}: not a valid family name, ignored")
            continue
        for short in sorted(family.iterdir()):
            if short.name.startswith(".") or not short.is_dir():
                continue
            if not _PART.fullmatch(short.name) or ".." in short.name:
                strays.append(f"{short}: not a valid entry name, ignored")
                continue
            name = f"{family.name}/{short.name}"
            found = _versions_in(root, name, bundled)
            entries.extend(found)
            for child in short.iterdir():
                if child.name.startswith(".") or child in {loc.path for loc in found}:
                    continue
                strays.append(f"{child}: version directory name is not MAJOR.MINOR.PATCH, ignored")
    entries.sort(key=lambda loc: (loc.name, loc.version, loc.bundled))
    return entries, strays


def candidates(name: str, root: Path) -> list[Location]:
    """Every version of ``name`` in the user zoo ``root`` and the bundled zoo, oldest first."""
    found = _versions_in(root, name, False) + _versions_in(bundled_root(), name, True)
    return sorted(found, key=lambda loc: (loc.version, loc.bundled))


def newest(locations: list[Location]) -> Location:
    """Highest version; on an exact tie the user zoo wins over the bundled one."""
    return max(locations, key=lambda loc: (loc.version, not loc.bundled))


def find(ref: Ref, root: Path) -> Location:
    """Resolve a parsed reference against the user zoo ``root`` and the bundled zoo."""
    found = candidates(ref.name, root)
    if ref.version is not None:
        exact = [loc for loc in found if loc.version == ref.version]
        if exact:
            return newest(exact)
        have = ", ".join(str(v) for v in sorted({loc.version for loc in found}))
        raise EntryNotFoundError(
            f"zoo entry {ref.name} has no version {ref.version} "
            f"(available: {have or 'none'}; user zoo {root}, bundled zoo {bundled_root()})"
        )
    if not found:
        raise EntryNotFoundError(not_found_message(ref.name, root))
    return newest(found)


def not_found_message(name: str, root: Path) -> str:
    import difflib

    names = sorted({loc.name for loc in scan(root, False)[0] + scan(bundled_root(), True)[0]})
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (
        f"no zoo entry named {name!r} in the user zoo ({root}) or the bundled zoo.{hint} "
        f"Publish one with 'python -m zoo publish RUN_DIR --name {name}' (or meta-train with "
        f"'python -m metatrain ... --publish {name}'), point LOZOO_ZOO at a zoo that has it, "
        "or pass the weights directly (a dict of tensors or a .safetensors path)."
    )


@contextlib.contextmanager
def name_lock(root: Path, name: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive inter-process lock for one name (publish and remove of that name serialise)."""
    from filelock import FileLock, Timeout

    family, short = name.split("/")
    lock_dir = root / ".locks" / family
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_dir / f"{short}.lock"), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise ZooError(
            f"timed out after {timeout:.0f} s waiting for the lock of zoo entry {name} "
            f"({lock.lock_file}); another publish or remove of that name is still running"
        ) from None
    try:
        yield
    finally:
        lock.release()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories need it so the rename itself is durable)."""
    if os.name == "nt" and path.is_dir():
        return  # Windows cannot open directories for fsync; NTFS journals the rename itself
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_stale(name_dir: Path) -> None:
    """Delete staging/trash dirs left by crashed publishers; only call under the name lock."""
    if not name_dir.is_dir():
        return
    for child in name_dir.iterdir():
        if child.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


@contextlib.contextmanager
def staging_dir(name_dir: Path) -> Iterator[Path]:
    """A hidden temp dir next to the final entry (same filesystem, so rename is atomic)."""
    name_dir.mkdir(parents=True, exist_ok=True)
    tmp = name_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would make a shared zoo unreadable to others
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def commit(staged: Path, final: Path) -> None:
    """fsync every staged file and the dir, then make the entry visible with one rename."""
    for child in staged.iterdir():
        fsync_path(child)
    fsync_path(staged)
    if final.exists():  # rename() would silently replace an empty dir; never overwrite
        raise EntryExistsError(f"zoo entry {final} appeared while publishing; not overwritten")
    os.rename(staged, final)
    fsync_path(final.parent)


def delete(loc: Location) -> None:
    """Remove an entry: hide it with a rename first so readers never see a partial delete."""
    trash = loc.path.with_name(f"{TRASH_PREFIX}{loc.version}-{os.getpid()}")
    os.rename(loc.path, trash)
    fsync_path(loc.path.parent)
    shutil.rmtree(trash)
