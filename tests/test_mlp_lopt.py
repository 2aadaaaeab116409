"""mlp_lopt (learned_optimization's MLPLOpt): a float64 per-element oracle, the shell, and the
whole pipeline (meta-train → publish → load from the zoo → evaluate) through the CLIs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn

import lopt
import zoo
from lopt.mlp_lopt import MOMENTUM_DECAYS, MLPLOptConfig
from metatrain.evaluation import REPORT_SCHEMA

REPO = Path(__file__).resolve().parents[1]
TIME_SCALES = (1, 3, 10, 30, 100, 300, 1e3, 3e3, 1e4, 3e4, 1e5)


def oracle_step(theta, param, grad, m, t, cfg):
    """One tensor's step, element by element in float64, from the math of docs/design/mlp_lopt.md.

    Returns ``(step, new_m)``; nothing is folded or vectorised.
    """
    th = {k: v.double() for k, v in theta.items()}
    p = param.double().reshape(-1) if param.dim() else param.double().reshape(1)
    g = grad.double().reshape(-1) if grad.dim() else grad.double().reshape(1)
    old_m = m.double().reshape(p.numel(), len(MOMENTUM_DECAYS))
    new_m = torch.empty_like(old_m)
    for i in range(p.numel()):
        for k, beta in enumerate(cfg.momentum_decays):
            new_m[i, k] = beta * old_m[i, k] + (1 - beta) * g[i]
    raw = [[g[i], p[i], *new_m[i]] for i in range(p.numel())]
    channels = len(raw[0])
    scale = []
    for j in range(channels):
        mean_sq = sum(float(raw[i][j]) ** 2 for i in range(p.numel())) / p.numel()
        scale.append(1.0 / math.sqrt(1e-5 + mean_sq))
    time = [math.tanh(float(t) / tau - 1.0) for tau in TIME_SCALES]
    steps = []
    num_layers = len(cfg.layer_sizes())
    for i in range(p.numel()):
        h = torch.tensor(
            [float(raw[i][j]) * scale[j] for j in range(channels)] + time, dtype=torch.float64
        )
        for k in range(num_layers):
            h = h @ th[f"w{k}"] + th[f"b{k}"]
            if k < num_layers - 1:
                h = torch.relu(h)
        steps.append(cfg.step_mult * float(h[0]) * math.exp(cfg.exp_mult * float(h[1])))
    shape = param.shape
    return (
        torch.tensor(steps, dtype=torch.float64).reshape(shape),
        new_m.reshape(*(tuple(shape) or (1,)), len(MOMENTUM_DECAYS)),
    )


def random_case(seed, cfg, shapes):
    gen = torch.Generator().manual_seed(seed)
    theta = lopt.mlp_lopt.init_theta(cfg, gen)
    theta = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in theta.items()}
    params = {f"p{i}": torch.randn(s, generator=gen) for i, s in enumerate(shapes)}
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    state = lopt.mlp_lopt.init_state(params, cfg)
    for st in state["tensors"].values():  # non-zero momenta, as after some steps
        st["m"] = 0.3 * torch.randn(st["m"].shape, generator=gen)
    state["t"] = torch.tensor(37.0)
    return theta, params, grads, state


SHAPES = [(), (5,), (3, 4), (2, 3, 2)]
SMALL = MLPLOptConfig(hidden_size=6, step_mult=0.01, exp_mult=0.1)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_update_matches_the_float64_oracle(dtype, tol):
    theta, params, grads, state = random_case(0, SMALL, SHAPES)
    cast = {k: v.to(dtype) for k, v in theta.items()}
    new_params, new_state = lopt.mlp_lopt.update(
        cast,
        {
            "t": state["t"],
            "tensors": {n: {"m": s["m"].to(dtype)} for n, s in state["tensors"].items()},
        },
        {k: v.to(dtype) for k, v in params.items()},
        {k: v.to(dtype) for k, v in grads.items()},
        SMALL,
        lr=0.5,
        weight_decay=0.1,
    )
    for name, p in params.items():
        step, m = oracle_step(theta, p, grads[name], state["tensors"][name]["m"], 37.0, SMALL)
        want = p.double() * (1 - 0.5 * 0.1) - 0.5 * step
        scale = step.abs().max().item()
        torch.testing.assert_close(new_params[name].double(), want, rtol=0, atol=tol * scale + tol)
        torch.testing.assert_close(new_state["tensors"][name]["m"].double(), m, rtol=tol, atol=tol)
        assert new_params[name].dtype == dtype and new_params[name].shape == p.shape
    assert float(new_state["t"]) == 38.0


def test_update_is_vmappable_over_theta_and_differentiable():
    cfg = SMALL
    theta, params, grads, state = random_case(1, cfg, [(3, 4), (4,)])
    flat = torch.stack([lopt.flatten_theta(theta, cfg) * s for s in (1.0, 0.5, -1.0)])

    def one(theta_flat):
        t = lopt.unflatten_theta(theta_flat, cfg)
        new, _ = lopt.mlp_lopt.update(t, state, params, grads, cfg)
        return new["p0"]

    batched = torch.func.vmap(one)(flat)
    for lane in range(3):
        torch.testing.assert_close(batched[lane], one(flat[lane]), rtol=1e-6, atol=1e-7)
    flat0 = flat[0].clone().requires_grad_()
    one(flat0).sum().backward()
    assert torch.isfinite(flat0.grad).all() and flat0.grad.abs().sum() > 0


def test_time_features_use_the_pre_increment_counter():
    theta, params, grads, state = random_case(2, SMALL, [(4,)])
    at = {}
    for t in (0.0, 50.0):
        st = {"t": torch.tensor(t), "tensors": state["tensors"]}
        at[t] = lopt.mlp_lopt.update(theta, st, params, grads, SMALL)[0]["p0"]
        step, _ = oracle_step(
            theta, params["p0"], grads["p0"], state["tensors"]["p0"]["m"], t, SMALL
        )
        torch.testing.assert_close(at[t].double(), params["p0"].double() - step, atol=1e-6, rtol=0)
    assert not torch.equal(at[0.0], at[50.0])


def test_config_presets_and_errors():
    assert lopt.MLPLOptConfig().num_params == 1762  # 19→32→32→2, as the reference's default
    assert lopt.resolve_config("mlp_lopt") == MLPLOptConfig()
    assert lopt.resolve_config("mlp_lopt:lolv2_small").hidden_size == 8
    assert MLPLOptConfig.from_json(SMALL.to_json()) == SMALL
    with pytest.raises(ValueError, match="hidden_size must be a positive int, got 0"):
        MLPLOptConfig(hidden_size=0)
    with pytest.raises(ValueError, match=r"momentum_decays must be decays in \[0, 1\)"):
        MLPLOptConfig(momentum_decays=(0.5, 1.0))
    with pytest.raises(ValueError, match=r"unknown mlp_lopt config keys \['rms_decays'\]"):
        MLPLOptConfig.from_dict({"rms_decays": [0.9]})


def test_shell_steps_like_the_functional_core_with_lr_wd_and_maximize():
    cfg = SMALL
    theta = lopt.mlp_lopt.init_theta(cfg, torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = lopt.MLPLOpt(
        model.parameters(), weights=theta, config=cfg, lr=0.3, weight_decay=0.1, maximize=True
    )
    state = lopt.mlp_lopt.init_state(params, cfg)
    x = torch.randn(16, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        grads = {k: -v.grad.detach().clone() for k, v in model.named_parameters()}
        opt.step()
        params, state = lopt.mlp_lopt.update(
            theta, state, params, grads, cfg, lr=0.3, weight_decay=0.1
        )
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), params[name]), name
    assert opt.state_dict()["meta_weights"]["architecture"] == "mlp_lopt"


def test_shell_needs_weights():
    with pytest.raises(ValueError, match="MLPLOpt has no default meta-weights; pass weights="):
        lopt.MLPLOpt(nn.Linear(2, 2).parameters())


# -- the pipeline, through the command lines a user types -------------------------------------
def run_cli(args, env, cwd):
    out = subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.mark.slow
def test_metatrain_publish_load_and_evaluate_mlp_lopt(tmp_path):
    root = tmp_path / "zoo"
    env = {**os.environ, "LOZOO_ZOO": str(root), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    tiny = [
        "--task-option",
        "width=8",
        "--num-tasks",
        "2",
        "--truncation-length",
        "3",
        "--trajectory-length",
        "12",
        "--min-trajectory-length",
        "4",
        "--outer-steps",
        "3",
        "--heldout-tasks",
        "0",
        "--no-progress",
        "--lopt-option",
        "hidden_size=4",
    ]
    out = run_cli(
        [
            "metatrain",
            "--lopt",
            "mlp_lopt",
            "--quick",
            "--publish",
            "mlp_lopt/quick",
            "--out-dir",
            str(tmp_path / "run"),
            *tiny,
        ],
        env,
        tmp_path,
    )
    assert "published mlp_lopt/quick:1.0.0" in out
    listed = run_cli(["zoo", "list"], env, tmp_path)
    rows = {line.split()[0]: line.split()[1] for line in listed.splitlines()[1:]}
    assert rows["mlp_lopt/quick:1.0.0"] == "mlp_lopt"
    assert rows["small_fc_lopt/mlp_mnist:1.0.0"] == "small_fc_lopt"
    entry = zoo.load("mlp_lopt/quick", root=root)
    assert entry.architecture == "mlp_lopt" and entry.config.hidden_size == 4
    assert entry.optimizer_class is lopt.MLPLOpt
    evals = tmp_path / "eval"
    run_cli(
        [
            "metatrain.eval",
            "--optimizer",
            "mlp_lopt/quick",
            "--task-option",
            "width=8",
            "--task-option",
            "image_sizes=[8]",
            "--num-tasks",
            "1",
            "--steps",
            "20",
            "--seeds",
            "3",
            "--adam-lrs",
            "0.001,0.01",
            "--eval-every",
            "0",
            "--val-batches",
            "1",
            "--no-progress",
            "--out",
            str(evals),
        ],
        env,
        tmp_path,
    )
    report = json.loads((evals / "eval.json").read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    record = report["config"]["optimizer"]
    assert record["architecture"] == "mlp_lopt" and record["resolved"] == "mlp_lopt/quick:1.0.0"
    assert record["lopt_config"] == entry.config.to_dict()
