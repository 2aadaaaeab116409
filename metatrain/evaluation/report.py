"""From raw curves to the evaluation report: per-task metrics, best Adam, speedup, aggregates.

Every statistic is "mean ± standard error" over seeds (per task) or over tasks (aggregate), as the
lozoo protocol asks (docs/design/meta_training.md §10). Non-finite values (a diverged run) are left
out of a mean and counted, so one exploding Adam LR cannot poison a table; ``n`` says how many
values a mean is over. The report is plain JSON-ready data: the CLI writes it, the plots and the zoo
card are drawn from it alone.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .normalizer import SpeedupNormalizer, best_index, ema
from .runner import TaskCurves

__all__ = [
    "METRICS",
    "SCHEMA",
    "aggregate",
    "describe_task",
    "dumps",
    "mean_se",
    "per_seed_metrics",
    "summarize_task",
]

SCHEMA = "lozoo-eval/1"
METRICS = (
    "mean_train_loss",
    "last_train_loss",
    "min_train_loss",
    "final_val_loss",
    "final_val_accuracy",
)
MAX_CURVE_POINTS = 256


def dumps(report: Mapping[str, Any]) -> str:
    """Strict JSON (no NaN), indented, with each list of numbers on one line.

    Curves are hundreds of numbers; one per line would make reports tens of thousands of lines.
    Number lists are swapped for unique placeholder strings, the rest is indented as usual, and
    the placeholders are replaced by the compact lists.
    """
    token = uuid.uuid4().hex
    compact: list[str] = []

    def walk(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            if x and all(v is None or type(v) in (int, float) for v in x):
                compact.append(json.dumps(list(x), allow_nan=False, separators=(", ", ": ")))
                return f"{token}{len(compact) - 1}"
            return [walk(v) for v in x]
        return x

    text = json.dumps(walk(report), indent=1, allow_nan=False)
    return re.sub(f'"{token}(\\d+)"', lambda m: compact[int(m.group(1))], text) + "\n"


def num(x: Any) -> float | None:
    """A JSON-safe float: ``None`` for NaN/inf (strict JSON has neither)."""
    x = float(x)
    return x if math.isfinite(x) else None


def curve(values: np.ndarray, digits: int = 6) -> list[float | None]:
    return [None if not math.isfinite(v) else float(f"{v:.{digits}g}") for v in values]


def mean_se(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """``{"mean", "se", "n"}`` over the finite values; ``se`` is ``None`` below two values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return {"mean": None, "se": None, "n": 0}
    se = float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return {"mean": float(v.mean()), "se": se, "n": n}


def per_seed_metrics(
    train_loss: np.ndarray, val_loss: np.ndarray, val_accuracy: np.ndarray | None
) -> dict[str, np.ndarray]:
    """``{metric: [S]}`` from ``train_loss [S, K]`` and final-column validation ``[S, E]``."""
    with np.errstate(invalid="ignore"):
        out = {
            "mean_train_loss": train_loss.mean(axis=-1),
            "last_train_loss": train_loss[:, -1],
            "min_train_loss": train_loss.min(axis=-1),
            "final_val_loss": val_loss[:, -1],
            "final_val_accuracy": (
                val_accuracy[:, -1] if val_accuracy is not None else np.full(len(val_loss), np.nan)
            ),
            "final_smoothed_train_loss": ema(train_loss)[:, -1],
        }
    return out


def _summary(metrics: Mapping[str, np.ndarray], keys: Sequence[str] = METRICS) -> dict[str, Any]:
    return {k: mean_se(metrics[k]) for k in keys}


def _diverged(train_loss: np.ndarray) -> int:
    return int((~np.isfinite(train_loss).all(axis=-1)).sum())


def _band(train_loss: np.ndarray, idx: np.ndarray) -> dict[str, list]:
    """Seed mean ± SE of the raw and of the EMA-smoothed curves, at indices ``idx``."""
    out = {}
    for prefix, c in (("", train_loss), ("ema_", ema(train_loss))):
        n = c.shape[0]
        with np.errstate(invalid="ignore"):
            se = c.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(c.shape[1])
        out[f"{prefix}mean"] = curve(c.mean(axis=0)[idx])
        out[f"{prefix}se"] = curve(se[idx])
    return out


def speedup_steps(steps: int) -> list[int]:
    """Where the speedup is tabulated: a quarter, half, three quarters of the run, and its end.

    At the horizon the ratio is at most 1 by construction (the normaliser is built from Adam
    runs of the same length), so the earlier points carry the "how much faster" information.
    """
    last = steps - 1
    return sorted({max(1, round(last * q)) for q in (0.25, 0.5, 0.75)} | {last})


def curve_indices(steps: int, max_points: int = MAX_CURVE_POINTS) -> np.ndarray:
    """Evenly spaced curve indices, always including the first and the last."""
    return np.unique(np.linspace(0, steps - 1, min(steps, max_points)).round().astype(int))


