"""From tuned runs to the suite report: per-problem metrics, speedup, IQM with bootstrap CIs.

Per problem and optimizer (the best config, S seeds; mean ± standard error over seeds):
smoothed train loss (EMA 0.95 of the per-step batch loss) at 25/50/75/100 % of the steps, final
train and test loss and accuracy (fixed evaluation sets), divergence, and against tuned AdamW:

* **normalised final loss** ``min(L, L₀) / L̄_AdamW``: the run's final train loss (its first loss
  ``L₀`` if it diverged or ended above it: no better than not training) over tuned AdamW's
  seed-mean final train loss. 1 is AdamW; lower is better.
* **speedup** from the smoothed curves: if the optimizer reaches tuned AdamW's final smoothed loss
  ``L_A`` at step ``k*``, ``(K−1)/k*`` (≥ 1: how much sooner); otherwise the AdamW steps needed to
  reach the optimizer's final smoothed loss over the horizon, ``f_A(L)/(K−1)`` (< 1). The two
  agree at 1 and a diverged run scores 0.

Across problems both are aggregated with the interquartile mean (IQM) over all (seed, problem)
scores and a 95 % stratified-bootstrap confidence interval, computed by ``rliable``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from metatrain.evaluation.normalizer import SpeedupNormalizer
from metatrain.evaluation.report import curve, curve_indices, mean_se

from .config import SuiteConfig
from .optimizers import OptimizerSpec
from .runner import EMA_ALPHA, RUN_FORMAT, RunResult
from .tuning import Tuned

__all__ = [
    "FRACTIONS",
    "SCHEMA",
    "build_report",
    "comparison_markdown",
    "iqm_with_ci",
    "markdown",
    "normalised_loss",
    "speedup",
]

SCHEMA = "lozoo-suite/1"
FRACTIONS = (25, 50, 75, 100)
BOOTSTRAP_REPS = 2000
FINAL_KEYS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def scored_loss(run: RunResult) -> float:
    """``min(L, L₀)``, with a non-finite or diverged final loss counted as ``L₀``."""
    value = run.final.get("train_loss")
    start = run.initial_loss
    if run.diverged or value is None or not math.isfinite(value):
        return start
    return min(float(value), start)


def normalised_loss(runs: Sequence[RunResult], reference: Sequence[RunResult]) -> np.ndarray:
    """Per seed of ``runs``: ``min(L, L₀)`` over the reference's seed-mean final train loss."""
    # a loss of exactly 0 (a float32 cross-entropy can underflow) must not divide by zero
    ref = max(float(np.mean([scored_loss(r) for r in reference])), 1e-12)
    return np.array([scored_loss(r) / ref for r in runs])


def speedup(run: RunResult, reference_mean_curve: np.ndarray) -> float:
    """The two-sided speedup of one run over a reference's seed-mean raw loss curve."""
    steps = len(run.train_loss)
    own = run.smoothed()
    if not np.isfinite(own[-1]) or run.diverged:
        return 0.0
    ref = SpeedupNormalizer.from_curves(reference_mean_curve[None, :], alpha=EMA_ALPHA)
    ref_final = float(ref.y[-1])
    if own[-1] <= ref_final:
        mine = SpeedupNormalizer.from_curves(run.train_loss[None, :], alpha=EMA_ALPHA)
        reached = float(mine.adam_steps(ref_final))
        return (steps - 1) / max(reached, 1.0)
    return float(ref.adam_steps(own[-1])) / (steps - 1)


def iqm_with_ci(scores: np.ndarray, reps: int = BOOTSTRAP_REPS, seed: int = 0) -> dict[str, Any]:
    """IQM of a ``[runs, problems]`` score matrix and its 95 % stratified-bootstrap CI (rliable)."""
    try:
        from rliable import library as rly
        from rliable import metrics
    except ImportError as err:  # pragma: no cover - exercised only without the eval extra
        raise ImportError(
            f"the suite's aggregates need rliable ({err}); pip install 'lozoo[eval]'"
        ) from err
    scores = np.asarray(scores, dtype=np.float64)
    with warnings.catch_warnings():
        # arch (rliable's bootstrap) deprecates the RandomState that rliable passes it
        warnings.simplefilter("ignore", FutureWarning)
        point, interval = rly.get_interval_estimates(
            {"x": scores},
            lambda s: np.array([metrics.aggregate_iqm(s)]),
            reps=reps,
            random_state=np.random.RandomState(seed),
        )
    lo, hi = interval["x"][:, 0]
    return {
        "iqm": float(point["x"][0]),
        "ci95": [float(lo), float(hi)],
        "scores": [[float(v) for v in row] for row in scores],
        "bootstrap_reps": reps,
    }


