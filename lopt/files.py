"""The one atomic file writer of lozoo.

A reader (another process, or this one after a crash) sees either the old file or the whole new
one, never a torn write: the bytes go to a unique temp file in the target's directory, are
flushed and fsynced, the temp file is renamed over the target, and the directory is fsynced so
the rename itself survives a power cut. Weights, checkpoints, reports and caches all use it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "fsync_dir"]

Content = bytes | str | Callable[[BinaryIO], object]


def atomic_write(path: str | os.PathLike[str], content: Content, encoding: str = "utf-8") -> Path:
    """Atomically replace ``path`` with ``content``: bytes, text (``encoding``), or a function
    that writes into the binary file it is given (``lambda f: torch.save(obj, f)``).

    Parent directories are created. On any error the temp file is removed and ``path`` is left
    as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, bytes):
                f.write(content)
            elif isinstance(content, str):
                f.write(content.encode(encoding))
            else:
                content(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory so that renames inside it are durable (a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; its file systems journal renames
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
