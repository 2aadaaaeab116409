"""Run a whole evaluation: held-out tasks → inner training → report → JSON and PNGs on disk.

Output directory::

    OUT/eval.json      the report (schema ``lozoo-eval/1``; see ``metatrain/evaluation/schema.py``)
    OUT/curves.png     learned vs best Adam per task
    OUT/speedup.png    Adam steps needed to match the learned optimizer, and speedup per task
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import tasks
from lopt.files import atomic_write

from .config import ADAM_BETAS, ADAM_EPS, EMA_ALPHA, NORMALIZER_POINTS, EvalConfig
from .optimizers import AdamGrid, LearnedOptimizer
from .plots import plot_curves, plot_speedup
from .report import SCHEMA, aggregate, describe_task, dumps, summarize_task
from .runner import train_task, validation_batch, validation_steps
from .seeds import make_eval_seeds
from .source import LearnedSource, resolve_optimizer

__all__ = ["EvalResult", "default_out_dir", "evaluate"]

log = logging.getLogger("lozoo.eval")
REPORT, CURVES, SPEEDUP = "eval.json", "curves.png", "speedup.png"


@dataclass
class EvalResult:
    """The report, the weights it is about, the files written and the zoo entry, if published."""

    report: dict[str, Any]
    source: LearnedSource = field(repr=False)
    out_dir: Path
    files: dict[str, Path]
    entry: Any = None  # the zoo.ZooEntry when ``EvalConfig.publish`` was set


def default_out_dir(cfg: EvalConfig) -> Path:
    return Path("runs") / f"eval-{cfg.task_family}-{time.strftime('%Y%m%d-%H%M%S')}"


def evaluate(cfg: EvalConfig, *, command: str | None = None) -> EvalResult:
    """Evaluate ``cfg.optimizer`` against the Adam grid and write the report and figures.

    Raises ``ValueError`` for bad configuration (before any training) and if ``cfg.out``
    already holds a report: evaluations are never overwritten. With ``cfg.publish`` the
    weights and the evaluation then go to the zoo via
    :func:`metatrain.evaluation.publish_with_evaluation` (``result.entry``).
    """
    cfg.validate()
    out_dir = Path(cfg.out) if cfg.out else default_out_dir(cfg)
    if (out_dir / REPORT).exists():
        raise ValueError(f"{out_dir / REPORT} already exists; choose another --out")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    source = resolve_optimizer(cfg.optimizer)
    family = tasks.get_family(cfg.task_family, **cfg.task_option)
    seeds = make_eval_seeds(cfg.seed, cfg.num_tasks, cfg.seeds, source.metatrain)
    if cfg.seeds < 3:
        log.warning("%d seed(s): the lozoo protocol asks for at least 3 (5 preferred)", cfg.seeds)
    from ..trainer import make_writable_dir

    make_writable_dir(out_dir, "--out")  # inputs are valid: check the output before the work
    start = time.perf_counter()
    records = _run_tasks(cfg, source, family, seeds)
    runtime = time.perf_counter() - start
    report = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "runtime_s": runtime,
        "config": _config_record(cfg, source),
        "seeds": seeds.to_dict(),
        "tasks": records,
        "aggregate": aggregate(records),
        "files": {"curves": CURVES, "speedup": SPEEDUP},
    }
    files = write_outputs(report, out_dir)
    result = EvalResult(report=report, source=source, out_dir=out_dir, files=files)
    if cfg.publish:
        from .publish import publish_with_evaluation  # publish imports this module

        result.entry = publish_with_evaluation(result, cfg.publish)
    return result


def write_outputs(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``eval.json`` and both figures (JSON last: its presence means "complete")."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "curves": plot_curves(report, out_dir / CURVES),
        "speedup": plot_speedup(report, out_dir / SPEEDUP),
    }
    files["report"] = atomic_write(out_dir / REPORT, dumps(report))
    return files


def _run_tasks(cfg: EvalConfig, source: LearnedSource, family, seeds) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    learned = LearnedOptimizer(source.theta, source.config, cfg.learned_lr, num_steps=cfg.steps)
    optimizers = [learned, AdamGrid(cfg.adam_lrs)]
    val_at = validation_steps(cfg.steps, cfg.eval_every)
    records = []
    bar = tqdm(
        total=cfg.num_tasks * cfg.steps,
        desc="evaluate",
        unit="step",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    try:
        for i, task_seeds in enumerate(seeds.tasks):
            gen = torch.Generator().manual_seed(task_seeds.task)
            static = family.sample_static(gen)
            lane = family.sample_lane(gen, static)
            task = family.make_task(static)
            inits = tasks.stack_lanes(
                [task.init(torch.Generator().manual_seed(s), lane) for s in task_seeds.inits]
            )
            val_batch = validation_batch(task, task_seeds.valid, cfg.val_batches)
            bar.set_postfix(task=f"{i + 1}/{cfg.num_tasks}", refresh=False)
            curves = train_task(
                task,
                lane,
                inits,
                task_seeds.data,
                val_batch,
                optimizers,
                cfg.steps,
                val_at,
                on_step=bar.update,
            )
            static_d = static.to_dict()
            lane_d = {k: v.tolist() for k, v in lane.items()}
            record = {
                "index": i,
                "label": describe_task(static_d, lane_d),
                "static": static_d,
                "lane": lane_d,
                "num_params": task.num_params,
                **summarize_task(curves, cfg.adam_lrs),
            }
            records.append(record)
            log.info(
                "task %d (%s): mean train loss learned %s, best Adam (lr=%g) %s; speedup %.2f",
                i,
                record["label"],
                _mean(record["learned"]),
                record["adam_best"]["lr"],
                _mean(record["adam_best"]),
                record["speedup"]["ratio"],
            )
    finally:
        bar.close()
    return records


def _mean(who: dict[str, Any]) -> str:
    value = who["metrics"]["mean_train_loss"]["mean"]
    return "n/a" if value is None else f"{value:.4f}"


def _config_record(cfg: EvalConfig, source: LearnedSource) -> dict[str, Any]:
    return {
        "optimizer": source.to_dict(),
        "task_family": cfg.task_family,
        "task_options": dict(cfg.task_option),
        "num_tasks": cfg.num_tasks,
        "steps": cfg.steps,
        "seeds": cfg.seeds,
        "adam_lrs": list(cfg.adam_lrs),
        "adam": {"betas": list(ADAM_BETAS), "eps": ADAM_EPS, "weight_decay": 0.0},
        "learned_lr": cfg.learned_lr,
        "eval_every": cfg.eval_every,
        "val_batches": cfg.val_batches,
        "splits": {"train": "train", "validation": "outer_valid"},
        "ema_alpha": EMA_ALPHA,
        "normalizer_points": NORMALIZER_POINTS,
        "eval_seed": cfg.seed,
        "metatrain_seed": None if source.metatrain is None else source.metatrain.get("seed"),
        "threads": torch.get_num_threads(),
    }
