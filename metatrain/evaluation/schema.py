"""JSON Schema (draft 2020-12) of ``eval.json``, schema id ``lozoo-eval/1``.

Kept as data so that tests, CI and downstream tools validate reports with any JSON Schema
validator (``jsonschema.validate(report, REPORT_SCHEMA)``); lozoo itself does not import one.
Numbers that can be undefined (a mean over diverged runs, a standard error over one value) are
``null``, never NaN: strict JSON has no NaN.
"""

from __future__ import annotations

from typing import Any

from .report import METRICS, SCHEMA

__all__ = ["REPORT_SCHEMA"]

_NUM = {"type": "number"}
_OPT_NUM = {"type": ["number", "null"]}
_INT = {"type": "integer", "minimum": 0}
_CURVE = {"type": "array", "items": _OPT_NUM, "minItems": 1}


def _obj(props: dict[str, Any], extra: bool = False) -> dict[str, Any]:
    return {
        "type": "object",
        "required": sorted(props),
        "properties": props,
        "additionalProperties": extra,
    }


_STAT = _obj({"mean": _OPT_NUM, "se": _OPT_NUM, "n": _INT})
_METRICS = _obj({m: _STAT for m in METRICS})
_CHECKPOINT = _obj(
    {"step": {"type": "integer", "minimum": 1}, "adam_steps": {"type": "number"}, "ratio": _NUM}
)
_BAND = _obj({k: _CURVE for k in ("mean", "se", "ema_mean", "ema_se")})

_TASK = _obj(
    {
        "index": _INT,
        "label": {"type": "string"},
        "static": {"type": "object", "required": ["kind"]},
        "lane": {"type": "object"},
        "num_params": _INT,
        "seconds": _NUM,
        "learned": _obj({"metrics": _METRICS, "diverged_seeds": _INT}),
        "adam_best": _obj(
            {
                "lr": {"type": "number", "exclusiveMinimum": 0},
                "metrics": _METRICS,
                "final_smoothed_train_loss": _STAT,
                "diverged_seeds": _INT,
            }
        ),
        "adam_grid": {
            "type": "array",
            "minItems": 1,
            "items": _obj(
                {
                    "lr": {"type": "number", "exclusiveMinimum": 0},
                    "final_smoothed_train_loss": _STAT,
                    "mean_train_loss": _STAT,
                    "final_val_loss": _STAT,
                    "diverged_seeds": _INT,
                }
            ),
        },
        "speedup": _obj(
            {
                "at_step": _INT,
                "adam_steps": {"type": "number", "minimum": 0},
                "ratio": _NUM,
                "checkpoints": {"type": "array", "minItems": 1, "items": _CHECKPOINT},
            }
        ),
        "curves": _obj(
            {
                "steps": {"type": "array", "items": _INT, "minItems": 1},
                "learned": _BAND,
                "adam_best": _BAND,
                "adam_grid_ema_mean": {"type": "array", "items": _CURVE, "minItems": 1},
                "speedup_adam_steps": _CURVE,
                "val_steps": {"type": "array", "items": _INT, "minItems": 1},
                "learned_val_loss": _CURVE,
                "adam_best_val_loss": _CURVE,
            }
        ),
    }
)

_CONFIG = _obj(
    {
        "optimizer": _obj(
            {
                "ref": {"type": "string"},
                "kind": {"enum": ["zoo", "run_dir", "file"]},
                "resolved": {"type": "string"},
                "theta_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "architecture": {"type": "string"},
                "lopt_config": {"type": "object"},
            }
        ),
        "task_family": {"type": "string"},
        "task_options": {"type": "object"},
        "num_tasks": {"type": "integer", "minimum": 1},
        "steps": {"type": "integer", "minimum": 2},
        "seeds": {"type": "integer", "minimum": 1},
        "adam_lrs": {"type": "array", "items": {"type": "number"}, "minItems": 1},
        "adam": {"type": "object"},
        "learned_lr": _NUM,
        "eval_every": _INT,
        "val_batches": {"type": "integer", "minimum": 1},
        "splits": {"type": "object"},
        "ema_alpha": _NUM,
        "normalizer_points": {"type": "integer", "minimum": 2},
        "eval_seed": {"type": "integer"},
        "metatrain_seed": {"type": ["integer", "null"]},
        "threads": {"type": "integer", "minimum": 1},
    }
)

_SEEDS = _obj(
    {
        "eval_seed": {"type": "integer"},
        "namespace": {"type": "array", "items": {"type": "integer"}},
        "salt": _INT,
        "metatrain_seed": {"type": ["integer", "null"]},
        "disjoint": {"type": "object", "required": ["by_construction", "check"]},
        "tasks": {
            "type": "array",
            "items": _obj(
                {
                    "task": _INT,
                    "inits": {"type": "array", "items": _INT, "minItems": 1},
                    "data": _INT,
                    "valid": _INT,
                }
            ),
        },
    }
)

_AGGREGATE = _obj(
    {
        "learned": _METRICS,
        "adam_best": _METRICS,
        "win_rate": _obj(
            {
                k: {"type": "number", "minimum": 0, "maximum": 1}
                for k in ("mean_train_loss", "last_train_loss")
            }
        ),
        "speedup": _obj(
            {
                "mean": _OPT_NUM,
                "se": _OPT_NUM,
                "n": _INT,
                "median": _NUM,
                "checkpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _obj({"step": _INT, "mean": _OPT_NUM, "se": _OPT_NUM, "n": _INT}),
                },
            }
        ),
    }
)

REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "lozoo evaluation report",
    **_obj(
        {
            "schema": {"const": SCHEMA},
            "created": {"type": "string"},
            "command": {"type": ["string", "null"]},
            "runtime_s": _NUM,
            "config": _CONFIG,
            "seeds": _SEEDS,
            "tasks": {"type": "array", "items": _TASK, "minItems": 1},
            "aggregate": _AGGREGATE,
            "files": _obj({"curves": {"type": "string"}, "speedup": {"type": "string"}}),
        }
    ),
}
REPORT_SCHEMA["properties"]["published"] = _obj(
    {"ref": {"type": "string"}, "path": {"type": "string"}}
)
