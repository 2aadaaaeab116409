"""Evaluation of learned optimizers against a tuned Adam on held-out tasks.

Design: docs/design/meta_training.md §10.

``python -m metatrain.eval --optimizer REF --task-family F`` is the front door; from Python::

    from metatrain.evaluation import EvalConfig, evaluate, publish_with_evaluation
    result = evaluate(EvalConfig("runs/my-run", task_family="mlp_mnist", num_tasks=4))
    result.report["aggregate"]["speedup"]          # also in result.out_dir / "eval.json"
    publish_with_evaluation(result, "small_fc_lopt/my_mnist")

Modules: :mod:`.config` (what runs), :mod:`.seeds` (held-out seeds), :mod:`.source` (REF →
θ), :mod:`.optimizers` and :mod:`.runner` (batched inner training), :mod:`.normalizer`
(speedup over Adam), :mod:`.report`, :mod:`.schema`, :mod:`.plots`, :mod:`.evaluate`,
:mod:`.publish`.
"""

from .config import DEFAULT_ADAM_LRS, EvalConfig
from .evaluate import EvalResult, evaluate, write_outputs
from .normalizer import SpeedupNormalizer, best_index, ema, lower_envelope
from .optimizers import AdamGrid, LearnedOptimizer
from .publish import publish_with_evaluation
from .runner import TaskCurves, train_task
from .schema import REPORT_SCHEMA
from .seeds import make_eval_seeds, metatrain_seeds
from .source import LearnedSource, resolve_optimizer

__all__ = [
    "DEFAULT_ADAM_LRS",
    "REPORT_SCHEMA",
    "AdamGrid",
    "EvalConfig",
    "EvalResult",
    "LearnedOptimizer",
    "LearnedSource",
    "SpeedupNormalizer",
    "TaskCurves",
    "best_index",
    "ema",
    "evaluate",
    "lower_envelope",
    "make_eval_seeds",
    "metatrain_seeds",
    "publish_with_evaluation",
    "resolve_optimizer",
    "train_task",
    "write_outputs",
]
