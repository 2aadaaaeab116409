"""One training run of one optimizer on one held-out problem, and the on-disk result cache.

A run is fully determined by (problem, optimizer identity, :class:`RunConfig`, seed, steps): seed
``s`` of a problem fixes the init and the order of the batches (:func:`run_seeds`), the same for
every optimizer, so every comparison is paired. The loop is the ordinary ``torch.optim`` one, with
the loss handed to ``step`` through a closure (learned optimizers that read the loss get it).

Recorded per run: the training loss of every step (on that step's batch, before its update),
the final loss and accuracy on a fixed subset of the train split and on the test split, and
divergence: a non-finite loss or a smoothed loss above 10× its start stops the run early; a run
whose final smoothed loss is above its first loss is flagged too.

Results are cached as JSON under ``$LOZOO_CACHE/suite`` (or ``--cache-dir``), keyed by a hash of
the problem (name, steps, shapes, data fingerprint), the optimizer identity, the config, the seed,
the torch version and :data:`RUN_FORMAT`; a second evaluation reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lopt.files import atomic_write
from tasks import Task
from tasks.heldout import HeldOutProblem, data_fingerprint, hidden_matrices

from .config import RunConfig
from .optimizers import OptimizerSpec

__all__ = [
    "EXPLODE_FACTOR",
    "RUN_FORMAT",
    "OutOfTime",
    "ResultCache",
    "RunResult",
    "run_seeds",
    "smooth",
    "train_run",
]

log = logging.getLogger("lozoo.suite")
RUN_FORMAT = 1
"""Bump when the training loop changes what a run computes (invalidates every cached run)."""
EXPLODE_FACTOR = 10.0
EMA_ALPHA = 0.95
EVAL_BATCH_CAP = 32  # batches of the fixed train/test evaluation sets (capped at one epoch)


class OutOfTime(Exception):
    """``--max-time`` ran out inside a run; the run is discarded, never cached."""


def smooth(values: np.ndarray, alpha: float = EMA_ALPHA) -> np.ndarray:
    """EMA along the last axis (``s₀ = y₀``); NaN propagates (a stopped run stays stopped)."""
    from metatrain.evaluation.normalizer import ema

    return ema(values, alpha)


def run_seeds(problem: str, seed: int) -> tuple[int, int]:
    """``(init seed, data seed)`` of seed index ``seed`` of ``problem``; optimizer-independent."""
    out = []
    for purpose in ("init", "data"):
        digest = hashlib.sha256(f"lozoo-suite:{problem}:{seed}:{purpose}".encode()).digest()
        out.append(int.from_bytes(digest[:4], "little"))
    return out[0], out[1]


@dataclass
class RunResult:
    """The outcome of one run (JSON round-trip: :meth:`to_dict` / :meth:`from_dict`)."""

    problem: str
    optimizer: str
    config: RunConfig
    seed: int
    steps: int
    train_loss: np.ndarray  # [steps] float64 (float32 values); NaN after an early stop
    final: dict[str, float | None]  # train_loss, train_accuracy, test_loss, test_accuracy
    diverged: bool
    divergence: str | None
    seconds: float
    cached: bool = field(default=False, compare=False)

    @property
    def initial_loss(self) -> float:
        return float(self.train_loss[0])

    @property
    def selection_loss(self) -> float:
        """What tuning minimises: the final train loss; a diverged run never wins."""
        value = self.final.get("train_loss")
        if self.diverged or value is None or not math.isfinite(value):
            return math.inf
        return float(value)

    def smoothed(self) -> np.ndarray:
        return smooth(self.train_loss)

    def to_dict(self) -> dict[str, Any]:
        return {
            "problem": self.problem,
            "optimizer": self.optimizer,
            "config": self.config.to_dict(),
            "seed": self.seed,
            "steps": self.steps,
            "train_loss": [None if not math.isfinite(v) else float(v) for v in self.train_loss],
            "final": self.final,
            "diverged": self.diverged,
            "divergence": self.divergence,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], cached: bool = False) -> RunResult:
        return cls(
            problem=d["problem"],
            optimizer=d["optimizer"],
            config=RunConfig.from_dict(d["config"]),
            seed=int(d["seed"]),
            steps=int(d["steps"]),
            train_loss=np.array(
                [math.nan if v is None else v for v in d["train_loss"]], dtype=np.float64
            ),
            final=dict(d["final"]),
            diverged=bool(d["diverged"]),
            divergence=d["divergence"],
            seconds=float(d["seconds"]),
            cached=cached,
        )


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _eval_set(task: Task, split: str) -> list[dict[str, Tensor]]:
    stream = task.batches(split, 1, 0x5EED)
    n = min(EVAL_BATCH_CAP, stream.batches_per_epoch)
    return [{k: v[0] for k, v in next(stream).items()} for _ in range(max(1, n))]


def _evaluate(task: Task, params: Mapping[str, Tensor], lane, batches) -> dict[str, float]:
    totals: dict[str, float] = {}
    with torch.no_grad():
        for batch in batches:
            for k, v in task.metrics(params, batch, lane).items():
                totals[k] = totals.get(k, 0.0) + float(v)
    return {k: v / len(batches) for k, v in totals.items()}


def train_run(
    problem: HeldOutProblem,
    task: Task,
    spec: OptimizerSpec,
    cfg: RunConfig,
    seed: int,
    steps: int,
    *,
    deadline: float | None = None,
    on_steps: Callable[[int], None] | None = None,
) -> RunResult:
    """Train ``problem`` for ``steps`` updates with ``spec`` at ``cfg`` from seed ``seed``."""
    start = time.perf_counter()
    init_seed, data_seed = run_seeds(problem.name, seed)
    lane = problem.fixed_lane()
    shapes = task.param_shapes()
    hidden = hidden_matrices(task)
    init = task.init(torch.Generator().manual_seed(init_seed), lane)
    # Muon orthogonalises matrices: hidden conv kernels are handed over as (out, in·kh·kw).
    leaves = {
        n: (v.reshape(v.shape[0], -1) if spec.matrix_view() and n in hidden else v)
        .clone()
        .requires_grad_()
        for n, v in init.items()
    }
    opt = spec.build(leaves, hidden, cfg, steps)
    stream = task.batches("train", 1, data_seed)

    def params() -> dict[str, Tensor]:
        return {n: leaves[n].view(shapes[n]) for n in shapes}

    losses = np.full(steps, math.nan, dtype=np.float32)  # float32: JSON round-trips it exactly
    divergence: str | None = None
    batch: dict[str, Tensor] = {}

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = task.loss(params(), batch, lane)
        loss.backward()
        return loss

    ema_value = math.nan
    pending = 0
    for k in range(steps):
        if deadline is not None and time.perf_counter() > deadline:
            raise OutOfTime(f"{problem.name} {spec.name} {cfg.label} seed {seed} at step {k}")
        batch = {n: v[0] for n, v in next(stream).items()}
        factor = cfg.schedule_factor(k, steps)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * factor
        loss = float(opt.step(closure).detach())
        losses[k] = loss
        ema_value = loss if k == 0 else EMA_ALPHA * ema_value + (1 - EMA_ALPHA) * loss
        pending += 1
        if on_steps is not None and pending >= 50:
            on_steps(pending)
            pending = 0
        if not math.isfinite(loss):
            divergence = f"non-finite loss at step {k}"
        elif ema_value > EXPLODE_FACTOR * losses[0]:
            divergence = f"smoothed loss above {EXPLODE_FACTOR:g}x its start at step {k}"
        if divergence is not None:
            losses[k + 1 :] = math.nan
            if on_steps is not None:
                on_steps(pending + steps - k - 1)
                pending = 0
            break
    if on_steps is not None and pending:
        on_steps(pending)

    final: dict[str, float | None] = {}
    with torch.no_grad():
        p = {n: t.detach() for n, t in params().items()}
        finite_params = all(bool(torch.isfinite(t).all()) for t in p.values())
        for split in ("train", "test"):
            metrics = _evaluate(task, p, lane, _eval_set(task, split)) if finite_params else {}
            final[f"{split}_loss"] = _finite(metrics.get("loss", math.nan))
            final[f"{split}_accuracy"] = _finite(metrics.get("accuracy", math.nan))
    if divergence is None:
        last = smooth(losses)[-1]
        if last > losses[0]:
            divergence = f"final smoothed loss {last:.4g} above its start {losses[0]:.4g}"
    return RunResult(
        problem=problem.name,
        optimizer=spec.name,
        config=cfg,
        seed=seed,
        steps=steps,
        train_loss=losses.astype(np.float64),
        final=final,
        diverged=divergence is not None,
        divergence=divergence,
        seconds=time.perf_counter() - start,
    )


class ResultCache:
    """Runs on disk, one JSON file each, keyed by everything that determines them."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        if root is None:
            from tasks.datasets import cache_root

            root = cache_root() / "suite"
        self.root = Path(root)
        self._fingerprints: dict[str, str] = {}

    def key(
        self,
        problem: HeldOutProblem,
        task: Task,
        spec: OptimizerSpec,
        cfg: RunConfig,
        seed: int,
        steps: int,
    ) -> dict[str, Any]:
        if problem.name not in self._fingerprints:
            self._fingerprints[problem.name] = data_fingerprint(task)
        return {
            "format": RUN_FORMAT,
            "problem": problem.name,
            "static": task.static.to_dict(),
            "data": self._fingerprints[problem.name],
            "steps": steps,
            "optimizer": spec.identity,
            "config": cfg.to_dict(),
            "seed": seed,
            "torch": torch.__version__,
        }

    def path(self, key: Mapping[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        return self.root / str(key["problem"]) / f"{digest[:32]}.json"

    def get(self, key: Mapping[str, Any]) -> RunResult | None:
        path = self.path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("key") != json.loads(json.dumps(key, default=str)):
                return None
            return RunResult.from_dict(data["result"], cached=True)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring unreadable cached run %s (%s)", path, err)
            return None

    def put(self, key: Mapping[str, Any], result: RunResult) -> None:
        path = self.path(key)
        text = json.dumps({"key": key, "result": result.to_dict()}, default=str)
        try:
            atomic_write(path, text)  # a reader sees no file or the whole file
        except OSError as err:
            log.warning("could not cache run in %s (%s)", path, err)
