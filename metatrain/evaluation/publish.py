"""Publish evaluated meta-weights to the zoo with the evaluation in the entry's card.

The one code path for "evaluation results go into the card": ``python -m metatrain.eval ...
--publish NAME`` and notebooks both call :func:`publish_with_evaluation`. The card (rendered by
:mod:`zoo.card`) shows ``meta["metrics"]`` as a table and image attachments inline, so the
summary table goes into ``metrics``, the setup into ``evaluation``, and the curves, the speedup
figure and the full ``eval.json`` are attached.
"""

from __future__ import annotations

from typing import Any

from .evaluate import EvalResult
from .report import METRICS, dumps

__all__ = ["ATTACHMENTS", "card_metrics", "publish_source", "publish_with_evaluation"]

ATTACHMENTS = {"curves": "eval_curves.png", "speedup": "eval_speedup.png", "report": "eval.json"}
_ADAM_ROW = "Adam (best LR per task)"


def _pm(stat: dict[str, Any], digits: int = 4) -> str:
    if stat["mean"] is None:
        return "n/a"
    se = "" if stat["se"] is None else f" ± {stat['se']:.{digits}g}"
    return f"{stat['mean']:.{digits}g}{se}"


def card_metrics(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    """``{row: {column: "mean ± SE"}}`` over tasks, the shape the zoo card renders as a table."""
    agg = report["aggregate"]
    rows = {
        who: {m: _pm(agg[key][m]) for m in METRICS}
        for who, key in (("learned", "learned"), (_ADAM_ROW, "adam_best"))
    }
    for point in agg["speedup"]["checkpoints"][1::2]:  # half way and at the end
        rows["learned"][f"speedup_over_adam@{point['step']}"] = _pm(point, 3)
    rows["learned"]["win_rate_vs_adam"] = f"{agg['win_rate']['mean_train_loss']:.2f}"
    return rows


def _evaluation_meta(report: dict[str, Any]) -> dict[str, Any]:
    cfg = report["config"]
    return {
        "task_family": cfg["task_family"],
        "task_options": cfg["task_options"],
        "num_tasks": cfg["num_tasks"],
        "seeds": cfg["seeds"],
        "steps": cfg["steps"],
        "adam_lrs": cfg["adam_lrs"],
        "eval_seed": cfg["eval_seed"],
        "metatrain_seed": cfg["metatrain_seed"],
        "created": report["created"],
        "report": ATTACHMENTS["report"],
    }


def publish_with_evaluation(result: EvalResult, name: str, *, root: Any = None):
    """Publish ``result``'s weights as ``name`` with its evaluation; returns the ``ZooEntry``.

    If the weights came from the zoo under the same name, the entry is re-published with the
    evaluation as its next *patch* version (``zoo.annotate``: same weights, metadata extended);
    otherwise a new version of ``name`` is published, inheriting the source's provenance
    (meta-training config, command, run dir or source entry). ``eval.json`` in the output
    directory then records the published reference.
    """
    import zoo

    zoo.validate_name(name)
    report, source = result.report, result.source
    if report["config"]["optimizer"]["theta_sha256"] != source.sha256:
        raise ValueError("the report does not belong to these meta-weights (sha256 differs)")
    attachments = {ATTACHMENTS[k]: result.files[k] for k in ATTACHMENTS}
    meta = {"metrics": card_metrics(report), "evaluation": _evaluation_meta(report)}
    entry = publish_source(source, name, meta, attachments, root=root)
    report["published"] = {"ref": entry.ref, "path": str(entry.path)}
    path = result.files["report"]
    path.write_text(dumps(report), encoding="utf-8")
    return entry


def publish_source(
    source: Any,
    name: str,
    meta: dict[str, Any],
    attachments: dict[str, Any],
    *,
    root: Any = None,
):
    """Put evaluated weights (a resolved optimizer source) into the zoo as ``name``.

    Weights that came from the zoo under the same name get ``meta`` and ``attachments`` as the
    entry's next *patch* version (``zoo.annotate``: same weights); anything else is published as
    a new version of ``name`` that inherits the source's provenance (and, for a zoo source, a
    ``derived_from`` record). Returns the ``ZooEntry``.
    """
    import zoo

    if source.kind == "zoo" and source.resolved.split(":")[0] == name:
        return zoo.annotate(source.resolved, meta=meta, attachments=attachments, root=root)
    inherited = dict(source.provenance)
    if source.kind == "zoo":
        inherited["derived_from"] = {"ref": source.resolved, "theta_sha256": source.sha256}
    return zoo.publish(
        source.theta,
        source.config,
        name,
        meta={**inherited, **meta},
        attachments=attachments,
        root=root,
    )
