"""Public zoo API: publish, load, resolve, list, verify, remove, annotate.

Versioning policy: entries are immutable. ``publish(version=None)`` takes the next *minor*
version of the name across the user and bundled zoos (first 1.0.0, then 1.1.0, ...): new weights
are a new minor. :func:`annotate` re-publishes the *same* weights with extra metadata (e.g.
evaluation results) as the next *patch* (1.1.0 → 1.1.1). Majors are only set explicitly.
``NAME``/``NAME:latest`` resolve to the highest version in either zoo; on an exact tie the user
zoo wins over the bundled one.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import lopt
from lopt.weights import save_theta

from . import card as cards
from . import store
from .entry import (
    CARD,
    CONFIG,
    FORMAT,
    META,
    MODEL,
    REQUIRED,
    RESERVED_META,
    VerifyResult,
    ZooEntry,
    ZooEntryInfo,
    check,
    config_json,
    file_sha256,
    info,
    read_entry,
)
from .errors import EntryExistsError, EntryNotFoundError, InvalidRefError, ReadOnlyError
from .inputs import Attachments, PathLike, check_attachments, check_meta
from .refs import FIRST_VERSION, LATEST, Ref, Version, parse_ref, parse_version, validate_name


def publish(
    theta: Mapping[str, torch.Tensor],
    config: Any,
    name: str,
    *,
    version: str | Version | None = None,
    meta: Mapping[str, Any] | None = None,
    card: str | None = None,
    attachments: Attachments = None,
    root: PathLike | None = None,
) -> ZooEntry:
    """Publish θ as a new immutable entry of the user zoo and return it, loaded and verified.

    ``config`` is the config of any registered architecture (or a name ``lopt.resolve_config``
    understands: ``"mulo"``, ``"small_fc_lopt"``, ``"ARCH:PRESET"``). ``meta``
    (JSON-serialisable) is merged into ``meta.json``; see :mod:`zoo.card` for the keys
    the card renders. ``card`` is free text placed at the top of the card. ``attachments`` are
    extra files copied into the entry (``{"curves.png": path}`` or a list of paths); images are
    shown in the card. The write is atomic under an exclusive per-name lock.
    """
    validate_name(name)
    cfg = _publishable_config(config)
    theta = lopt.validate_theta(theta, cfg)
    user_meta = check_meta(meta)
    if card is not None:
        user_meta["description"] = str(card)
    wanted = _as_version(version)
    return _publish(theta, cfg, name, wanted, user_meta, check_attachments(attachments), root)


def load(ref: str, *, root: PathLike | None = None, verify: bool = True) -> ZooEntry:
    """Load ``family/name[:version|:latest]``; hashes and architecture are checked first."""
    return read_entry(store.find(parse_ref(ref), store.user_root(root)), verify=verify)


def resolve(ref: str, *, root: PathLike | None = None) -> ZooEntryInfo:
    """Which entry a reference points at (nothing is loaded or verified)."""
    return info(store.find(parse_ref(ref), store.user_root(root)))


def list_entries(root: PathLike | None = None) -> list[ZooEntryInfo]:
    """Every entry of the user zoo and the bundled zoo, by name then version."""
    user, _ = store.scan(store.user_root(root), bundled=False)
    bundled, _ = store.scan(store.bundled_root(), bundled=True)
    locs = sorted(user + bundled, key=lambda loc: (loc.name, loc.version, loc.bundled))
    return _present(info, locs)


def _present(read, locs: list[store.Location]) -> list:
    """``read(loc)`` for each entry, skipping those removed since the directory scan."""
    out = []
    for loc in locs:
        try:
            out.append(read(loc))
        except EntryNotFoundError:
            continue
    return out


def ignored_paths(root: PathLike | None = None) -> list[str]:
    """Directories inside the zoos that are not entries (bad names), for ``verify`` to report."""
    return store.scan(store.user_root(root), False)[1] + store.scan(store.bundled_root(), True)[1]


def verify(ref: str | None = None, *, root: PathLike | None = None) -> list[VerifyResult]:
    """Check one entry (``ref``) or all of them; failures are results, not exceptions.

    A ``ref`` that does not resolve still raises :class:`EntryNotFoundError`.
    """
    if ref is not None:
        return [check(store.find(parse_ref(ref), store.user_root(root)))]
    user, _ = store.scan(store.user_root(root), bundled=False)
    bundled, _ = store.scan(store.bundled_root(), bundled=True)
    return _present(check, user + bundled)


def remove(ref: str, *, root: PathLike | None = None, all_versions: bool = False) -> list[str]:
    """Delete entries from the user zoo; returns the removed refs.

    ``ref`` needs an explicit version (or ``:latest``) unless ``all_versions`` is set, so a bare
    name never deletes more than the caller meant. Bundled entries are read-only.
    """
    parsed = parse_ref(ref)
    user = store.user_root(root)
    if parsed.version is None and not all_versions and not str(ref).endswith(f":{LATEST}"):
        versions = sorted({loc.version for loc in store.candidates(parsed.name, user)})
        have = ", ".join(str(v) for v in versions)
        raise InvalidRefError(
            f"remove needs an explicit version: '{parsed.name}:VERSION' (available: "
            f"{have or 'none'}) or '{parsed.name}:latest'; to remove every version of the "
            "name pass all_versions=True (CLI: --all)"
        )
    _removable(parsed, user, all_versions)  # fail fast, before creating any lock file
    with store.name_lock(user, parsed.name):
        locs = _removable(parsed, user, all_versions)  # again: the zoo may have changed
        for loc in locs:
            store.delete(loc)
    return [loc.ref for loc in locs]


def _removable(parsed: Ref, user: Path, all_versions: bool) -> list[store.Location]:
    if all_versions:
        found = store.candidates(parsed.name, user)
        if not found:
            raise EntryNotFoundError(store.not_found_message(parsed.name, user))
        locs = [loc for loc in found if not loc.bundled] or [found[0]]
    else:
        locs = [store.find(Ref(parsed.name, parsed.version), user)]
    if locs[0].bundled:
        raise ReadOnlyError(
            f"zoo entry {locs[0].ref} is bundled with lozoo ({locs[0].path}) and read-only; "
            f"it cannot be removed. Publish a newer version to the user zoo ({user}) to "
            "supersede it."
        )
    return locs


def annotate(
    ref: str,
    *,
    meta: Mapping[str, Any] | None = None,
    card: str | None = None,
    attachments: Attachments = None,
    version: str | Version | None = None,
    root: PathLike | None = None,
) -> ZooEntry:
    """Re-publish an entry's weights with added metadata (e.g. evaluation metrics, curves).

    Entries are immutable, so this creates the next free *patch* version (1.1.0 → 1.1.1) with the
    same ``model.safetensors``, the old meta updated by ``meta`` (dicts merged one level deep, so
    new ``metrics`` extend old ones), the old attachments plus ``attachments``, and a fresh card.
    """
    src = load(ref, root=root)
    new_meta = {k: v for k, v in src.meta.items() if k not in RESERVED_META}
    for key, value in check_meta(meta).items():
        old = new_meta.get(key)
        merge = isinstance(value, Mapping) and isinstance(old, Mapping)
        new_meta[key] = {**old, **value} if merge else value
    new_meta["annotates"] = {"ref": src.ref, "sha256": src.sha256}
    if card is not None:
        new_meta["description"] = str(card)
    files = {f: src.path / f for f in src.meta["files"] if f not in REQUIRED}
    files.update(check_attachments(attachments))
    wanted = _as_version(version)
    after = Version(*(int(p) for p in src.version.split(".")))
    return _publish(src.theta, src.config, src.name, wanted, new_meta, files, root, after)


# -- internals ----------------------------------------------------------------------------------
def _publishable_config(config: Any) -> Any:
    if isinstance(config, str):
        return lopt.resolve_config(config)
    name = getattr(type(config), "architecture", None)
    if not isinstance(name, str) or not name:
        raise TypeError(
            f"config must be a learned-optimizer config (e.g. lopt.ORIGINAL) or a preset name, "
            f"got {type(config).__name__}"
        )
    if name not in lopt.architecture_names():
        raise lopt.UnknownArchitectureError(
            f"cannot publish {type(config).__name__}: its architecture {name!r} is not "
            f"registered (registered: {', '.join(lopt.architecture_names())}); import the module "
            "that registers it with lopt.register_architecture first"
        )
    lopt.architecture_of(config)
    return config


def _as_version(version: str | Version | None) -> Version | None:
    if version is None or isinstance(version, Version):
        return version
    if isinstance(version, str):
        return parse_version(version)
    raise InvalidRefError(f"version must be a 'MAJOR.MINOR.PATCH' string, got {version!r}")


def _choose_version(
    name: str, wanted: Version | None, taken: dict[Version, store.Location], after: Version | None
) -> Version:
    if wanted is not None:
        if wanted in taken:
            loc = taken[wanted]
            nxt = max(taken).bump_minor()
            raise EntryExistsError(
                f"zoo entry {name}:{wanted} already exists in the {loc.zoo_label} zoo "
                f"({loc.path}); versions are immutable. Publish without a version to get {nxt}, "
                "or remove the old entry first."
            )
        return wanted
    if after is not None:
        version = after.bump_patch()
        while version in taken:
            version = version.bump_patch()
        return version
    return max(taken).bump_minor() if taken else FIRST_VERSION


def _publish(
    theta: Mapping[str, torch.Tensor],
    cfg: Any,
    name: str,
    wanted: Version | None,
    user_meta: dict[str, Any],
    attachments: dict[str, Path],
    root: PathLike | None,
    after: Version | None = None,
) -> ZooEntry:
    user = store.user_root(root)
    name_dir = user / name
    with store.name_lock(user, name):
        store.clean_stale(name_dir)
        taken = {}
        for loc in sorted(store.candidates(name, user), key=lambda loc: not loc.bundled):
            taken[loc.version] = loc  # user entries overwrite bundled ones of the same version
        version = _choose_version(name, wanted, taken, after)
        with store.staging_dir(name_dir) as tmp:
            save_theta(tmp / MODEL, theta, cfg)
            _write_text(tmp / CONFIG, json.dumps(config_json(cfg), indent=2, sort_keys=True))
            for fname, src in attachments.items():
                shutil.copyfile(src, tmp / fname)
            meta = {
                "format": FORMAT,
                "architecture": lopt.architecture_of(cfg).name,
                "name": name,
                "version": str(version),
                "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "lozoo_version": _lozoo_version(),
                "num_params": cfg.num_params,
                "sha256": file_sha256(tmp / MODEL),
                "theta_sha256": lopt.theta_sha256(theta),
                **user_meta,
            }
            text = cards.render(name, str(version), cfg, meta, sorted(attachments))
            _write_text(tmp / CARD, text)
            meta["files"] = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
            _write_text(tmp / META, json.dumps(meta, indent=2))
            final = name_dir / str(version)
            store.commit(tmp, final)
        return read_entry(store.Location(name, version, final, False), verify=True)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def _lozoo_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lozoo")
    except PackageNotFoundError:  # running from a source checkout
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        found = re.search(r'(?m)^version\s*=\s*"([^"]+)"', _read_or_empty(pyproject))
        return f"{found.group(1)}+source" if found else "unknown"


def _read_or_empty(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""
