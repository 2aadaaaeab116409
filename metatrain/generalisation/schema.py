"""JSON Schema (draft 2020-12) of ``suite.json``, schema id ``lozoo-suite/1``.

The report is validated against it before anything is written, so a malformed report never
lands on disk. Undefined numbers (a mean over diverged runs, a standard error over one seed)
are ``null``; strict JSON has no NaN.
"""

from __future__ import annotations

import functools
from typing import Any

from .report import FINAL_KEYS, FRACTIONS, SCHEMA

__all__ = ["SUITE_SCHEMA", "validate_report"]

_NUM = {"type": "number"}
_OPT_NUM = {"type": ["number", "null"]}
_INT = {"type": "integer", "minimum": 0}
_CURVE = {"type": "array", "items": _OPT_NUM, "minItems": 1}
_NUMS = {"type": "array", "items": _NUM, "minItems": 1}


def _obj(
    props: dict[str, Any], extra: bool = False, optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    return {
        "type": "object",
        "required": sorted(k for k in props if k not in optional),
        "properties": props,
        "additionalProperties": extra,
    }


_STAT = _obj({"mean": _OPT_NUM, "se": _OPT_NUM, "n": _INT})
_CONFIG = _obj(
    {
        "lr": {"type": "number", "exclusiveMinimum": 0},
        "schedule": {"enum": ["constant", "cosine"]},
        "weight_decay": {"type": "number", "minimum": 0},
    }
)
_TUNED = _obj(
    {
        "best": _CONFIG,
        "lr_at_grid_edge": {"type": "boolean"},
        "grid": {
            "type": "array",
            "minItems": 1,
            "items": _obj(
                {
                    "config": _CONFIG,
                    "final_train_loss": _OPT_NUM,
                    "final_test_loss": _OPT_NUM,  # absent in reports of before 2026-11-30
                    "diverged": {"type": "boolean"},
                    "divergence": {"type": ["string", "null"]},
                },
                optional=("final_test_loss",),
            ),
        },
        "seeds": {"type": "integer", "minimum": 1},
        "smoothed_train_loss": _obj({str(f): _STAT for f in FRACTIONS}),
        "final": _obj({k: _STAT for k in FINAL_KEYS}),
        "initial_loss": _STAT,
        "diverged_seeds": _INT,
        "divergence": {"type": "array", "items": {"type": "string"}},
        "curve": _obj(
            {
                "steps": {"type": "array", "items": _INT, "minItems": 1},
                "mean": _CURVE,
                "se": _CURVE,
                "grid_seed0": {"type": "array", "items": _CURVE, "minItems": 1},
            }
        ),
        "seconds": {"type": "number", "minimum": 0},
    }
)
_COMPARISON = _obj({"normalised_final_loss": _NUMS, "speedup": _NUMS})
_ABLATED = _obj(
    {
        "best": _CONFIG,
        "final_train_loss": _STAT,
        "diverged_seeds": _INT,
        "normalised_final_loss": _NUMS,
        "speedup": _NUMS,
    }
)
_PROBLEM = _obj(
    {
        "name": {"type": "string"},
        "title": {"type": "string"},
        "data": {"type": "string"},
        "steps": {"type": "integer", "minimum": 2},
        "num_params": {"type": "integer", "minimum": 1},
        "optimizer": _TUNED,
        "reference": _TUNED,
        "comparison": _COMPARISON,
        "ablation": {
            "type": "object",
            "additionalProperties": _obj({"optimizer": _ABLATED, "reference": _ABLATED}),
        },
    },
    optional=("ablation",),
)
_IQM = _obj(
    {
        "iqm": _NUM,
        "ci95": {"type": "array", "items": _NUM, "minItems": 2, "maxItems": 2},
        "scores": {"type": "array", "items": _NUMS, "minItems": 1},
        "bootstrap_reps": {"type": "integer", "minimum": 1},
    }
)
SUITE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA,
    **_obj(
        {
            "schema": {"const": SCHEMA},
            "created": {"type": "string"},
            "command": {"type": ["string", "null"]},
            "runtime_s": {"type": "number", "minimum": 0},
            "config": {
                "type": "object",
                "required": [
                    "optimizer",
                    "problems",
                    "seeds",
                    "optimizer_spec",
                    "reference_spec",
                    "torch",
                ],
            },
            "runs": _obj(
                {
                    "compute_s": {"type": "object", "additionalProperties": _NUM},
                    "computed": _INT,
                    "reused_from_cache": _INT,
                    "cache": {"type": "string"},
                }
            ),
            "incomplete": {"type": "array", "items": {"type": "string"}},
            "stopped": {"type": ["string", "null"]},
            "problems": {"type": "array", "items": _PROBLEM, "minItems": 1},
            "aggregate": _obj(
                {
                    "normalised_final_loss": _IQM,
                    "speedup": _IQM,
                    "diverged_problems": _INT,
                    "ablation": {
                        "type": "object",
                        "additionalProperties": _obj(
                            {
                                "optimizer": _obj({"normalised_final_loss": _IQM, "speedup": _IQM}),
                                "reference": _obj({"normalised_final_loss": _IQM, "speedup": _IQM}),
                            }
                        ),
                    },
                },
                optional=("ablation",),
            ),
            "published": _obj({"ref": {"type": "string"}, "path": {"type": "string"}}),
        },
        optional=("published",),
    ),
}


def validate_report(report: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first schema violation (needs ``jsonschema``)."""
    try:
        import jsonschema
    except ImportError as err:  # pragma: no cover - exercised only without the eval extra
        raise ImportError(
            f"checking the suite report needs jsonschema ({err}); pip install 'lozoo[eval]'"
        ) from err
    err = jsonschema.exceptions.best_match(_validator().iter_errors(report))
    if err is not None:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ValueError(
            f"suite report does not match {SCHEMA} at {where}: {err.message}"
        ) from None


@functools.cache
def _validator() -> Any:
    """The schema's validator, built (and the schema checked) once: that check is the slow part."""
    import jsonschema

    cls = jsonschema.validators.validator_for(SUITE_SCHEMA)
    cls.check_schema(SUITE_SCHEMA)
    return cls(SUITE_SCHEMA)
