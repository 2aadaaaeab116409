"""The human-readable card (``README.md``, Hugging Face model-card style) of a zoo entry.

The card is generated from the config and ``meta.json`` so it can never drift from them: how to
use the weights, the command that reproduces them, the meta-training setup, evaluation tables and
images, provenance and caveats. Free text the publisher supplies (``meta["description"]``) goes at
the top. Recognised meta keys: ``description``, ``task_family``, ``command``, ``outer_steps``,
``seed``, ``wall_time_s``, ``meta_training`` (dict), ``metrics`` (flat ``{metric: value}`` or
``{task: {metric: value}}``), ``source`` (dict), ``caveats`` (list of str); any other key is
shown in an "Other metadata" table.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from typing import Any

import lopt

from .entry import RESERVED_META

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")
_SHOWN = {
    "description",
    "task_family",
    "command",
    "outer_steps",
    "seed",
    "wall_time_s",
    "meta_training",
    "metrics",
    "source",
    "caveats",
}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, sort_keys=True)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _table(rows: Mapping[str, Any], head: tuple[str, str] = ("key", "value")) -> list[str]:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in rows.items()]
    return lines


def _metrics(metrics: Any) -> list[str]:
    if not isinstance(metrics, Mapping) or not metrics:
        return [f"`{_fmt(metrics)}`"] if metrics else []
    if all(isinstance(v, Mapping) for v in metrics.values()):
        columns = sorted({c for row in metrics.values() for c in row})
        lines = ["| task | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for task, row in metrics.items():
            cells = [_fmt(row[c]) if c in row else "" for c in columns]
            lines.append(f"| {_fmt(task)} | " + " | ".join(cells) + " |")
        return lines
    return _table(_flatten(metrics), ("metric", "value"))


def _command(command: Any) -> str:
    if isinstance(command, (list, tuple)):
        return shlex.join(str(c) for c in command)
    return str(command)


def render(
    name: str,
    version: str,
    config: Any,
    meta: Mapping[str, Any],
    attachments: list[str],
) -> str:
    """Markdown card for one entry (``attachments``: file names inside the entry)."""
    family = name.split("/")[0]
    arch = lopt.architecture_of(config)
    summary = arch.summary(config) or (
        f"A {arch.name} learned optimizer with {config.num_params:,} meta-parameters."
    )
    out = [
        "---",
        "library_name: lozoo",
        "tags:",
        "- learned-optimizer",
        f"- {arch.name}",
        *([f"- {family}"] if family != arch.name else []),
        "---",
        "",
        f"# {name} {version}",
        "",
    ]
    if meta.get("description"):
        out += [str(meta["description"]).strip(), ""]
    out += [
        summary,
        "",
        "## Use",
        "",
        "```python",
        "import lopt",
        f'opt = lopt.{arch.optimizer.__name__}(model.parameters(), weights="{name}:{version}")',
        "```",
        "",
    ]
    if meta.get("command"):
        out += ["## Reproduce", "", "```bash", _command(meta["command"]), "```", ""]
    training = {
        k: meta[k] for k in ("task_family", "outer_steps", "seed", "wall_time_s") if k in meta
    }
    if isinstance(meta.get("meta_training"), Mapping):
        training.update(_flatten(meta["meta_training"]))
    if training:
        out += ["## Meta-training", "", *_table(training), ""]
    images = [a for a in attachments if a.lower().endswith(IMAGE_SUFFIXES)]
    if meta.get("metrics") or images:
        out += ["## Evaluation", "", *_metrics(meta.get("metrics")), ""]
        out += [line for a in images for line in (f"![{a}]({a})", "")]
    out += [
        "## Optimizer config",
        "",
        *_table({"architecture": arch.name, **_flatten(config.to_dict())}),
        "",
    ]
    if isinstance(meta.get("source"), Mapping):
        out += ["## Provenance", "", *_table(_flatten(meta["source"])), ""]
    if meta.get("caveats"):
        caveats = meta["caveats"] if isinstance(meta["caveats"], list) else [meta["caveats"]]
        out += ["## Caveats", "", *[f"- {c}" for c in caveats], ""]
    other = {k: v for k, v in meta.items() if k not in _SHOWN and k not in RESERVED_META}
    if other:
        out += ["## Other metadata", "", *_table(_flatten(other)), ""]
    files = [a for a in attachments if a not in images]
    out += [
        "## Integrity",
        "",
        f"- `model.safetensors` sha256: `{meta.get('sha256', '')}`",
        f"- θ content sha256 (`lopt.theta_sha256`): `{meta.get('theta_sha256', '')}`",
        f"- created {meta.get('created', '')} with lozoo {meta.get('lozoo_version', '')}",
        *[f"- attachment [{a}]({a})" for a in files],
        f"- check with `python -m zoo verify {name}:{version}`",
        "",
    ]
    return "\n".join(out)
