"""Reader for the IDX format of the original MNIST / Fashion-MNIST files.

Design: docs/design/tasks.md §2.1.

Layout, big-endian: two zero bytes, one type byte, one byte ``ndim``, ``ndim`` uint32 dims, then
the data in row-major order. Files may be gzip-compressed; compression is detected from the
content (the ``1f 8b`` gzip magic), not from the file name, so a renamed file still reads.

Every structural problem raises :class:`ValueError` naming the file and what is wrong, because a
silently truncated or mislabelled training set would corrupt every experiment built on it.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = ["IDX_DTYPES", "read_idx", "write_idx"]

# Type byte -> big-endian numpy dtype, as defined by the IDX format.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_NDIM = 8  # MNIST needs 1 or 3; anything near 255 is a corrupt header, not a real tensor.


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"IDX file {path}: cannot be read ({exc})") from exc
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise ValueError(f"IDX file {path}: corrupt or truncated gzip stream ({exc})") from exc


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read one IDX file (raw or gzip) into a CPU tensor of its native dtype and dims.

    Validates the two zero magic bytes, the type byte, the number of dims, and that the payload
    length equals the product of the dims times the item size exactly (a file that is too long is
    as suspect as a truncated one). Multi-byte types are converted to native byte order.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"IDX file {path}: {len(data)} bytes is too short for the 4-byte magic")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"IDX file {path}: wrong magic number 0x{data[:4].hex()}: the first two bytes "
            "must be zero (is this an IDX file?)"
        )
    type_byte, ndim = data[2], data[3]
    if type_byte not in IDX_DTYPES:
        valid = ", ".join(f"0x{t:02x}" for t in IDX_DTYPES)
        raise ValueError(f"IDX file {path}: unknown type byte 0x{type_byte:02x} (valid: {valid})")
    if not 1 <= ndim <= _MAX_NDIM:
        raise ValueError(f"IDX file {path}: implausible number of dims {ndim} (1..{_MAX_NDIM})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"IDX file {path}: truncated header: {ndim} dims need {header} bytes, "
            f"file has {len(data)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[type_byte]
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(
            f"IDX file {path}: {what}: header says dims {dims} of {dtype.name} "
            f"({expected} bytes in all), file has {len(data)} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    # astype copies into native byte order and a writable buffer torch can own.
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def write_idx(
    path: str | os.PathLike[str], tensor: torch.Tensor, *, compress: bool = False
) -> None:
    """Write ``tensor`` as an IDX file (gzip if ``compress``); the inverse of :func:`read_idx`.

    Used to build small fixture datasets (e.g. a torchvision-layout ``MNIST/raw`` in tests).
    """
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    array = tensor.detach().cpu().numpy()
    native = array.dtype.newbyteorder("=")
    if native not in codes or not 1 <= array.ndim <= _MAX_NDIM:
        raise ValueError(f"cannot write {array.dtype} with {array.ndim} dims as IDX to {path}")
    code = codes[native]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(IDX_DTYPES[code], copy=False).tobytes()
    Path(path).write_bytes(gzip.compress(payload) if compress else payload)