def _seed_curves(runs: Sequence[RunResult]) -> np.ndarray:
    return np.stack([r.train_loss for r in runs])


def tuned_record(t: Tuned) -> dict[str, Any]:
    runs = t.seeds
    steps = runs[0].steps
    smoothed = np.stack([r.smoothed() for r in runs])
    at = {str(f): mean_se(smoothed[:, max(0, round(steps * f / 100) - 1)]) for f in FRACTIONS}
    idx = curve_indices(steps)
    with np.errstate(invalid="ignore"):
        se = (
            smoothed.std(axis=0, ddof=1) / math.sqrt(len(runs))
            if len(runs) > 1
            else np.zeros(steps)
        )
    return {
        "best": t.best.to_dict(),
        "lr_at_grid_edge": t.lr_at_edge,
        "grid": [
            {
                "config": r.config.to_dict(),
                "final_train_loss": _num(r.final.get("train_loss")),
                "final_test_loss": _num(r.final.get("test_loss")),
                "diverged": r.diverged,
                "divergence": r.divergence,
            }
            for r in t.grid
        ],
        "seeds": len(runs),
        "smoothed_train_loss": at,
        "final": {
            k: mean_se([np.nan if r.final.get(k) is None else r.final[k] for r in runs])
            for k in FINAL_KEYS
        },
        "initial_loss": mean_se([r.initial_loss for r in runs]),
        "diverged_seeds": sum(r.diverged for r in runs),
        "divergence": [r.divergence for r in runs if r.diverged],
        "curve": {
            "steps": idx.tolist(),
            "mean": curve(smoothed.mean(axis=0)[idx]),
            "se": curve(se[idx]),
            "grid_seed0": [curve(r.smoothed()[idx]) for r in t.grid],
        },
        "seconds": float(sum(r.seconds for r in {id(r): r for r in [*t.grid, *runs]}.values())),
    }


def _compare(opt: Tuned, ref: Tuned) -> dict[str, Any]:
    ref_curve = np.nanmean(_seed_curves(ref.seeds), axis=0) if ref.seeds else None
    return {
        "normalised_final_loss": [float(v) for v in normalised_loss(opt.seeds, ref.seeds)],
        "speedup": [speedup(r, ref_curve) for r in opt.seeds],
    }


def _aggregate(
    problems: Sequence[Mapping[str, Any]], key: str, path=("comparison",)
) -> dict[str, Any]:
    seeds = min(len(_dig(p, path)[key]) for p in problems)
    matrix = np.array([[_dig(p, path)[key][s] for p in problems] for s in range(seeds)])
    return iqm_with_ci(matrix)


def _dig(d: Mapping[str, Any], path: Sequence[str]) -> Any:
    for k in path:
        d = d[k]
    return d


