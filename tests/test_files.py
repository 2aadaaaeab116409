"""lopt.files.atomic_write (the one atomic writer) and lopt.tree (the one pytree map)."""

from __future__ import annotations

import os

import pytest
import torch

from lopt.files import atomic_write
from lopt.tree import tree_map, tree_stack


def test_atomic_write_bytes_text_and_writer(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    assert atomic_write(path, b"\x00\x01") == path
    assert path.read_bytes() == b"\x00\x01"
    atomic_write(path, "θ text")
    assert path.read_text(encoding="utf-8") == "θ text"
    atomic_write(path, lambda f: torch.save({"x": torch.ones(2)}, f))
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]  # no temp files left


def test_atomic_write_fsyncs_the_file_and_its_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}") if os.path.exists("/proc") else None)
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    atomic_write(tmp_path / "f.txt", "x")
    assert len(synced) == 2  # the data before the rename, the directory after it
    if os.path.exists("/proc"):
        assert synced == [False, True]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write(path, "old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_tree_map_and_stack_over_nested_dicts():
    a = {"p": torch.ones(2), "s": {"m": torch.zeros(1), "t": torch.tensor(3.0)}}
    b = tree_map(lambda x: x + 1, a)
    assert torch.equal(b["s"]["m"], torch.ones(1)) and torch.equal(b["p"], 2 * torch.ones(2))
    summed = tree_map(lambda x, y: x + y, a, b)
    assert torch.equal(summed["s"]["t"], torch.tensor(7.0))
    stacked = tree_stack([a, b])
    assert stacked["s"]["m"].shape == (2, 1) and torch.equal(stacked["p"][1], b["p"])
