"""Run the generalisation suite: tune the optimizer and AdamW on every held-out problem, report.

Order of work: problem by problem, AdamW (the reference every speedup is measured against) then
the optimizer, then each ablation variant. Every run goes through the result cache, so a second
evaluation, another optimizer against the same AdamW, or a run continued after ``--max-time``
reuses what is on disk. When ``--max-time`` runs out, the problems finished so far are reported
and the report says which were not.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from tasks.heldout import HeldOutProblem, get_problem

from .config import RunConfig, SuiteConfig, lr_grid, run_grid
from .optimizers import OptimizerSpec, resolve_spec
from .runner import OutOfTime, ResultCache, RunResult, train_run
from .tuning import MAX_EXTENSIONS, Tuned, ablation_variants, restrict, tune, variant_label

__all__ = ["ProblemResult", "SuiteResult", "SuiteRunner", "evaluate_suite"]

log = logging.getLogger("lozoo.suite")
REFERENCE = "adamw"


@dataclass
class ProblemResult:
    problem: HeldOutProblem
    num_params: int
    optimizer: Tuned
    reference: Tuned
    ablation: dict[str, dict[str, Tuned]] = field(default_factory=dict)  # variant → who → Tuned


@dataclass
class SuiteResult:
    report: dict[str, Any]
    out_dir: Path
    files: dict[str, Path]
    spec: OptimizerSpec = field(repr=False)
    entry: Any = None


class SuiteRunner:
    """Runs (or loads) the runs of one suite evaluation; counts what it computed."""

    def __init__(self, cfg: SuiteConfig, cache: ResultCache, deadline: float | None, bar=None):
        self.cfg = cfg
        self.cache = cache
        self.deadline = deadline
        self.bar = bar
        self.computed = 0
        self.reused = 0
        self.target: str | None = None  # key of the evaluated optimizer (``--lrs`` is its grid)
        self.run_seconds: dict[str, dict[str, float]] = {}  # optimizer → run file → seconds

    def grid(self, spec: OptimizerSpec) -> list[RunConfig]:
        """``--lrs`` is the evaluated optimizer's own grid; AdamW, the reference, keeps its."""
        explicit = self.cfg.lrs and spec.key == self.target
        lrs = self.cfg.lrs if explicit else lr_grid(spec.lr_centre, self.cfg.lr_points)
        return run_grid(lrs, self.cfg.schedules, self.cfg.weight_decays)

    def run(
        self, problem: HeldOutProblem, task, spec: OptimizerSpec, cfg: RunConfig, seed: int
    ) -> RunResult:
        steps = problem.steps
        key = self.cache.key(problem, task, spec, cfg, seed, steps)
        hit = self.cache.get(key)
        if hit is not None:
            self.reused += 1
            if self.bar is not None:
                self.bar.update(steps)
            self._count(spec, key, hit)
            return hit
        if self.bar is not None:
            self.bar.set_postfix_str(f"{problem.name} {spec.name[:24]} {cfg.label} seed {seed}")
        result = train_run(
            problem, task, spec, cfg, seed, steps,
            deadline=self.deadline,
            on_steps=None if self.bar is None else self.bar.update,
        )  # fmt: skip
        self.cache.put(key, result)
        self.computed += 1
        self._count(spec, key, result)
        log.info(
            "%s %s %s seed %d: final train loss %s%s in %.1f s",
            problem.name, spec.name, cfg.label, seed, result.final.get("train_loss"),
            f" (diverged: {result.divergence})" if result.diverged else "", result.seconds,
        )  # fmt: skip
        return result

    def _count(self, spec: OptimizerSpec, key, result: RunResult) -> None:
        self.run_seconds.setdefault(spec.name, {})[self.cache.path(key).name] = result.seconds

    def tune(
        self, problem: HeldOutProblem, task, spec: OptimizerSpec, grid: list[RunConfig]
    ) -> Tuned:
        return tune(grid, self.cfg.seeds, lambda c, s: self.run(problem, task, spec, c, s))

    def planned_steps(self, problem: HeldOutProblem, specs: list[OptimizerSpec]) -> int:
        """Steps of every run the suite will ask for on ``problem`` (cache hits included)."""
        variants = (
            ablation_variants(self.cfg.ablate, self.cfg.schedules, self.cfg.weight_decays)
            if self.cfg.ablate
            else []
        )
        runs = 0
        for spec in specs:
            grid = self.grid(spec)
            runs += len(grid) + self.cfg.seeds - 1 + MAX_EXTENSIONS
            runs += sum(len(restrict(grid, v)) + self.cfg.seeds - 1 for v in variants)
        if len(specs) == 1 and variants:  # the ablation asks for the reference twice
            grid = self.grid(specs[0])
            runs += sum(len(restrict(grid, v)) + self.cfg.seeds - 1 for v in variants)
        return runs * problem.steps