def build_report(
    cfg: SuiteConfig,
    spec: OptimizerSpec,
    reference: OptimizerSpec,
    results: Sequence[Any],
    *,
    command: str | None,
    runtime_s: float,
    created: str,
    incomplete: list[str],
    stopped: str | None,
    runs: dict[str, Any],
) -> dict[str, Any]:
    import torch

    problems = []
    for res in results:
        p = res.problem
        record: dict[str, Any] = {
            "name": p.name,
            "title": p.title,
            "data": p.data,
            "steps": p.steps,
            "num_params": res.num_params,
            "optimizer": tuned_record(res.optimizer),
            "reference": tuned_record(res.reference),
            "comparison": _compare(res.optimizer, res.reference),
        }
        if res.ablation:
            record["ablation"] = {
                label: {
                    who: {
                        "best": t.best.to_dict(),
                        "final_train_loss": mean_se([scored_loss(r) for r in t.seeds]),
                        "diverged_seeds": sum(r.diverged for r in t.seeds),
                        **_compare(t, res.reference),
                    }
                    for who, t in pair.items()
                }
                for label, pair in res.ablation.items()
            }
        problems.append(record)
    aggregate: dict[str, Any] = {
        "normalised_final_loss": _aggregate(problems, "normalised_final_loss"),
        "speedup": _aggregate(problems, "speedup"),
        "diverged_problems": sum(1 for p in problems if p["optimizer"]["diverged_seeds"]),
    }
    if problems and "ablation" in problems[0]:
        aggregate["ablation"] = {
            label: {
                who: {
                    key: _aggregate(problems, key, ("ablation", label, who))
                    for key in ("normalised_final_loss", "speedup")
                }
                for who in ("optimizer", "reference")
            }
            for label in problems[0]["ablation"]
        }
    return {
        "schema": SCHEMA,
        "created": created,
        "command": command,
        "runtime_s": runtime_s,
        "config": {
            **cfg.to_dict(),
            "problems": [p["name"] for p in problems] + incomplete,
            "optimizer_spec": {
                "name": spec.name,
                "kind": spec.kind,
                "identity": spec.identity,
                "lr_centre": spec.lr_centre,
            },
            "reference_spec": {
                "name": reference.name,
                "kind": reference.kind,
                "identity": reference.identity,
                "lr_centre": reference.lr_centre,
            },
            "ema_alpha": EMA_ALPHA,
            "run_format": RUN_FORMAT,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "runs": runs,
        "incomplete": incomplete,
        "stopped": stopped,
        "problems": problems,
        "aggregate": aggregate,
    }


def _pm(stat: Mapping[str, Any], digits: int = 3) -> str:
    if stat["mean"] is None:
        return "n/a"
    se = "" if stat["se"] is None else f" ± {stat['se']:.{max(1, digits - 1)}g}"
    return f"{stat['mean']:.{digits}g}{se}"


def _cfg(best: Mapping[str, Any]) -> str:
    return f"{best['lr']:g}, {best['schedule']}, wd {best['weight_decay']:g}"


def _ci(agg: Mapping[str, Any]) -> str:
    lo, hi = agg["ci95"]
    return f"{agg['iqm']:.3g} [{lo:.3g}, {hi:.3g}]"


_TABLE_HEAD = (
    "| problem | optimizer | best (lr, schedule, wd) | loss@25% | @50% | @75% | @100% | "
    "final train loss | train acc | test loss | test acc | diverged | speedup vs AdamW |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
)


def _row(problem: Mapping[str, Any], who: str, t: Mapping[str, Any], speed: Any) -> str:
    s, f = t["smoothed_train_loss"], t["final"]
    edge = " (edge)" if t["lr_at_grid_edge"] else ""
    div = f"{t['diverged_seeds']}/{t['seeds']}"
    speed = "1 (reference)" if speed is None else _pm(mean_se(speed))
    return (
        f"| {problem['name']} ({problem['steps']} steps) | {who} | {_cfg(t['best'])}{edge} | "
        + " | ".join(_pm(s[str(q)]) for q in FRACTIONS)
        + f" | {_pm(f['train_loss'])} | {_pm(f['train_accuracy'])} | {_pm(f['test_loss'])} "
        f"| {_pm(f['test_accuracy'])} | {div} | {speed} |"
    )


def _grid_divergences(report: Mapping[str, Any]) -> list[str]:
    """``problem, optimizer, config: reason`` for every diverged grid run of the report."""
    cfg = report["config"]
    names = {"optimizer": cfg["optimizer_spec"]["name"], "reference": cfg["reference_spec"]["name"]}
    out = []
    for p in report["problems"]:
        for who in (
            ("reference", "optimizer")
            if names["optimizer"] != names["reference"]
            else ("reference",)
        ):
            for g in p[who]["grid"]:
                if g["diverged"]:
                    c = g["config"]
                    out.append(
                        f"{p['name']}, {names[who]}, lr {c['lr']:g} {c['schedule']} wd "
                        f"{c['weight_decay']:g}: {g['divergence']}"
                    )
    return out


def _grid_table(report: Mapping[str, Any], name: str, ref: str) -> list[str]:
    """Every seed-0 grid run as ``train / test`` per lr: what the lr chosen on the final train
    loss costs in test loss (an over-fitting lr shows as a low train and a high test loss).
    Reports written before grid test losses were kept show the train loss only."""
    lines = [
        "",
        "Tuning grid, seed 0 (final train loss / test loss; * chosen; the choice is by train "
        "loss only):",
        "",
        "| problem | optimizer | schedule, wd | lr: train / test |",
        "|---|---|---|---|",
    ]
    for p in report["problems"]:
        for who, label in (("reference", ref), ("optimizer", name)):
            if who == "optimizer" and name == ref:
                continue
            t = p[who]
            groups: dict[tuple[str, float], list[str]] = {}
            for g in sorted(t["grid"], key=lambda g: g["config"]["lr"]):
                c = g["config"]
                cell = f"{c['lr']:g}: {_loss_text(g['final_train_loss'])}"
                if "final_test_loss" in g:
                    cell += f" / {_loss_text(g['final_test_loss'])}"
                if g["diverged"]:
                    cell += " (div.)"
                if c == t["best"]:
                    cell += " *"
                groups.setdefault((c["schedule"], c["weight_decay"]), []).append(cell)
            for (schedule, wd), cells in groups.items():
                lines.append(f"| {p['name']} | {label} | {schedule}, {wd:g} | {'; '.join(cells)} |")
    return lines


def _loss_text(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def comparison_markdown(reports: Sequence[Mapping[str, Any]]) -> str:
    """One table for several optimizers' reports against the same AdamW (e.g. for README):
    the AdamW rows once, then every optimizer's row per problem, then each one's IQMs."""
    if not reports:
        raise ValueError("comparison_markdown needs at least one report")
    names = [r["config"]["optimizer_spec"]["name"] for r in reports]
    problems = [p["name"] for p in reports[0]["problems"]]
    for r in reports[1:]:
        if [p["name"] for p in r["problems"]] != problems:
            raise ValueError("the reports cover different problems; compare like with like")
    lines = list(_TABLE_HEAD)
    for i in range(len(problems)):
        first = reports[0]["problems"][i]
        lines.append(
            _row(first, reports[0]["config"]["reference_spec"]["name"], first["reference"], None)
        )
        for r, who in zip(reports, names):
            if who != r["config"]["reference_spec"]["name"]:
                p = r["problems"][i]
                lines.append(_row(p, who, p["optimizer"], p["comparison"]["speedup"]))
    lines.append("")
    for r, who in zip(reports, names):
        if who != r["config"]["reference_spec"]["name"]:
            agg = r["aggregate"]
            lines.append(
                f"- {who}: IQM normalised final train loss {_ci(agg['normalised_final_loss'])}, "
                f"IQM speedup over AdamW {_ci(agg['speedup'])}"
            )
    return "\n".join(lines) + "\n"


def markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown tables (what README and the zoo card show)."""
    cfg = report["config"]
    name, ref = cfg["optimizer_spec"]["name"], cfg["reference_spec"]["name"]
    lrs = len(cfg["lrs"]) if cfg["lrs"] else cfg["lr_points"]
    lines = [
        f"**{name}** vs tuned **{ref}** on {len(report['problems'])} held-out problems "
        f"({cfg['seeds']} seeds; grid {lrs} lr × "
        f"{len(cfg['schedules'])} schedules × {len(cfg['weight_decays'])} weight decays; "
        f"steps × {cfg['steps_scale']:g}).",
        "",
        *_TABLE_HEAD,
    ]
    for p in report["problems"]:
        lines.append(_row(p, ref, p["reference"], None))
        if name != ref:
            lines.append(_row(p, name, p["optimizer"], p["comparison"]["speedup"]))
    agg = report["aggregate"]
    lines += [
        "",
        f"IQM over (seed, problem) of {name}'s normalised final train loss (AdamW = 1, lower is "
        f"better): {_ci(agg['normalised_final_loss'])}; speedup over tuned AdamW: "
        f"{_ci(agg['speedup'])} (95 % stratified-bootstrap CIs, rliable).",
    ]
    if "ablation" in agg:
        labels = list(agg["ablation"])
        lines += [
            "",
            "Ablation (best lr within each variant, re-run on every seed): final train loss per "
            "problem, IQM of normalised final loss [95 % CI].",
            "",
            "| optimizer | variant | "
            + " | ".join(p["name"] for p in report["problems"])
            + " | IQM normalised loss |",
            "|---|---|" + "---|" * len(report["problems"]) + "---|",
        ]
        whos = [("reference", ref)] + ([("optimizer", name)] if name != ref else [])
        for who, label_who in whos:
            for label in labels:
                cells = []
                for p in report["problems"]:
                    a = p["ablation"][label][who]
                    mark = f" ({a['diverged_seeds']} div.)" if a["diverged_seeds"] else ""
                    cells.append(_pm(a["final_train_loss"]) + mark)
                lines.append(
                    f"| {label_who} | {label} | "
                    + " | ".join(cells)
                    + f" | {_ci(agg['ablation'][label][who]['normalised_final_loss'])} |"
                )
    lines += _grid_table(report, name, ref)
    diverged = _grid_divergences(report)
    if diverged:
        lines += ["", "Diverged runs of the seed-0 tuning grids (never selected):", ""]
        lines += [f"- {line}" for line in diverged]
    if report.get("incomplete"):
        lines += ["", f"Not evaluated ({report['stopped']}): {', '.join(report['incomplete'])}."]
    return "\n".join(lines) + "\n"
