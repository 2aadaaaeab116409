"""Write a suite report to disk (JSON, Markdown, PNGs) and publish it to a zoo card.

Output directory::

    OUT/suite.json              the report (schema ``lozoo-suite/1``, validated before writing)
    OUT/table.md                the Markdown tables
    OUT/summary.png             IQM of normalised loss and speedup (and the ablation)
    OUT/curves_<problem>.png    one per problem
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lopt.files import atomic_write
from metatrain.evaluation.publish import publish_source
from metatrain.evaluation.report import dumps

from .plots import plot_problem, plot_summary
from .report import _cfg, _ci, _pm, markdown
from .schema import validate_report

__all__ = ["REPORT", "publish_suite", "suite_card_metrics", "write_outputs"]

REPORT, TABLE, SUMMARY = "suite.json", "table.md", "summary.png"


def write_outputs(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Validate, then write everything; ``suite.json`` last (its presence means complete)."""
    validate_report(report)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for p in report["problems"]:
        files[f"curves_{p['name']}"] = plot_problem(report, p, out_dir / f"curves_{p['name']}.png")
    files["summary"] = plot_summary(report, out_dir / SUMMARY)
    (out_dir / TABLE).write_text(markdown(report), encoding="utf-8")
    files["table"] = out_dir / TABLE
    files["report"] = atomic_write(out_dir / REPORT, dumps(report))
    return files


def publish_suite(result: Any, name: str, *, root: Any = None):
    """Add the suite's table and figures to the zoo card of the evaluated learned optimizer.

    The same entry name: a new patch version with the evaluation (``zoo.annotate``); another
    name: the weights published under it with the evaluation and their provenance.
    """
    import zoo

    zoo.validate_name(name)
    source = result.spec.source
    if source is None:
        raise ValueError("--publish needs a learned optimizer")
    report = result.report
    metrics = suite_card_metrics(report)
    meta = {
        "metrics": metrics,
        "generalisation_suite": {
            "created": report["created"],
            "command": report["command"],
            "seeds": report["config"]["seeds"],
            "steps_scale": report["config"]["steps_scale"],
            "report": "suite.json",
            "table": "suite_table.md",
        },
    }
    attachments = {
        "suite.json": result.files["report"],
        "suite_summary.png": result.files["summary"],
        "suite_table.md": result.files["table"],
    }
    for key, path in result.files.items():
        if key.startswith("curves_"):
            attachments[f"suite_{key}.png"] = path
    entry = publish_source(source, name, meta, attachments, root=root)
    report["published"] = {"ref": entry.ref, "path": str(entry.path)}
    result.files["report"].write_text(dumps(report), encoding="utf-8")
    return entry


def suite_card_metrics(
    report: dict[str, Any], label: str = "suite", *, test_loss: bool = False
) -> dict[str, dict[str, str]]:
    """A suite report as zoo-card table rows: one per problem and the IQM row, ``label`` first.

    ``test_loss`` adds the learned optimizer's and AdamW's final test loss to each problem row.
    """
    metrics: dict[str, dict[str, str]] = {}
    for p in report["problems"]:
        t, cmp, ref = p["optimizer"], p["comparison"], p["reference"]["final"]
        row = {
            "best lr, schedule, wd": _cfg(t["best"]),
            "final train loss": _pm(t["final"]["train_loss"]),
            "test loss": _pm(t["final"]["test_loss"]) if test_loss else None,
            "test accuracy": _pm(t["final"]["test_accuracy"]),
            "AdamW final train loss": _pm(ref["train_loss"]),
            "AdamW test loss": _pm(ref["test_loss"]) if test_loss else None,
            "loss / AdamW (seed mean)": f"{np.mean(cmp['normalised_final_loss']):.3g}",
            "speedup over AdamW (seed mean)": f"{np.mean(cmp['speedup']):.3g}",
            "diverged seeds": f"{t['diverged_seeds']}/{t['seeds']}",
        }
        metrics[f"{label} {p['name']}"] = {k: v for k, v in row.items() if v is not None}
    agg = report["aggregate"]
    metrics[f"{label} IQM [95% CI]"] = {
        "loss / AdamW (seed mean)": _ci(agg["normalised_final_loss"]),
        "speedup over AdamW (seed mean)": _ci(agg["speedup"]),
    }
    return metrics
