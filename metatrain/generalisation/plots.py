"""Suite figures, drawn from the JSON report alone (Agg canvas, no pyplot state).

* ``curves_<problem>.png``: smoothed train loss of the optimizer and of tuned AdamW (seed mean ±
  standard error) with every seed-0 grid run faint behind them.
* ``summary.png``: per problem, each seed's normalised final loss and speedup over AdamW, with
  the IQM and its 95 % bootstrap CI; with an ablation, a third panel of the variants' IQMs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from metatrain.evaluation.plots import new_figure, save_figure

__all__ = ["plot_problem", "plot_summary"]

_OPT, _REF = "tab:blue", "tab:orange"


def _arr(values) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


def plot_problem(report: Mapping[str, Any], problem: Mapping[str, Any], path: str | Path) -> Path:
    cfg = report["config"]
    name, ref = cfg["optimizer_spec"]["name"], cfg["reference_spec"]["name"]
    fig = new_figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    whos = [("reference", ref, _REF)] + ([("optimizer", name, _OPT)] if name != ref else [])
    values = []
    for key, label, color in whos:
        c = problem[key]["curve"]
        x = np.asarray(c["steps"])
        for g in c["grid_seed0"]:
            ax.plot(x, _arr(g), color=color, lw=0.6, alpha=0.18)
        mean, se = _arr(c["mean"]), _arr(c["se"])
        best = problem[key]["best"]
        ax.plot(
            x,
            mean,
            color=color,
            lw=1.8,
            label=f"{label[:32]} ({best['lr']:g}, {best['schedule']}, wd {best['weight_decay']:g})",
        )
        ax.fill_between(x, mean - se, mean + se, color=color, alpha=0.25, lw=0)
        values.append(mean)
    v = np.concatenate(values)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size and v.max() / v.min() > 10:
        ax.set_yscale("log")
    if v.size:
        ax.set_ylim(top=float(np.max(v)) * 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (EMA 0.95), seed mean ± SE")
    ax.set_title(
        f"{problem['name']}: {problem['title']}\n(faint: the seed-0 tuning grid)", fontsize=9
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, 100)


def plot_summary(report: Mapping[str, Any], path: str | Path) -> Path:
    agg = report["aggregate"]
    cfg = report["config"]
    names = [p["name"] for p in report["problems"]]
    panels = [
        ("normalised_final_loss", "final train loss / tuned AdamW's\n(lower is better)", 1.0),
        ("speedup", "speedup over tuned AdamW\n(higher is better)", 1.0),
    ]
    has_ablation = "ablation" in agg
    fig = new_figure(figsize=(5.0 * (len(panels) + has_ablation), 4.4))
    axes = fig.subplots(1, len(panels) + has_ablation, squeeze=False)[0]
    for ax, (key, label, ideal) in zip(axes, panels):
        for j, p in enumerate(report["problems"]):
            ys = np.asarray(p["comparison"][key], dtype=np.float64)
            ax.scatter(np.full(len(ys), j), ys, color=_OPT, s=14, alpha=0.7)
        a = agg[key]
        lo, hi = a["ci95"]
        x = len(names)
        ax.errorbar(
            [x],
            [a["iqm"]],
            yerr=[[a["iqm"] - lo], [hi - a["iqm"]]],
            fmt="D",
            color="black",
            capsize=4,
        )
        ax.axhline(ideal, ls="--", color="gray", lw=1)
        ax.set_xticks(
            range(len(names) + 1), [*names, "IQM\n(95 % CI)"], rotation=30, fontsize=7, ha="right"
        )
        ax.set_ylabel(label, fontsize=8)
        if key == "normalised_final_loss":
            finite = [v for p in report["problems"] for v in p["comparison"][key] if v > 0]
            if finite and max(finite) / min(finite) > 20:
                ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    if has_ablation:
        ax = axes[-1]
        labels = list(agg["ablation"])
        whos = [("reference", cfg["reference_spec"]["name"], _REF)]
        if cfg["optimizer_spec"]["name"] != cfg["reference_spec"]["name"]:
            whos.append(("optimizer", cfg["optimizer_spec"]["name"], _OPT))
        width = 0.8 / len(whos)
        for i, (who, label, color) in enumerate(whos):
            stats = [agg["ablation"][lab][who]["normalised_final_loss"] for lab in labels]
            iqm = np.array([s["iqm"] for s in stats])
            lo = np.array([s["ci95"][0] for s in stats])
            hi = np.array([s["ci95"][1] for s in stats])
            x = np.arange(len(labels)) + (i - (len(whos) - 1) / 2) * width
            ax.bar(x, iqm, width, color=color, alpha=0.8, label=label[:28])
            ax.errorbar(x, iqm, yerr=[iqm - lo, hi - iqm], fmt="none", color="black", capsize=3)
        ax.axhline(1.0, ls="--", color="gray", lw=1)
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7, ha="right")
        ax.set_ylabel("IQM normalised final loss (AdamW best = 1)", fontsize=8)
        ax.set_title("ablation: schedule / weight decay", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    ref = cfg["optimizer_spec"]["name"]
    fig.suptitle(f"{ref[:48]} on the generalisation suite ({cfg['seeds']} seeds)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, 100)
