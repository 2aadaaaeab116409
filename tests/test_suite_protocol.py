"""The suite's protocol: tuning, divergence, speedup and IQM, the run cache, reports and CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import jsonschema
import numpy as np
import pytest
import scipy.stats
import torch

from metatrain import eval as eval_cli
from metatrain.generalisation import (
    SUITE_SCHEMA,
    OptimizerSpec,
    ResultCache,
    RunConfig,
    RunResult,
    SuiteConfig,
    comparison_markdown,
    evaluate_suite,
    iqm_with_ci,
    lr_grid,
    normalised_loss,
    resolve_spec,
    run_grid,
    select_best,
    speedup,
    train_run,
    tune,
    validate_report,
)
from metatrain.generalisation import runner as runner_mod
from metatrain.generalisation.tuning import ablation_variants, next_lr, restrict
from tasks.heldout import get_problem


def fake_run(cfg: RunConfig, seed: int, final: float, *, diverged: bool = False, steps: int = 10):
    curve = np.linspace(2.0, final, steps)
    return RunResult(
        problem="synthetic",
        optimizer="fake",
        config=cfg,
        seed=seed,
        steps=steps,
        train_loss=curve,
        final={
            "train_loss": final,
            "train_accuracy": None,
            "test_loss": final,
            "test_accuracy": None,
        },
        diverged=diverged,
        divergence="constructed" if diverged else None,
        seconds=0.0,
    )


def synthetic_loss(cfg: RunConfig) -> float:
    """Known best: lr 1e-2 (a bowl in log lr), cosine, no weight decay."""
    bowl = (math.log10(cfg.lr) + 2.0) ** 2
    return 0.1 + bowl + (0.0 if cfg.schedule == "cosine" else 0.05) + 3.0 * cfg.weight_decay


def test_tuning_picks_the_known_best_config_and_reruns_it_on_every_seed():
    calls = []

    def run(cfg, seed):
        calls.append((cfg, seed))
        return fake_run(cfg, seed, synthetic_loss(cfg))

    grid = run_grid(lr_grid(3e-3, 3))  # 1e-3, 3e-3, 1e-2: the best lr sits on the edge
    tuned = tune(grid, seeds=3, run=run)
    assert tuned.best == RunConfig(1e-2, "cosine", 0.0)
    assert [r.seed for r in tuned.seeds] == [0, 1, 2]
    assert all(r.config == tuned.best for r in tuned.seeds)
    # the edge made the grid grow to 3e-2, which is worse, so 1e-2 is interior now
    assert RunConfig(3e-2, "cosine", 0.0) in [r.config for r in tuned.grid]
    assert not tuned.lr_at_edge
    assert len(calls) == len(grid) + 1 + 2
    assert sum(seed == 0 for _, seed in calls) == len(grid) + 1


def test_a_diverged_run_never_wins_and_all_diverged_keeps_the_smallest_lr():
    good = fake_run(RunConfig(1e-3), 0, 0.5)
    bad = fake_run(RunConfig(1e-2), 0, 0.01, diverged=True)
    assert select_best([bad, good]) == RunConfig(1e-3)
    both = [
        fake_run(RunConfig(lr, s), 0, 0.1, diverged=True)
        for lr in (1e-2, 1e-3)
        for s in ("cosine", "constant")
    ]
    assert select_best(both) == RunConfig(1e-3, "constant")
    with pytest.raises(ValueError, match="at least one run"):
        select_best([])


def test_grid_and_ablation_helpers():
    assert lr_grid(3e-3, 3) == pytest.approx((1e-3, 3e-3, 1e-2))
    assert lr_grid(1.0, 3) == pytest.approx((0.3, 1.0, 3.0))
    assert lr_grid(1.0, 1) == pytest.approx((1.0,))
    assert next_lr(1e-2, up=True) == pytest.approx(3e-2)
    assert next_lr(1e-2, up=False) == pytest.approx(3e-3)
    grid = run_grid((1e-3, 1e-2))
    assert len(grid) == 8 and len(set(grid)) == 8
    variants = ablation_variants(("schedule", "weight_decay"), ("constant", "cosine"), (0.0, 0.01))
    assert len(variants) == 4
    assert restrict(grid, {"schedule": "cosine", "weight_decay": 0.0}) == [
        RunConfig(1e-3, "cosine"),
        RunConfig(1e-2, "cosine"),
    ]
    assert RunConfig(1.0, "cosine").schedule_factor(50, 100) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        RunConfig(1.0, "step")


def test_divergence_is_detected_on_constructed_diverging_runs():
    problem = get_problem("digits_mlp")
    task = problem.make_task()
    exploding = train_run(problem, task, resolve_spec("sgd"), RunConfig(1e4), 0, 200)
    assert exploding.diverged
    assert "non-finite" in exploding.divergence or "10x its start" in exploding.divergence
    assert not np.isfinite(exploding.train_loss[-1])  # stopped early: the rest is NaN
    assert exploding.selection_loss == math.inf

    @dataclasses.dataclass(frozen=True)
    class Ascent(OptimizerSpec):
        def build(self, named, hidden, cfg, steps):
            return torch.optim.SGD(list(named.values()), lr=cfg.lr, maximize=True)

    ascent = Ascent("ascent", "baseline", 1e-3, {"optimizer": "ascent"})
    rising = train_run(problem, task, ascent, RunConfig(1e-2), 0, 60)
    assert rising.diverged and "above its start" in rising.divergence
    assert np.isfinite(rising.train_loss).all()
    healthy = train_run(problem, task, resolve_spec("adamw"), RunConfig(3e-3), 0, 60)
    assert not healthy.diverged and healthy.divergence is None


def test_speedup_and_normalised_loss_on_known_curves():
    steps = 1001  # long enough that the EMA's lag (about 20 steps) hardly moves the ratios
    ref = np.linspace(2.0, 1.0, steps)
    same = fake_run(RunConfig(1.0), 0, 1.0, steps=steps)
    same.train_loss = ref.copy()
    assert speedup(same, ref) == pytest.approx(1.0, abs=0.02)
    twice = fake_run(RunConfig(1.0), 0, 0.0, steps=steps)  # reaches 1.0 half way, then below
    twice.train_loss = np.linspace(2.0, 0.0, steps)
    assert speedup(twice, ref) == pytest.approx(2.0, rel=0.1)
    slow = fake_run(RunConfig(1.0), 0, 1.5, steps=steps)  # ends where AdamW was half way
    slow.train_loss = np.linspace(2.0, 1.5, steps)
    assert speedup(slow, ref) == pytest.approx(0.5, abs=0.05)
    diverged = fake_run(RunConfig(1.0), 0, 1.0, diverged=True, steps=steps)
    assert speedup(diverged, ref) == 0.0
    refs = [fake_run(RunConfig(1.0), s, 0.5) for s in range(3)]
    runs = [fake_run(RunConfig(1.0), 0, 0.25), fake_run(RunConfig(1.0), 1, 5.0, diverged=True)]
    # the diverged run counts as its first loss (2.0): no better than not training
    assert normalised_loss(runs, refs).tolist() == pytest.approx([0.5, 4.0])


def test_iqm_and_its_confidence_interval_come_from_rliable():
    scores = np.array([[0.5, 1.0, 1.2, 9.0], [0.6, 1.1, 1.3, 0.1], [0.7, 0.9, 1.0, 1.1]])
    out = iqm_with_ci(scores, reps=300)
    assert out["iqm"] == pytest.approx(scipy.stats.trim_mean(scores.ravel(), 0.25))
    lo, hi = out["ci95"]
    assert lo <= out["iqm"] <= hi and hi - lo > 0


def tiny(tmp_path, optimizer="adamw", **kw):
    base = dict(
        optimizer=optimizer,
        problems=("digits_mlp",),
        seeds=2,
        lr_points=2,
        weight_decays=(0.0,),
        steps_scale=0.01,
        out=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    base.update(kw)
    return SuiteConfig(**base)


@pytest.fixture(autouse=True)
def small_eval_sets(monkeypatch):
    monkeypatch.setattr(runner_mod, "EVAL_BATCH_CAP", 2)


def test_second_evaluation_hits_the_cache_and_reports_the_same(tmp_path):
    first = evaluate_suite(tiny(tmp_path))
    assert first.report["runs"]["computed"] > 0
    again = evaluate_suite(tiny(tmp_path, out=str(tmp_path / "again")))
    assert again.report["runs"]["computed"] == 0
    assert again.report["runs"]["reused_from_cache"] == first.report["runs"]["computed"]
    assert again.report["problems"] == first.report["problems"]
    # the cache key holds problem, config, seed, steps and the torch version
    cache = ResultCache(tmp_path / "cache")
    problem = get_problem("digits_mlp").with_steps(20)
    task, spec = problem.make_task(), resolve_spec("adamw")
    key = cache.key(problem, task, spec, RunConfig(3e-3), 0, 20)
    assert cache.get(key) is not None
    for change in (
        {"seed": 7},
        {"torch": "0.0"},
        {"config": RunConfig(1.0).to_dict()},
        {"steps": 21},
    ):
        assert cache.path({**key, **change}) != cache.path(key)
        assert cache.get({**key, **change}) is None
    path = cache.path(key)
    path.write_text("{not json", encoding="utf-8")
    assert cache.get(key) is None  # an unreadable entry is recomputed, never trusted


def test_report_files_schema_and_ablation(tmp_path):
    result = evaluate_suite(tiny(tmp_path, ablate=("schedule",)))
    report = json.loads((result.out_dir / "suite.json").read_text())
    jsonschema.validate(report, SUITE_SCHEMA)
    names = sorted(p.name for p in result.out_dir.iterdir())
    assert names == ["curves_digits_mlp.png", "suite.json", "summary.png", "table.md"]
    table = (result.out_dir / "table.md").read_text()
    assert "| digits_mlp (20 steps) | adamw |" in table and "IQM" in table
    assert set(report["problems"][0]["ablation"]) == {"constant", "cosine"}
    assert "| adamw | cosine |" in table
    broken = json.loads(json.dumps(report))
    broken["problems"][0]["optimizer"]["final"]["test_loss"]["mean"] = "low"
    with pytest.raises(ValueError, match="problems/0/optimizer/final/test_loss/mean"):
        validate_report(broken)
    with pytest.raises(ValueError, match="already exists"):
        evaluate_suite(tiny(tmp_path))


def test_learned_optimizer_runs_through_lopt_and_publishes_to_its_card(tmp_path, zroot):
    import lopt
    import zoo

    theta = lopt.init_theta(lopt.ORIGINAL, generator=torch.Generator().manual_seed(0))
    zoo.publish(theta, lopt.ORIGINAL, "small_fc_lopt/suite_test")
    result = evaluate_suite(
        tiny(
            tmp_path,
            optimizer="small_fc_lopt/suite_test",
            lr_points=1,
            publish="small_fc_lopt/suite_test",
        )
    )
    assert result.spec.kind == "learned"
    assert result.report["config"]["optimizer_spec"]["identity"][
        "theta_sha256"
    ] == lopt.theta_sha256(theta)
    entry = zoo.load("small_fc_lopt/suite_test")
    assert entry.version == "1.0.1"
    assert "suite digits_mlp" in entry.card and "suite_summary.png" in entry.card
    assert result.report["published"]["ref"] == entry.ref
    table = comparison_markdown([result.report])
    assert "| digits_mlp (20 steps) | adamw |" in table
    assert f"| digits_mlp (20 steps) | {result.spec.name} |" in table
    assert f"- {result.spec.name}: IQM normalised final train loss" in table
    other = json.loads(json.dumps(result.report))
    other["problems"][0]["name"] = "fmnist_mlp"
    with pytest.raises(ValueError, match="different problems"):
        comparison_markdown([result.report, other])


def test_grid_divergences_are_listed_and_lrs_is_the_evaluated_optimizers_grid(tmp_path):
    cfg = tiny(tmp_path, optimizer="sgd", lrs=(1e-2, 1e4), schedules=("constant",), seeds=1)
    report = evaluate_suite(cfg).report
    problem = report["problems"][0]
    assert {g["config"]["lr"] for g in problem["optimizer"]["grid"]} >= {1e-2, 1e4}
    assert {g["config"]["lr"] for g in problem["reference"]["grid"]} >= set(lr_grid(3e-3, 2))
    assert problem["optimizer"]["best"]["lr"] != 1e4  # a diverged run never wins
    table = (tmp_path / "out" / "table.md").read_text()
    assert "Diverged runs of the seed-0 tuning grids" in table
    assert "- digits_mlp, sgd, lr 10000 constant wd 0: " in table


def test_max_time_reports_the_finished_problems(tmp_path, monkeypatch):
    from metatrain.generalisation import suite as suite_mod

    cfg = tiny(tmp_path, problems=("digits_mlp", "fmnist_conv"), steps_scale=0.02, max_time=1e-9)
    with pytest.raises(ValueError, match="no problem finished"):
        evaluate_suite(cfg)
    real = suite_mod.train_run

    def out_of_time_on_conv(problem, *args, **kwargs):
        if problem.name == "fmnist_conv":
            raise runner_mod.OutOfTime("fmnist_conv at step 0")
        return real(problem, *args, **{**kwargs, "deadline": None})

    monkeypatch.setattr(suite_mod, "train_run", out_of_time_on_conv)
    result = evaluate_suite(tiny(tmp_path, problems=("digits_mlp", "fmnist_conv"), max_time=600))
    assert [p["name"] for p in result.report["problems"]] == ["digits_mlp"]
    assert result.report["incomplete"] == ["fmnist_conv"]
    assert "--max-time 600 s ran out" in result.report["stopped"]
    assert "Not evaluated" in (result.out_dir / "table.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--problems", "nope"], "unknown held-out problem(s) nope"),
        (["--ablate", "momentum"], "--ablate takes schedule, weight_decay"),
        (["--publish", "small_fc_lopt/x"], "--publish needs a learned optimizer"),
        (["--steps-scale", "0"], "--steps-scale must be in (0, 100]"),
        (["--schedules", "step"], "--schedules takes constant, cosine"),
    ],
)
def test_cli_rejects_bad_input_in_one_line(args, message, tmp_path, capsys):
    argv = [
        "--suite",
        "generalisation",
        "--optimizer",
        "adamw",
        "--out",
        str(tmp_path / "o"),
        *args,
    ]
    assert eval_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_unknown_optimizer_lists_the_baselines(tmp_path, zroot, capsys):
    argv = ["--suite", "generalisation", "--optimizer", "nope/none", "--out", str(tmp_path / "o")]
    assert eval_cli.main(argv) == 2
    assert "baselines: adamw, muon, sgd" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["small_fc_lopt", "mlp_lopt", "celo2", "velo"])
def test_every_registered_architecture_runs_through_its_shell(arch, tmp_path):
    import lopt

    cfg = lopt.get_architecture(arch).preset()
    theta = lopt.get_architecture(arch).init_theta(cfg, generator=torch.Generator().manual_seed(0))
    path = lopt.save_theta(tmp_path / f"{arch}.safetensors", theta, cfg)
    spec = resolve_spec(str(path))
    assert spec.kind == "learned" and spec.identity["architecture"] == arch
    assert spec.identity["theta_sha256"] == lopt.theta_sha256(theta)
    problem = get_problem("digits_mlp")
    result = train_run(problem, problem.make_task(), spec, RunConfig(1.0), 0, 5)
    assert result.steps == 5 and np.isfinite(result.train_loss[0])
