"""The tuning protocol, the same for every optimizer: grid on seed 0, best config, more seeds.

1. Every config of the grid (lr × schedule × weight decay) trains on seed 0.
2. The best config is the one with the lowest final train loss (on the fixed train evaluation
   set); a diverged run never wins; ties go to the earlier config in grid order. If every config
   diverged, the smallest lr with a constant schedule and the least weight decay is kept (the
   most conservative choice) and the report shows the divergence.
3. If the best lr lies at an edge of the grid, the grid grows by one half-decade past it (with
   the best config's schedule and weight decay), at most twice; the report flags an lr still
   at the edge after that.
4. The best config is re-run on seeds 1 … S−1 (seed 0 is reused), giving S seeds.

An ablation restricts step 2 to the grid configs with given values of the ablated axes (e.g.
"constant schedule, no weight decay") and re-runs that variant's best on S seeds as well.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .config import HALF_DECADES, RunConfig
from .runner import RunResult

__all__ = ["MAX_EXTENSIONS", "Tuned", "ablation_variants", "next_lr", "select_best", "tune"]

RunFn = Callable[[RunConfig, int], RunResult]
MAX_EXTENSIONS = 2
"""How many times a grid may grow past an edge lr (one half-decade each time)."""


@dataclass
class Tuned:
    """One optimizer tuned on one problem (possibly restricted to an ablation variant)."""

    grid: list[RunResult]  # seed 0 of every config tried, in order (extensions last)
    best: RunConfig
    seeds: list[RunResult]  # the best config on seeds 0 … S−1
    lr_at_edge: bool  # the best lr is still the smallest or largest tried (widen the grid)


def _conservative(configs: Sequence[RunConfig]) -> RunConfig:
    return min(configs, key=lambda c: (c.lr, c.schedule != "constant", c.weight_decay))


def select_best(results: Sequence[RunResult]) -> RunConfig:
    """The config with the lowest :attr:`RunResult.selection_loss` (see the module doc)."""
    if not results:
        raise ValueError("select_best needs at least one run")
    losses = [r.selection_loss for r in results]
    if not any(math.isfinite(v) for v in losses):
        return _conservative([r.config for r in results])
    return results[min(range(len(results)), key=lambda i: losses[i])].config


def tune(grid: Sequence[RunConfig], seeds: int, run: RunFn, extend: int = MAX_EXTENSIONS) -> Tuned:
    """Run the protocol over ``grid`` with ``run(config, seed) -> RunResult``.

    If the best lr is the smallest or largest of the grid, the next half-decade lr beyond it is
    tried with the best config's schedule and weight decay, up to ``extend`` times, so that no
    optimizer is reported at a grid edge it would have left.
    """
    if not grid:
        raise ValueError("the tuning grid is empty")
    results = {cfg: run(cfg, 0) for cfg in grid}
    for _ in range(extend):
        best = select_best(list(results.values()))
        lrs = sorted({c.lr for c in results})
        if len(lrs) < 2 or best.lr not in (lrs[0], lrs[-1]):
            break
        beyond = next_lr(best.lr, up=best.lr == lrs[-1])
        if beyond is None:
            break
        cfg = dataclasses.replace(best, lr=beyond)
        results[cfg] = run(cfg, 0)
    first = list(results.values())
    best = select_best(first)
    more = [run(best, s) for s in range(1, seeds)]
    lrs = sorted({c.lr for c in results})
    return Tuned(
        grid=first,
        best=best,
        seeds=[results[best], *more],
        lr_at_edge=len(lrs) > 1 and best.lr in (lrs[0], lrs[-1]),
    )


def next_lr(lr: float, up: bool) -> float | None:
    """The half-decade grid value just above (``up``) or below ``lr``; None past the ends."""
    values = [v for v in HALF_DECADES if (v > lr * 1.0001 if up else v < lr * 0.9999)]
    if not values:
        return None
    return min(values) if up else max(values)


def ablation_variants(
    axes: Sequence[str], schedules: Sequence[str], weight_decays: Sequence[float]
) -> list[dict[str, object]]:
    """Every combination of the ablated axes' values, e.g. ``{"schedule": "cosine"}``."""
    values: Mapping[str, Sequence[object]] = {
        "schedule": list(schedules),
        "weight_decay": list(weight_decays),
    }
    chosen = [a for a in ("schedule", "weight_decay") if a in axes]
    return [dict(zip(chosen, combo)) for combo in itertools.product(*(values[a] for a in chosen))]


def variant_label(variant: Mapping[str, object]) -> str:
    parts = []
    if "schedule" in variant:
        parts.append(str(variant["schedule"]))
    if "weight_decay" in variant:
        parts.append(f"wd={variant['weight_decay']:g}")
    return ", ".join(parts) or "all"


def restrict(grid: Sequence[RunConfig], variant: Mapping[str, object]) -> list[RunConfig]:
    return [c for c in grid if all(getattr(c, k) == v for k, v in variant.items())]
