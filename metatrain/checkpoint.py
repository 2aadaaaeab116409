"""Atomic, complete checkpoints of a meta-training run (docs/design/meta_training.md §8).

A checkpoint holds everything needed for a bit-identical serial resume: θ, the outer Adam state,
every estimator's lanes (params, optimizer state, counters, lengths, task configs), PES
accumulators, generator states, data-stream positions and the outer step. Files are written to a
temp file, fsynced and renamed, then a ``latest`` pointer is swapped the same way, so a crash at
any moment leaves the previous checkpoint intact. They contain only tensors and plain Python
containers and load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lopt.files import atomic_write

FORMAT_VERSION = 1


def save_checkpoint(run_dir: Path, step: int, payload: dict[str, Any], keep: int = 3) -> Path:
    """Write ``checkpoints/ckpt-<step>.pt`` and point ``checkpoints/latest`` at it."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt-{step:08d}.pt"
    data = {"format": FORMAT_VERSION, "step": step, **payload}
    atomic_write(path, lambda f: torch.save(data, f))
    atomic_write(ckpt_dir / "latest", path.name)
    for old in sorted(ckpt_dir.glob("ckpt-*.pt"))[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpt_dir = Path(run_dir) / "checkpoints"
    pointer = ckpt_dir / "latest"
    if pointer.exists():
        path = ckpt_dir / pointer.read_text().strip()
        if path.exists():
            return path
    found = sorted(ckpt_dir.glob("ckpt-*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which and what to do
        raise ValueError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
            "delete it to resume from the previous one"
        ) from None
    if data.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format {data.get('format')}, expected {FORMAT_VERSION}"
        )
    return data
