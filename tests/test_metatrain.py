"""Meta-trainer tests on real tasks: vmapped unroll vs a per-lane loop, PES/ES vs backprop through
the unroll (docs/design/meta_training.md §12 S2, S4, S7), resume, CLI and outputs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import lopt
import tasks
from metatrain import MetaTrainConfig, train
from metatrain.cli import main as cli_main
from metatrain.config import build_parser
from metatrain.estimators import PES, FullES
from metatrain.evaluation.source import resolve_optimizer
from metatrain.schedules import Constant, NeverEnding
from metatrain.unroll import TaskLanes, VectorizedUnroll
from tests.tiny_runs import TINY_MNIST
from tests.tiny_runs import tiny_config as shared_tiny_config


def tiny_config(tmp_path, **overrides) -> MetaTrainConfig:
    return shared_tiny_config(tmp_path / "run", **overrides)


# --------------------------------------------------------------------------- S2: vmap vs loop
def test_vmapped_slot_equals_per_lane_python_loop():
    family = tasks.get_family("mlp_mnist", image_sizes=8, depth=2, width=12, batch_size=16)
    gen = torch.Generator().manual_seed(0)
    static = family.sample_static(gen)
    task = family.make_task(static)
    cfg = lopt.ORIGINAL
    problem = TaskLanes(task, family, static, cfg, num_streams=3, stream_seed=1)
    n_lanes = 6
    state = problem.fresh(n_lanes, gen)
    thetas = torch.stack(
        [
            lopt.flatten_theta(lopt.init_theta(cfg, torch.Generator().manual_seed(s)), cfg)
            for s in range(n_lanes)
        ]
    )
    activations = state["task_cfg"]["activation"].tolist()
    assert len(set(activations)) > 1, "lanes should use different activations"
    loop_state = [
        {
            "params": {k: v[i].clone() for k, v in state["params"].items()},
            "opt": {
                "t": state["opt_state"]["t"][i],
                "tensors": {
                    k: {sk: sv[i] for sk, sv in s.items()}
                    for k, s in state["opt_state"]["tensors"].items()
                },
            },
            "cfg": {k: v[i] for k, v in state["task_cfg"].items()},
        }
        for i in range(n_lanes)
    ]
    for _ in range(4):
        batch = next(problem.stream)
        batch = {k: torch.cat([v, v]) for k, v in batch.items()}
        state, losses = problem.step(thetas, state, batch)
        for i, lane in enumerate(loop_state):
            params = {k: v.detach().requires_grad_(True) for k, v in lane["params"].items()}
            loss = task.loss(params, {k: v[i] for k, v in batch.items()}, lane["cfg"])
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
            theta = lopt.unflatten_theta(thetas[i], cfg)
            with torch.no_grad():
                new_p, new_s = lopt.update(
                    theta, lane["opt"], {k: v.detach() for k, v in params.items()}, grads, cfg
                )
            lane["params"], lane["opt"] = new_p, new_s
            torch.testing.assert_close(losses[i], loss.detach(), rtol=1e-6, atol=1e-6)
    for i, lane in enumerate(loop_state):
        for k, v in lane["params"].items():
            torch.testing.assert_close(state["params"][k][i], v, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- S4: vs backprop
class FixedLaneFamily:
    """Every fresh lane gets the same config (a fixed quadratic target)."""

    def __init__(self, lane_cfg):
        self.lane_cfg = lane_cfg

    def sample_lane(self, gen, static):
        return {k: v.clone() for k, v in self.lane_cfg.items()}


class FixedInitTask:
    """A task whose init always returns the same parameters."""

    def __init__(self, task, params):
        self.task, self.params = task, params

    def init(self, gen, lane_cfg):
        return {k: v.clone() for k, v in self.params.items()}

    def __getattr__(self, name):
        return getattr(self.task, name)


def quadratic_problem(num_pairs: int):
    family = tasks.get_family("quadratic", shapes={"w": (4, 5), "b": (5,)})
    gen = torch.Generator().manual_seed(0)
    static = family.sample_static(gen)
    task = family.make_task(static)
    lane_cfg = family.sample_lane(gen, static)
    params = task.init(gen, lane_cfg)
    fixed = FixedInitTask(task, params)
    problem = TaskLanes(fixed, FixedLaneFamily(lane_cfg), static, lopt.ORIGINAL, num_pairs, 1)
    return problem, task, lane_cfg, params


def exact_meta_gradient(theta_flat, task, lane_cfg, params, horizon, trunc):
    cfg = lopt.ORIGINAL
    batch = {"x": torch.zeros(1, 1)}

    def objective(flat):
        theta = lopt.unflatten_theta(flat, cfg)
        p, state, total = params, lopt.init_state(params, cfg), 0.0
        for _ in range(horizon):
            grads, loss = torch.func.grad_and_value(task.loss)(p, batch, lane_cfg)
            total = total + task.normalizer(loss)
            p, state = lopt.update(theta, state, p, grads, cfg)
        return total / trunc

    return torch.func.grad(objective)(theta_flat)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["pes", "full_es"])
def test_estimates_agree_with_backprop_through_the_unroll(estimator):
    horizon, trunc, sigma, pairs, batches = 20, 5, 0.01, 2048, 16
    cfg = lopt.ORIGINAL
    theta = lopt.flatten_theta(lopt.init_theta(cfg, torch.Generator().manual_seed(3)), cfg)
    estimates = []
    task = lane_cfg = params = None
    for b in range(batches):
        problem, task, lane_cfg, params = quadratic_problem(pairs)
        if estimator == "pes":
            unroll = VectorizedUnroll(problem, pairs, NeverEnding(), seed=b)
            est = PES(unroll, truncation_length=trunc, sigma=sigma)
            total = sum(est.estimate(theta, seed=100 * b + k)[0] for k in range(horizon // trunc))
        else:
            unroll = VectorizedUnroll(problem, pairs, NeverEnding(), seed=b)
            est = FullES(unroll, Constant(horizon), sigma=sigma)
            # full ES "avg" estimates ∇ of the mean over H slots = (T/H)·∇ of the PES objective
            total = est.estimate(theta, seed=100 * b)[0] * (horizon / trunc)
        estimates.append(total)
    estimates = torch.stack(estimates)
    mean = estimates.mean(0)
    se = estimates.std(0) / math.sqrt(batches)
    exact = exact_meta_gradient(theta, task, lane_cfg, params, horizon, trunc)
    assert (mean - exact).norm() <= 4 * se.square().sum().sqrt()
    assert torch.nn.functional.cosine_similarity(mean, exact, dim=0) >= 0.9


# --------------------------------------------------------------------------- runs, resume, outputs
@pytest.mark.parametrize("estimator", ["pes", "tes", "full_es"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, estimator):
    extra = {"estimator": estimator, "num_estimators": 2, "resample_every": 3}
    if estimator == "full_es":
        extra.update(trajectory_length=25, min_trajectory_length=10)
    full = train(tiny_config(tmp_path / "a", **extra))
    part_cfg = tiny_config(tmp_path / "b", **extra)
    part_cfg.outer_steps = 3
    train(part_cfg)
    resumed_cfg = tiny_config(tmp_path / "b", **extra)
    resumed = train(resumed_cfg, resume=True)
    for k in full.theta:
        assert torch.equal(full.theta[k], resumed.theta[k]), k
    lines_a = (full.run_dir / "metrics.jsonl").read_text().splitlines()
    lines_b = (resumed.run_dir / "metrics.jsonl").read_text().splitlines()
    timing = ("inner_steps_per_s", "outer_step_s")

    def strip(line):
        return {k: v for k, v in json.loads(line).items() if k not in timing}

    assert [strip(x) for x in lines_a] == [strip(x) for x in lines_b]


def test_run_writes_tensorboard_checkpoints_and_final_weights(tmp_path):
    result = train(tiny_config(tmp_path))
    run = result.run_dir
    assert any((run / "tb").iterdir())
    assert (run / "checkpoints" / "latest").read_text() == "ckpt-00000006.pt"
    theta, cfg = lopt.load_theta(run / "theta.safetensors")
    assert cfg == lopt.ORIGINAL and all(torch.isfinite(v).all() for v in theta.values())
    record = json.loads((run / "config.json").read_text())
    assert record["metatrain"]["task_family"] == "mlp_mnist"
    assert record["task_configs"][0]["image_size"] == 8
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "meta/loss",
        "meta/grad_norm",
        "meta/theta_norm",
        "inner/loss",
        "inner/steps_per_s",
    } <= tags


def test_existing_run_dir_is_not_overwritten(tmp_path):
    train(tiny_config(tmp_path, outer_steps=3))
    with pytest.raises(ValueError, match="already holds a run; continue it with --resume"):
        train(tiny_config(tmp_path, outer_steps=3))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    cfg = tiny_config(tmp_path, outer_steps=6, checkpoint_every=3)
    train(cfg)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    (ckpt_dir / "ckpt-00000006.pt").write_bytes(b"truncated")
    cfg.outer_steps = 7
    with pytest.warns(UserWarning, match="cannot be read"):
        result = train(cfg, resume=True)
    steps = [
        json.loads(x)["step"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(7))


@pytest.mark.slow
def test_short_real_run_lowers_the_meta_loss(tmp_path):
    cfg = MetaTrainConfig(
        task_family="mlp_mnist",
        init_from="none",
        heldout_tasks=0,
        task_option={"image_sizes": [8], "depth": 1, "width": [16, 48], "batch_size": [32, 128]},
        num_tasks=8,
        truncation_length=10,
        trajectory_length=300,
        min_trajectory_length=50,
        outer_steps=300,
        outer_lr=3e-3,
        checkpoint_every=0,
        progress=False,
        out_dir=str(tmp_path / "run"),
    )
    losses = train(cfg).meta_losses
    first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
    assert last < first - 0.1, (first, last)


# --------------------------------------------------------------------------- CLI
def test_help_documents_every_flag():
    text = build_parser().format_help()
    for name in MetaTrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    assert "--quick" in text and "--resume" in text


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--task-family", "imagenet"], "unknown task family 'imagenet'; valid names: mlp_mnist"),
        (["--task-option", "depths=2"], "has no option(s) depths; valid:"),
        (["--resume", "/nonexistent/run"], "no config.json there"),
        (["--trajectory-length", "10", "--min-trajectory-length", "20"], "must be below"),
        (["--num-tasks", "0"], "--num-tasks must be positive"),
    ],
)
def test_cli_errors_are_clear(argv, message, capsys, tmp_path):
    assert cli_main([*argv, "--out-dir", str(tmp_path / "r"), "--outer-steps", "1"]) == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_unknown_estimator():
    proc = subprocess.run(
        [sys.executable, "-m", "metatrain", "--estimator", "sgd"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "invalid choice: 'sgd'" in proc.stderr and "pes" in proc.stderr


def test_cli_run_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--task-family", "mlp_mnist", "--out-dir", str(run), "--no-progress"]
    for k, v in TINY_MNIST.items():
        argv += ["--task-option", f"{k}={json.dumps(v)}"]
    argv += [
        "--num-tasks",
        "2",
        "--truncation-length",
        "2",
        "--trajectory-length",
        "8",
        "--min-trajectory-length",
        "3",
        "--outer-steps",
        "4",
        "--checkpoint-every",
        "2",
    ]
    assert cli_main(argv) == 0
    assert "final θ:" in capsys.readouterr().out
    first = json.loads((run / "config.json").read_text())["command"]
    assert "--task-family mlp_mnist" in first
    assert cli_main(["--resume", str(run), "--outer-steps", "6", "--no-progress"]) == 0
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(6))
    # the run's command stays the one that made it; each resume is recorded after it
    record = json.loads((run / "config.json").read_text())
    assert record["command"] == first
    assert record["resumed_with"] == [
        f"python -m metatrain --resume {run} --outer-steps 6 --no-progress"
    ]
    assert cli_main(["--resume", str(run), "--sigma", "0.1"]) == 2
    assert "cannot change --sigma when resuming" in capsys.readouterr().err


def test_publish_puts_the_final_theta_in_the_zoo(tmp_path, monkeypatch):
    import zoo

    monkeypatch.setenv("LOZOO_ZOO", str(tmp_path / "zoo"))
    result = train(tiny_config(tmp_path, outer_steps=2, publish="small_fc_lopt/tiny_test"))
    entry = zoo.load("small_fc_lopt/tiny_test")
    assert entry.version == "1.0.0"
    assert entry.meta["task_family"] == "mlp_mnist"
    assert entry.meta["meta_training"]["outer_steps"] == 2
    for k, v in result.theta.items():
        assert torch.equal(entry.theta[k], v)
    model = torch.nn.Linear(3, 2)
    lopt.SmallFCLOpt(model.parameters(), "small_fc_lopt/tiny_test")


@pytest.mark.parametrize("preset", ["original", "mulo"])
def test_fused_lane_update_matches_the_vmapped_core(preset):
    """The cpp lopt backend of the unroll computes the same slots as the vmapped reference."""
    from lopt.kernels import cpp_is_available

    assert cpp_is_available(), "the fused CPU kernel must build here (python -m lopt.kernels build)"
    family = tasks.get_family("mlp_mnist", image_sizes=8, depth=2, width=[8, 20], batch_size=16)
    gen = torch.Generator().manual_seed(4)
    static = family.sample_static(gen)
    task = family.make_task(static)
    cfg = lopt.preset(preset)
    lanes = {
        backend: TaskLanes(task, family, static, cfg, 3, 1, lopt_backend=backend)
        for backend in ("torch", "cpp")
    }
    start = lanes["torch"].fresh(6, torch.Generator().manual_seed(5))
    thetas = torch.stack(
        [
            lopt.flatten_theta(lopt.init_theta(cfg, torch.Generator().manual_seed(s)), cfg)
            for s in range(6)
        ]
    )
    thetas = thetas + 0.05 * torch.randn(thetas.shape, generator=gen)
    # the cpp path updates its lane state in place: each backend gets its own copy
    states = {
        b: {
            "params": {k: v.clone() for k, v in start["params"].items()},
            "opt_state": {
                "t": start["opt_state"]["t"].clone(),
                "tensors": {
                    n: {k: v.clone() for k, v in st.items()}
                    for n, st in start["opt_state"]["tensors"].items()
                },
            },
            "task_cfg": start["task_cfg"],
        }
        for b in lanes
    }
    for _ in range(5):
        batch = {k: torch.cat([v, v]) for k, v in next(lanes["torch"].stream).items()}
        for b in lanes:
            states[b], _ = lanes[b].step(thetas, states[b], batch)
    for k, ref in states["torch"]["params"].items():
        moved = (ref - start["params"][k]).abs().max()
        assert (states["cpp"]["params"][k] - ref).abs().max() <= 1e-5 * moved + 1e-7, k
    torch.testing.assert_close(states["cpp"]["opt_state"]["t"], states["torch"]["opt_state"]["t"])


def test_unknown_lopt_backend():
    family = tasks.get_family("quadratic")
    static = family.sample_static(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="unknown lopt backend 'gpu'; valid: torch, cpp, auto"):
        TaskLanes(family.make_task(static), family, static, lopt.ORIGINAL, 1, 0, lopt_backend="gpu")


def test_lopt_option_overrides_the_preset(tmp_path):
    cfg = tiny_config(tmp_path, outer_steps=1, lopt_option={"step_mult": 0.01})
    assert cfg.lopt_config().step_mult == 0.01
    theta, saved = lopt.load_theta(train(cfg).run_dir / "theta.safetensors")
    assert saved.step_mult == 0.01
    with pytest.raises(ValueError, match="unknown small_fc_lopt config keys"):
        tiny_config(tmp_path, lopt_option={"stepmult": 0.01}).validate()


def test_lopt_names_an_architecture_or_a_preset(tmp_path):
    assert tiny_config(tmp_path, lopt="small_fc_lopt").lopt_config() == lopt.ORIGINAL
    assert tiny_config(tmp_path, lopt="small_fc_lopt:mulo").lopt_config() == lopt.MULO
    assert tiny_config(tmp_path, lopt="mulo").lopt_config() == lopt.MULO
    message = r"--lopt adam / --lopt-option: unknown learned optimizer 'adam': not an architecture"
    with pytest.raises(ValueError, match=message + r" \(.*small_fc_lopt.*\) nor a preset"):
        tiny_config(tmp_path, lopt="adam").validate()


def test_config_from_dict_refuses_unknown_keys_and_lists_valid_ones():
    from metatrain.config import MetaTrainConfig

    data = {**MetaTrainConfig().to_dict(), "outer_lr": 0.1, "outerlr": 0.2}
    with pytest.raises(ValueError, match=r"unknown meta-training config keys \['outerlr'\]; "
                       r"valid keys: \[.*'outer_lr'"):  # fmt: skip
        MetaTrainConfig.from_dict(data)
    del data["outerlr"]
    assert MetaTrainConfig.from_dict(data).outer_lr == 0.1


def test_max_time_stops_with_a_checkpoint_and_final_weights(tmp_path):
    cfg = tiny_config(tmp_path, outer_steps=10_000, checkpoint_every=0, max_time=1.0)
    result = train(cfg)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert 0 < summary["outer_steps"] < 10_000 and summary["outer_steps_planned"] == 10_000
    assert summary["wall_time_s"] >= 1.0
    ckpt = (result.run_dir / "checkpoints" / "latest").read_text()
    assert ckpt == f"ckpt-{summary['outer_steps']:08d}.pt"
    assert (result.run_dir / "theta.safetensors").exists()
    # what evaluation and publishing inherit is the number of steps that ran, not the plan
    source = resolve_optimizer(str(result.run_dir))
    assert source.provenance["outer_steps"] == summary["outer_steps"]
