"""IDX reader: round trips on files the tests write, and every malformed-file error path."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from tasks.idx import read_idx, write_idx


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(2 * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 28, 28),
        torch.tensor([5, 0, 4, 1, 9], dtype=torch.uint8),
        torch.tensor([-2, 7], dtype=torch.int8),
        torch.tensor([[-300, 2], [3, 30000]], dtype=torch.int16),
        torch.tensor([1, -70000], dtype=torch.int32),
        torch.tensor([[0.5, -1.25]], dtype=torch.float32),
        torch.tensor([1e300], dtype=torch.float64),
    ],
    ids=["uint8-images", "uint8-labels", "int8", "int16", "int32", "float32", "float64"],
)
def test_round_trip(tmp_path: Path, tensor: torch.Tensor, compress: bool) -> None:
    path = tmp_path / "file-idx"
    write_idx(path, tensor, compress=compress)
    out = read_idx(path)
    assert out.dtype == tensor.dtype
    assert torch.equal(out, tensor)


def test_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    path = tmp_path / "labels-without-gz-suffix"
    write_idx(path, torch.tensor([3, 1], dtype=torch.uint8), compress=True)
    assert read_idx(path).tolist() == [3, 1]


def test_header_is_big_endian_mnist_layout(tmp_path: Path) -> None:
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 7, 2, 1]))
    assert read_idx(path).tolist() == [7, 2, 1]
    path.write_bytes(bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 0x01, 0x02, 0xFF, 0xFE]))
    assert read_idx(path).tolist() == [258, -2]


VALID = bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", r"0 bytes is too short"),
        (b"\x00\x00\x08", r"3 bytes is too short"),
        (b"\x01\x00\x08\x01" + bytes(8), r"wrong magic number 0x01000801"),
        (b"PK\x03\x04" + bytes(20), r"wrong magic number 0x504b0304"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", r"unknown type byte 0x07"),
        (b"\x00\x00\x08\x00", r"implausible number of dims 0"),
        (b"\x00\x00\x08\xff" + bytes(8), r"implausible number of dims 255"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00", r"truncated header: 3 dims need 16 bytes"),
        (VALID[:-1], r"truncated: header says dims \(2, 3\) of uint8 \(18 bytes in all\)"),
        (VALID + b"\x00", r"has trailing bytes: header says dims \(2, 3\)"),
        (bytes([0, 0, 0x0C, 1, 0, 0, 0, 2]) + bytes(7), r"truncated: .* of int32 \(16 bytes"),
    ],
    ids=[
        "empty",
        "short",
        "nonzero-magic",
        "zip-file",
        "bad-type",
        "zero-dims",
        "too-many-dims",
        "short-header",
        "truncated-data",
        "trailing-bytes",
        "truncated-int32",
    ],
)
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_malformed_files_raise_clear_errors(
    tmp_path: Path, content: bytes, match: str, compress: bool
) -> None:
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(gzip.compress(content) if compress else content)
    with pytest.raises(ValueError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, torch.zeros(4, 28, 28, dtype=torch.uint8), compress=True)
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match=r"corrupt or truncated gzip stream"):
        read_idx(path)


def test_corrupt_gzip_payload(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    data = bytearray(gzip.compress(VALID * 50))
    data[12:20] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupt or truncated gzip stream"):
        read_idx(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot be read"):
        read_idx(tmp_path / "nope")


def test_write_rejects_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot write int64"):
        write_idx(tmp_path / "x", torch.zeros(3, dtype=torch.int64))