def summarize_task(
    curves: TaskCurves,
    adam_lrs: Sequence[float],
    learned_index: int = 0,
    adam_offset: int = 1,
) -> dict[str, Any]:
    """Metrics, best Adam, grid results, speedup and downsampled curves of one task.

    ``curves`` stacks the learned optimizer at ``learned_index`` and Adam at
    ``adam_offset + i`` for ``adam_lrs[i]``.
    """
    loss = curves.train_loss.double().numpy()  # [O, S, K]
    vloss = curves.val_loss.double().numpy()
    vacc = None if curves.val_accuracy is None else curves.val_accuracy.double().numpy()
    steps = loss.shape[-1]

    def metrics_of(o: int) -> dict[str, np.ndarray]:
        return per_seed_metrics(loss[o], vloss[o], None if vacc is None else vacc[o])

    adam = [adam_offset + i for i in range(len(adam_lrs))]
    grid = [metrics_of(o) for o in adam]
    best = best_index(np.stack([g["final_smoothed_train_loss"] for g in grid]))
    o_best, o_learned = adam[best], learned_index
    learned = metrics_of(o_learned)

    normalizer = SpeedupNormalizer.from_curves(loss[adam].mean(axis=1))
    learned_smoothed = ema(loss[o_learned].mean(axis=0))
    adam_steps = normalizer.adam_steps(learned_smoothed)
    idx = curve_indices(steps)
    return {
        "learned": {"metrics": _summary(learned), "diverged_seeds": _diverged(loss[o_learned])},
        "adam_best": {
            "lr": float(adam_lrs[best]),
            "metrics": _summary(grid[best]),
            "final_smoothed_train_loss": mean_se(grid[best]["final_smoothed_train_loss"]),
            "diverged_seeds": _diverged(loss[o_best]),
        },
        "adam_grid": [
            {
                "lr": float(lr),
                "final_smoothed_train_loss": mean_se(g["final_smoothed_train_loss"]),
                "mean_train_loss": mean_se(g["mean_train_loss"]),
                "final_val_loss": mean_se(g["final_val_loss"]),
                "diverged_seeds": _diverged(loss[o]),
            }
            for lr, g, o in zip(adam_lrs, grid, adam)
        ],
        "speedup": {
            "at_step": steps - 1,
            "adam_steps": float(adam_steps[-1]),
            "ratio": float(adam_steps[-1]) / (steps - 1),
            "checkpoints": [
                {"step": k, "adam_steps": float(adam_steps[k]), "ratio": float(adam_steps[k]) / k}
                for k in speedup_steps(steps)
            ],
        },
        "curves": {
            "steps": idx.tolist(),
            "learned": _band(loss[o_learned], idx),
            "adam_best": _band(loss[o_best], idx),
            "adam_grid_ema_mean": [curve(ema(loss[o].mean(axis=0))[idx]) for o in adam],
            "speedup_adam_steps": curve(adam_steps[idx]),
            "val_steps": list(curves.val_steps),
            "learned_val_loss": curve(vloss[o_learned].mean(axis=0)),
            "adam_best_val_loss": curve(vloss[o_best].mean(axis=0)),
        },
        "seconds": curves.seconds,
    }


def aggregate(task_records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± SE over tasks of each per-task mean, win rates and the speedup (at the horizon and
    at each checkpoint of :func:`speedup_steps`).

    A task is won when the learned optimizer's seed-mean is lower than the best Adam's (ties
    count half; a non-finite value always loses).
    """

    def values(who: str, metric: str) -> list[float]:
        return [_nan(t[who]["metrics"][metric]["mean"]) for t in task_records]

    out: dict[str, Any] = {
        who: {m: mean_se(values(who, m)) for m in METRICS} for who in ("learned", "adam_best")
    }
    out["win_rate"] = {
        m: _win_rate(values("learned", m), values("adam_best", m))
        for m in ("mean_train_loss", "last_train_loss")
    }
    ratios = [t["speedup"]["ratio"] for t in task_records]
    points = zip(*(t["speedup"]["checkpoints"] for t in task_records))
    out["speedup"] = {
        **mean_se(ratios),
        "median": float(np.median(ratios)),
        "checkpoints": [{"step": p[0]["step"], **mean_se([c["ratio"] for c in p])} for p in points],
    }
    return out


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _win_rate(learned: Sequence[float], adam: Sequence[float]) -> float:
    score = 0.0
    for a, b in zip(learned, adam):
        a = a if math.isfinite(a) else math.inf
        b = b if math.isfinite(b) else math.inf
        score += 1.0 if a < b else 0.5 if a == b else 0.0
    return score / len(learned)


def describe_task(static: Mapping[str, Any], lane: Mapping[str, Any]) -> str:
    """A short human label such as ``8×8 MLP [32] B128 relu ×1.3``."""
    kind = static.get("kind")
    act = ""
    if "activation" in lane and static.get("activations"):
        act = f" {static['activations'][int(lane['activation'])]}"
    if "init_scale" in lane:
        act += f" ×{float(lane['init_scale']):.2g}"
    size = static.get("image_size")
    if kind == "image_mlp":
        return f"{size}×{size} MLP {list(static['hidden'])} B{static['batch_size']}{act}"
    if kind == "conv":
        return f"{size}×{size} conv {list(static['channels'])} B{static['batch_size']}{act}"
    if kind == "quadratic":
        return "quadratic " + " ".join(f"{n}{tuple(d)}" for n, d in static["shapes"])
    return str(kind)