def _problems(cfg: SuiteConfig) -> list[HeldOutProblem]:
    return [get_problem(n).with_steps(cfg.steps_for(get_problem(n).steps)) for n in cfg.problems]


def evaluate_suite(cfg: SuiteConfig, *, command: str | None = None) -> SuiteResult:
    """Evaluate ``cfg.optimizer`` on the held-out problems and write the report and figures."""
    from tqdm.auto import tqdm

    from .report import build_report
    from .write import write_outputs

    cfg.validate()
    out_dir = Path(cfg.out) if cfg.out else Path("runs") / f"suite-{time.strftime('%Y%m%d-%H%M%S')}"
    from .write import REPORT

    if (out_dir / REPORT).exists():
        raise ValueError(f"{out_dir / REPORT} already exists; choose another --out")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    spec = resolve_spec(cfg.optimizer)
    if cfg.publish and spec.kind != "learned":
        raise ValueError(f"--publish needs a learned optimizer; {cfg.optimizer!r} is a baseline")
    reference = resolve_spec(REFERENCE)
    specs = [reference] if spec.key == reference.key else [reference, spec]
    problems = _problems(cfg)
    start = time.perf_counter()
    deadline = start + cfg.max_time if cfg.max_time > 0 else None
    cache = ResultCache(cfg.cache_dir)
    bar = tqdm(total=0, desc="suite", unit="step", disable=not cfg.progress, dynamic_ncols=True)
    runner = SuiteRunner(cfg, cache, deadline, bar)
    runner.target = spec.key
    bar.total = sum(runner.planned_steps(p, specs) for p in problems)
    results: list[ProblemResult] = []
    stopped: str | None = None
    try:
        for problem in problems:
            task = problem.make_task()
            tuned = {s.key: runner.tune(problem, task, s, runner.grid(s)) for s in specs}
            record = ProblemResult(problem, task.num_params, tuned[spec.key], tuned[reference.key])
            for variant in (
                ablation_variants(cfg.ablate, cfg.schedules, cfg.weight_decays)
                if cfg.ablate
                else []
            ):
                record.ablation[variant_label(variant)] = {
                    who: runner.tune(problem, task, s, restrict(runner.grid(s), variant))
                    for who, s in (("optimizer", spec), ("reference", reference))
                }
            results.append(record)
    except OutOfTime as err:
        stopped = f"--max-time {cfg.max_time:g} s ran out during {err}"
        log.warning("%s; reporting the %d finished problem(s)", stopped, len(results))
    finally:
        bar.total = bar.n  # the plan counts grid extensions that may not have been needed
        bar.close()
    if not results:
        raise ValueError(
            f"no problem finished ({stopped}); raise --max-time (finished runs are cached, so a "
            "rerun continues where this one stopped)"
        )
    report = build_report(
        cfg,
        spec,
        reference,
        results,
        command=command,
        runtime_s=time.perf_counter() - start,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        incomplete=[p.name for p in problems[len(results) :]],
        stopped=stopped,
        runs={
            "compute_s": {k: sum(v.values()) for k, v in runner.run_seconds.items()},
            "computed": runner.computed,
            "reused_from_cache": runner.reused,
            "cache": str(cache.root),
        },
    )
    files = write_outputs(report, out_dir)
    result = SuiteResult(report=report, out_dir=out_dir, files=files, spec=spec)
    if cfg.publish:
        from .write import publish_suite

        result.entry = publish_suite(result, cfg.publish)
    return result
