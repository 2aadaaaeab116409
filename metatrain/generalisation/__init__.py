"""The generalisation benchmark: held-out real problems, tuned baselines, IQMs with CIs.

``python -m metatrain.eval --suite generalisation --optimizer REF`` is the front door
(:mod:`.cli`); from Python::

    from metatrain.generalisation import SuiteConfig, evaluate_suite
    result = evaluate_suite(SuiteConfig("small_fc_lopt/mlp_mnist", seeds=3))
    result.report["aggregate"]["speedup"]       # also in result.out_dir / "suite.json"

Modules: :mod:`.config` (grids, run configs), :mod:`.optimizers` (baselines and learned
optimizers as ``torch.optim``), :mod:`.runner` (one run, the result cache), :mod:`.tuning` (the
protocol), :mod:`.report` (metrics, speedup, rliable IQMs, Markdown), :mod:`.schema`,
:mod:`.plots`, :mod:`.write` (files, zoo card), :mod:`.suite` (orchestration), :mod:`.compare`
(several reports in one table with the goal checks; ``python -m metatrain.eval --compare``).
The problems live in :mod:`tasks.heldout`; the protocol is described in
docs/design/generalisation.md.
"""

from .compare import Comparison, compare_reports, load_report
from .config import RunConfig, SuiteConfig, lr_grid, run_grid
from .optimizers import BASELINES, OptimizerSpec, resolve_spec
from .report import comparison_markdown, iqm_with_ci, markdown, normalised_loss, speedup
from .runner import ResultCache, RunResult, train_run
from .schema import SUITE_SCHEMA, validate_report
from .suite import SuiteResult, evaluate_suite
from .tuning import Tuned, select_best, tune

__all__ = [
    "BASELINES",
    "Comparison",
    "SUITE_SCHEMA",
    "OptimizerSpec",
    "ResultCache",
    "RunConfig",
    "RunResult",
    "SuiteConfig",
    "SuiteResult",
    "Tuned",
    "compare_reports",
    "comparison_markdown",
    "evaluate_suite",
    "iqm_with_ci",
    "load_report",
    "lr_grid",
    "markdown",
    "normalised_loss",
    "resolve_spec",
    "run_grid",
    "select_best",
    "speedup",
    "train_run",
    "tune",
    "validate_report",
]
