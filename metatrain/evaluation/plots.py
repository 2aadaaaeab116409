"""The evaluation figures, drawn from the JSON report alone (so anyone can redraw them).

* ``curves.png``: per task, the learned optimizer against the best Adam of the grid: EMA(0.95)
  smoothed train loss, seed mean ± standard error, log scale.
* ``speedup.png``: left, the Adam steps needed to reach the learned optimizer's (smoothed) loss
  at each step, per task and averaged, against the "as fast as Adam" diagonal; right, their
  ratio to the step: the speedup over Adam along the run.

Figures render with matplotlib's Agg canvas (no pyplot, no display): CI, servers and notebooks
alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MAX_PANELS", "new_figure", "plot_curves", "plot_speedup", "save_figure"]

MAX_PANELS = 16
_LEARNED, _ADAM = "tab:blue", "tab:orange"


def new_figure(**kwargs: Any):
    """A bare matplotlib ``Figure`` (Agg, off pyplot), for every lozoo report plot."""
    # A bare Figure renders with Agg and never touches pyplot's global backend or figure list,
    # so the same code is safe in a CLI, a server and a notebook with an inline backend.
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _arr(values: list[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


def _title(report: Mapping[str, Any]) -> str:
    cfg = report["config"]
    ref = str(cfg["optimizer"]["ref"])
    name = ref if len(ref) <= 40 else "…" + ref[-39:]
    return (
        f"{name} vs tuned Adam on {cfg['task_family']}: {cfg['num_tasks']} held-out tasks × "
        f"{cfg['seeds']} seeds, {cfg['steps']} steps"
    )


def plot_curves(report: Mapping[str, Any], path: str | Path, dpi: int = 100) -> Path:
    """Learning curves, one panel per task (the first :data:`MAX_PANELS` tasks)."""
    shown = report["tasks"][:MAX_PANELS]
    ncols = min(4, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig = new_figure(figsize=(4.0 * ncols, 3.2 * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, task in zip(axes.flat, shown):
        c = task["curves"]
        x = np.asarray(c["steps"])
        for key, color, label in (
            ("learned", _LEARNED, "learned"),
            ("adam_best", _ADAM, f"Adam lr={task['adam_best']['lr']:g}"),
        ):
            mean, se = _arr(c[key]["ema_mean"]), _arr(c[key]["ema_se"])
            ax.plot(x, mean, color=color, label=label, lw=1.5)
            ax.fill_between(x, mean - se, mean + se, color=color, alpha=0.25, lw=0)
        _scale(ax, c)
        ax.set_title(f"task {task['index']}: {task['label']}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (EMA 0.95)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    more = len(report["tasks"]) - len(shown)
    fig.suptitle(_title(report) + (f" (first {len(shown)}; {more} more)" if more else ""))
    fig.tight_layout()
    return save_figure(fig, path, dpi)


def plot_speedup(report: Mapping[str, Any], path: str | Path, dpi: int = 100) -> Path:
    """Adam steps needed vs learned step (left) and their ratio, the speedup (right)."""
    fig = new_figure(figsize=(11, 4.2))
    ax, right = fig.subplots(1, 2)
    steps = np.asarray(report["tasks"][0]["curves"]["steps"], dtype=np.float64)
    needed = np.stack([_arr(t["curves"]["speedup_adam_steps"]) for t in report["tasks"]])
    shown = steps >= max(1.0, steps[-1] / 20)  # the ratio is meaningless over the first steps
    ratio = needed[:, shown] / steps[shown]
    for i, task in enumerate(report["tasks"]):
        ax.plot(steps, needed[i], lw=0.8, alpha=0.5, label=f"task {task['index']}")
        right.plot(steps[shown], ratio[i], lw=0.8, alpha=0.5)
    ax.plot(steps, needed.mean(axis=0), color="black", lw=2, label="mean")
    ax.plot(steps, steps, ls="--", color="gray", label="as fast as the best Adam")
    ax.set_xlabel("learned optimizer step")
    ax.set_ylabel("Adam steps to reach the same loss")
    ax.set_title("Steps the best Adam needs for the learned optimizer's loss", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    right.plot(steps[shown], ratio.mean(axis=0), color="black", lw=2, label="mean")
    right.axhline(1.0, ls="--", color="gray")
    right.set_xlabel("learned optimizer step")
    right.set_ylabel("speedup over Adam")
    right.set_title(
        "Speedup: > 1 is ahead of the best Adam\n"
        "(at most 1 at the last step, where Adam's runs end)",
        fontsize=9,
    )
    right.legend(fontsize=8)
    for a in (ax, right):
        a.grid(True, alpha=0.3)
    fig.suptitle(_title(report), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi)


def _scale(ax, c: Mapping[str, Any]) -> None:
    """Log y only when the curves span more than a decade; else log ticks are unreadable."""
    values = np.concatenate([_arr(c[k]["ema_mean"]) for k in ("learned", "adam_best")])
    values = values[np.isfinite(values) & (values > 0)]
    if values.size and values.max() / values.min() > 10:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def save_figure(fig, path: str | Path, dpi: int) -> Path:
    """Write ``fig`` as PNG to ``path`` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path
