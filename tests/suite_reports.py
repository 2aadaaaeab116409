"""Synthetic but real generalisation-suite reports, for the tests that read ``suite.json``.

Constructed runs go through the suite's own report builder and writer (``build_report``,
``write_outputs``), so the reports have the exact ``suite.json`` schema.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from metatrain.generalisation import OptimizerSpec, RunConfig, RunResult, SuiteConfig, Tuned
from metatrain.generalisation import report as report_mod
from metatrain.generalisation import write as write_mod
from metatrain.generalisation.optimizers import BASELINES
from metatrain.generalisation.suite import ProblemResult
from tasks.heldout import CORE_PROBLEMS, get_problem

ADAMW, MUON = BASELINES["adamw"], BASELINES["muon"]
BEST = RunConfig(1e-3, "cosine")


def use_fast_reports(monkeypatch) -> None:
    """Few bootstrap resamples and no figures: the numbers a test compares are exact either way."""
    monkeypatch.setattr(
        report_mod, "iqm_with_ci", functools.partial(report_mod.iqm_with_ci, reps=10)
    )
    monkeypatch.setattr(write_mod, "plot_problem", lambda report, p, path: path)
    monkeypatch.setattr(write_mod, "plot_summary", lambda report, path: path)


@dataclass
class Side:
    """One optimizer on one problem: per-seed final train and test loss, and divergence."""

    train: Sequence[float | None] = (0.5, 0.5)
    test: Sequence[float | None] = (0.6, 0.6)
    best: RunConfig = BEST
    diverged_seed: bool = False  # the last seed of the best config diverged
    diverged_grid: bool = False  # a second, worse grid config diverged on seed 0
    diverged_ablation: bool = False  # the ablation variant's best diverged on seed 1


def _run(problem: str, cfg: RunConfig, seed: int, train, test, diverged=False) -> RunResult:
    end = 3.0 if train is None else train
    return RunResult(
        problem=problem,
        optimizer="synthetic",
        config=cfg,
        seed=seed,
        steps=10,
        train_loss=np.linspace(2.0, end, 10),
        final={
            "train_loss": train,
            "train_accuracy": 0.9,
            "test_loss": test,
            "test_accuracy": None if test is None else 0.875,
        },
        diverged=diverged,
        divergence="loss above 10x its start" if diverged else None,
        seconds=0.0,
    )


def _tuned(problem: str, side: Side) -> Tuned:
    last = len(side.train) - 1
    seeds = [
        _run(problem, side.best, s, tr, te, diverged=side.diverged_seed and s == last)
        for s, (tr, te) in enumerate(zip(side.train, side.test))
    ]
    grid = [seeds[0]]
    if side.diverged_grid:
        grid.append(_run(problem, RunConfig(30.0, "cosine"), 0, None, None, diverged=True))
    return Tuned(grid=grid, best=side.best, seeds=seeds, lr_at_edge=False)


def write_report(
    out,
    spec: OptimizerSpec,
    sides: Mapping[str, Side] | None = None,
    *,
    reference: Mapping[str, Side] | None = None,
    problems: Sequence[str] = CORE_PROBLEMS,
    steps: int = 10,
    steps_scale: float = 0.01,
) -> str:
    """A ``suite.json`` of ``spec`` against AdamW in directory ``out``; returns ``out``."""
    sides, reference = sides or {}, reference or {}
    results = []
    for name in problems:
        mine, ref = sides.get(name, Side()), reference.get(name, Side())
        record = ProblemResult(
            get_problem(name).with_steps(steps),
            100,
            _tuned(name, ref if spec is ADAMW else mine),
            _tuned(name, ref),
        )
        if mine.diverged_ablation:
            variant = Side(**{**mine.__dict__, "diverged_seed": True, "diverged_ablation": False})
            record.ablation = {"constant": {"optimizer": _tuned(name, variant)}}
            record.ablation["constant"]["reference"] = _tuned(name, ref)
        results.append(record)
    if any(r.ablation for r in results):
        for r in results:  # the report needs the same ablation on every problem
            r.ablation = r.ablation or {
                "constant": {"optimizer": r.optimizer, "reference": r.reference}
            }
    cfg = SuiteConfig(
        optimizer=spec.name,
        problems=tuple(problems),
        seeds=len(next(iter(sides.values()), Side()).train),
        schedules=("cosine",),
        weight_decays=(0.0,),
        steps_scale=steps_scale,
    ).validate()
    report = report_mod.build_report(
        cfg,
        spec,
        ADAMW,
        results,
        command=None,
        runtime_s=0.0,
        created="2026-11-30T00:00:00Z",
        incomplete=[],
        stopped=None,
        runs={"compute_s": {}, "computed": 0, "reused_from_cache": 0, "cache": "none"},
    )
    write_mod.write_outputs(report, out)
    return str(out)
