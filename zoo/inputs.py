"""Checks on what a publisher hands in: the extra metadata and the attachment files.

They run before the name lock is taken, so a bad argument fails fast and nothing is written.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .entry import REQUIRED, RESERVED_META, looks_like_pickle

PathLike = str | os.PathLike[str]
Attachments = Mapping[str, PathLike] | Iterable[PathLike] | None
ATTACHMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``meta`` that is JSON-serialisable and leaves the zoo's own keys alone."""
    meta = dict(meta or {})
    reserved = sorted(set(meta) & set(RESERVED_META))
    if reserved:
        raise ValueError(
            f"meta keys {reserved} are written by the zoo itself; remove them from meta "
            f"(reserved: {', '.join(RESERVED_META)})"
        )
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise ValueError(f"meta must be JSON-serialisable: {err}") from None
    return meta


def check_attachments(attachments: Attachments) -> dict[str, Path]:
    """``{file name in the entry: source path}``; plain names, existing files, no pickles."""
    if attachments is None:
        return {}
    if isinstance(attachments, Mapping):
        pairs = [(str(k), Path(v)) for k, v in attachments.items()]
    else:
        pairs = [(Path(p).name, Path(p)) for p in attachments]
    out: dict[str, Path] = {}
    for fname, src in pairs:
        if not ATTACHMENT_NAME.fullmatch(fname) or fname in REQUIRED or fname in out:
            raise ValueError(
                f"attachment name {fname!r} is invalid: use a plain file name (letters, digits, "
                f"'.', '_', '-'; no '/' or leading '.'), unique and not one of {list(REQUIRED)}"
            )
        if not src.is_file():
            raise FileNotFoundError(f"attachment {fname!r}: file not found: {src}")
        if looks_like_pickle(src) or looks_like_pickle(Path(fname)):
            raise ValueError(
                f"attachment {fname!r} ({src}) looks like a pickle; the zoo never stores pickles"
            )
        out[fname] = src
    return out
