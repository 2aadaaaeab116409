"""Contract tests of lopt.SmallFCLOpt, table-driven over optimizer configurations."""

from __future__ import annotations

import copy
import io
import math
import pickle
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import lopt
from lopt import core

from .test_lopt_core import random_theta


@dataclass
class OptCase:
    name: str
    preset: str
    weight_decay: float = 0.0
    group_lrs: tuple[float, ...] = (1.0,)  # one param group per entry
    extra: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


CASES = [
    OptCase("original", "original"),
    OptCase("mulo", "mulo"),
    OptCase("original_wd", "original", weight_decay=0.1),
    OptCase("mulo_wd", "mulo", weight_decay=0.05),
    OptCase("original_groups", "original", group_lrs=(1.0, 0.3)),
    OptCase("mulo_groups_wd", "mulo", weight_decay=0.1, group_lrs=(0.5, 2.0)),
    OptCase("original_maximize", "original", extra={"maximize": True}),
]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # Square (8x8) and non-square weights, a bias, a scalar and a conv kernel: all state paths.
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 8)
    )
    model.register_parameter("temperature", nn.Parameter(torch.tensor(1.5)))
    return model


def make_opt(model: nn.Module, case: OptCase, theta=None) -> lopt.SmallFCLOpt:
    cfg = lopt.preset(case.preset)
    theta = theta if theta is not None else random_theta(cfg, seed=1)
    params = list(model.parameters())
    if len(case.group_lrs) == 1:
        groups = params
        kwargs = {"lr": case.group_lrs[0]}
    else:
        half = len(params) // 2
        groups = [
            {"params": params[:half], "lr": case.group_lrs[0]},
            {"params": params[half:], "lr": case.group_lrs[1]},
        ]
        kwargs = {}
    return lopt.SmallFCLOpt(
        groups, theta, cfg, weight_decay=case.weight_decay, **kwargs, **case.extra
    )


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 2, 4, 4, generator=gen), torch.randn(6, 8, generator=gen)


def train(model, opt, steps: range, sched=None) -> list[float]:
    losses = []
    for i in steps:
        x, y = batch(i)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = (model(x) * model.temperature - y).square().mean()
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
        if sched is not None:
            sched.step()
    return losses


def core_replay(opt, case: OptCase, lrs: list[list[float]]) -> dict[str, torch.Tensor]:
    """The parameters the functional core gives for ``len(lrs)`` steps of :func:`train` from
    :func:`make_model`, step i running group g at the explicit lr ``lrs[i][g]``.

    Independent of the optimizer's param groups: a shell that ignored its group's ``lr`` would
    not reproduce these parameters.
    """
    ref = make_model()
    names = [n for n, _ in ref.named_parameters()]
    params = {n: p.detach().clone() for n, p in ref.named_parameters()}
    state = lopt.init_state(params, opt.config)
    group_of = {id(p): gi for gi, group in enumerate(opt.param_groups) for p in group["params"]}
    param_group = {}
    for n, p in zip(names, (p for group in opt.param_groups for p in group["params"])):
        param_group[n] = group_of[id(p)]
    sign = -1.0 if case.extra.get("maximize") else 1.0
    for i, step_lrs in enumerate(lrs):
        x, y = batch(i)
        grads = torch.func.grad(
            lambda ps, x=x, y=y: (
                (torch.func.functional_call(ref, ps, (x,)) * ps["temperature"] - y).square().mean()
            )
        )(params)
        new = {}
        for n in names:  # per group lr: run the core per parameter
            one, _ = lopt.update(
                opt.theta,
                {"t": state["t"], "tensors": {n: state["tensors"][n]}},
                {n: params[n]},
                {n: sign * grads[n]},
                opt.config,
                lr=step_lrs[param_group[n]],
                weight_decay=case.weight_decay,
            )
            new[n] = one[n]
        _, state = lopt.update(
            opt.theta, state, params, {n: sign * g for n, g in grads.items()}, opt.config
        )
        params = new
    return params


def assert_matches_core(model, expected):
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_functional_core(case):
    model = make_model()
    opt = make_opt(model, case)
    train(model, opt, range(4))
    assert_matches_core(model, core_replay(opt, case, [list(case.group_lrs)] * 4))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_resume_is_identical_to_uninterrupted_training(case):
    theta = random_theta(lopt.preset(case.preset), seed=2)
    model_a = make_model()
    opt_a = make_opt(model_a, case, theta)
    train(model_a, opt_a, range(0, 6))

    model_b = make_model()
    opt_b = make_opt(model_b, case, theta)
    train(model_b, opt_b, range(0, 3))
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_c = make_model(seed=99)  # different init: everything must come from the checkpoint
    model_c.load_state_dict(saved["model"])
    opt_c = make_opt(model_c, case, theta)
    opt_c.load_state_dict(saved["opt"])
    train(model_c, opt_c, range(3, 6))
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(pa, pc)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_meta_weights_are_recorded_not_copied_into_state_dict(case):
    model = make_model()
    opt = make_opt(model, case)
    train(model, opt, range(2))
    sd = opt.state_dict()
    assert sd["meta_weights"]["sha256"] == lopt.theta_sha256(opt.theta)
    theta_shapes = {tuple(v.shape) for v in opt.theta.values() if v.dim() == 2}
    for per_param in sd["state"].values():
        assert set(per_param) <= {"step", "m", "v", "r", "c", "vd"}
        assert not any(
            tuple(v.shape) in theta_shapes and v.shape[0] == 39 for v in per_param.values()
        )
    assert "w0" not in str(sd["param_groups"])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_params_without_grad_are_skipped(case):
    model = make_model()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    before = frozen.clone()
    opt = make_opt(model, case)
    train(model, opt, range(2))
    assert torch.equal(frozen, before)
    assert len(opt.state[frozen]) == 0
    assert all(opt.state[p]["step"].item() == 2 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_lr_is_a_multiplier_of_the_step(case):
    deltas = []
    for lr in (1.0, 0.25):
        model = make_model()
        c = OptCase(case.name, case.preset, 0.0, tuple(lr * g for g in case.group_lrs), case.extra)
        opt = make_opt(model, c)
        before = [p.detach().clone() for p in model.parameters()]
        train(model, opt, range(1))
        deltas.append([p.detach() - b for p, b in zip(model.parameters(), before)])
    for full, quarter in zip(*deltas):
        # atol: one float32 ulp of the parameter values the deltas are read from.
        torch.testing.assert_close(quarter, 0.25 * full, rtol=1e-4, atol=3e-7)


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.7),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=4),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=2.0, total_steps=10, cycle_momentum=False
    ),
}


@pytest.mark.parametrize("sched_name", sorted(SCHEDULERS))
def test_lr_schedulers_drive_the_step(sched_name):
    """Each step must apply the lr the scheduler set: compare with the functional core run at
    exactly those lrs (lr × learned step, per group)."""
    case = CASES[4]  # two param groups
    model = make_model()
    opt = make_opt(model, case)
    sched = SCHEDULERS[sched_name](opt)
    lrs = []
    for i in range(5):
        lrs.append([g["lr"] for g in opt.param_groups])
        train(model, opt, range(i, i + 1), sched)
    assert len({tuple(step) for step in lrs}) > 1, "the scheduler should change the lr"
    assert_matches_core(model, core_replay(opt, case, lrs))


def test_reduce_lr_on_plateau_drives_the_step():
    case = CASES[0]
    model = make_model()
    opt = make_opt(model, case)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    for _ in range(3):
        sched.step(1.0)  # constant metric ⇒ plateau: 1.0 → 0.5 → 0.25
    assert opt.param_groups[0]["lr"] == 0.25
    train(model, opt, range(2))
    assert_matches_core(model, core_replay(opt, case, [[0.25], [0.25]]))


def test_weight_decay_is_decoupled():
    model = make_model()
    theta = random_theta(lopt.ORIGINAL)
    plain = make_opt(copy.deepcopy(model), CASES[0], theta)
    m_plain = plain.param_groups[0]["params"]
    m_wd_model = copy.deepcopy(model)
    wd = lopt.SmallFCLOpt(m_wd_model.parameters(), theta, lr=0.5, weight_decay=0.2)
    plain.param_groups[0]["lr"] = 0.5
    before = [p.detach().clone() for p in model.parameters()]
    for params, opt in ((m_plain, plain), (list(m_wd_model.parameters()), wd)):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    for b, p_plain, p_wd in zip(before, m_plain, m_wd_model.parameters()):
        step = (b - p_plain) / 0.5
        torch.testing.assert_close(p_wd.detach(), b * (1 - 0.5 * 0.2) - 0.5 * step)


def test_low_precision_params_keep_fp32_state_across_save_and_load():
    theta = random_theta(lopt.ORIGINAL)
    model = nn.Linear(6, 5).to(torch.bfloat16)
    opt = lopt.SmallFCLOpt(model.parameters(), theta)
    for _ in range(2):
        model.weight.grad = torch.randn_like(model.weight)
        model.bias.grad = torch.randn_like(model.bias)
        opt.step()
    assert model.weight.dtype == torch.bfloat16
    assert opt.state[model.weight]["m"].dtype == torch.float32
    sd = copy.deepcopy(opt.state_dict())
    opt2 = lopt.SmallFCLOpt(model.parameters(), theta)
    opt2.load_state_dict(sd)
    for key in ("m", "v", "r", "c"):
        assert opt2.state[model.weight][key].dtype == torch.float32
        assert torch.equal(opt2.state[model.weight][key], opt.state[model.weight][key])


def test_loading_state_of_other_meta_weights_warns():
    model = make_model()
    opt = make_opt(model, CASES[0], random_theta(lopt.ORIGINAL, seed=1))
    train(model, opt, range(1))
    other = make_opt(model, CASES[0], random_theta(lopt.ORIGINAL, seed=2))
    with pytest.warns(UserWarning, match="different meta-weights"):
        other.load_state_dict(opt.state_dict())


def test_weights_from_safetensors_file_carry_their_config(tmp_path):
    theta = random_theta(lopt.MULO)
    path = lopt.save_theta(tmp_path / "w.safetensors", theta, lopt.MULO)
    model = make_model()
    opt = lopt.SmallFCLOpt(model.parameters(), str(path))
    assert opt.config == lopt.MULO
    assert opt.meta_weights_info["source"].startswith("file:")
    for k in theta:
        assert torch.equal(opt.theta[k], theta[k])
    train(model, opt, range(2))


def test_optimizer_pickles_and_deepcopies():
    model = make_model()
    opt = make_opt(model, CASES[0])
    train(model, opt, range(1))
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.config == opt.config
    assert copy.deepcopy(opt).meta_weights_info == opt.meta_weights_info
    assert clone.state_dict()["meta_weights"]["sha256"] == opt.meta_weights_info["sha256"]
    train(model, clone, range(1, 2))


def test_step_without_closure_returns_none_and_trains():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = lopt.SmallFCLOpt(model.parameters(), random_theta(lopt.ORIGINAL), lr=1.0)
    x = torch.randn(32, 4)
    opt.zero_grad()
    model(x).square().mean().backward()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert opt.step() is None
    assert opt.state[model.weight]["step"].item() == 1
    # it trains: the parameters took the learned step the functional core computes
    want, _ = lopt.update(opt.theta, lopt.init_state(params, opt.config), params, grads, opt.config)
    for n, p in model.named_parameters():
        assert not torch.equal(p.detach(), params[n]), n
        torch.testing.assert_close(p.detach(), want[n], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- bad input
BAD_HYPERS = [
    ({"lr": -1.0}, "Invalid lr: -1.0"),
    ({"lr": float("nan")}, "Invalid lr: nan"),
    ({"lr": float("inf")}, "Invalid lr: inf"),
    ({"weight_decay": -0.1}, "Invalid weight_decay: -0.1"),
    ({"weight_decay": float("nan")}, "Invalid weight_decay: nan"),
    ({"lr": "fast"}, "Invalid lr: 'fast'"),
]


@pytest.mark.parametrize("kwargs,message", BAD_HYPERS, ids=lambda x: str(x))
def test_bad_hyperparameters_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), random_theta(lopt.ORIGINAL), **kwargs)


@pytest.mark.parametrize("kwargs,message", BAD_HYPERS[:5], ids=lambda x: str(x))
def test_bad_param_group_hyperparameters_are_rejected(kwargs, message):
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=message):
        lopt.SmallFCLOpt([{"params": model.parameters(), **kwargs}], random_theta(lopt.ORIGINAL))


def test_sparse_gradients_are_rejected():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = lopt.SmallFCLOpt(emb.parameters(), random_theta(lopt.ORIGINAL))
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_complex_parameters_are_rejected():
    p = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = lopt.SmallFCLOpt([p], random_theta(lopt.ORIGINAL))
    p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="does not support complex parameters"):
        opt.step()


def test_theta_with_wrong_shapes_is_rejected():
    theta = random_theta(lopt.ORIGINAL)
    with pytest.raises(ValueError, match=r"meta-weight 'w0' has shape \(39, 4\) but the config"):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), theta, lopt.MULO)
    theta.pop("b2")
    with pytest.raises(ValueError, match=r"missing keys \['b2'\]"):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), theta, lopt.ORIGINAL)
    bad = random_theta(lopt.ORIGINAL)
    bad["w1"][0, 0] = math.nan
    with pytest.raises(ValueError, match="'w1' contains NaN or inf"):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), bad)


def test_theta_matching_no_preset_needs_a_config():
    theta = random_theta(lopt.SmallFCConfig(hidden_size=7))
    with pytest.raises(ValueError, match="match no preset architecture; pass config="):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), theta)
    opt = lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), theta, lopt.SmallFCConfig(hidden_size=7))
    assert opt.config.hidden_size == 7


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta-weights file not found"):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize(
    "content,message",
    [
        (b"\x80\x04\x95hello pickle", "looks like a pickle; lozoo loads safetensors only"),
        (b"not a safetensors file at all", "is not a valid safetensors file"),
        (b"", "is not a valid safetensors file"),
    ],
    ids=["pickle", "garbage", "empty"],
)
def test_corrupt_or_foreign_weights_file(tmp_path, content, message):
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), str(path))


def test_truncated_weights_file(tmp_path):
    path = lopt.save_theta(tmp_path / "w.safetensors", random_theta(lopt.ORIGINAL), lopt.ORIGINAL)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(ValueError, match="is not a valid safetensors file"):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), str(path))


def test_real_torch_pickle_is_never_loaded(tmp_path):
    path = tmp_path / "theta.pt"
    torch.save(random_theta(lopt.ORIGINAL), path)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), str(path))


def test_safetensors_without_config_needs_one(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bare.safetensors"
    save_file(random_theta(lopt.ORIGINAL), str(path))
    with pytest.raises(ValueError, match="records no learned-optimizer architecture or config"):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), str(path))
    opt = lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), str(path), "original")
    assert opt.config == lopt.ORIGINAL


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), str(tmp_path))


def test_unknown_preset_and_bad_config():
    with pytest.raises(ValueError, match="unknown small_fc_lopt preset 'huge'; valid presets"):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), random_theta(lopt.ORIGINAL), "huge")
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        lopt.SmallFCConfig(hidden_size=0)
    with pytest.raises(ValueError, match="tie_break must be 'first' or 'last'"):
        lopt.SmallFCConfig(tie_break="middle")
    with pytest.raises(ValueError, match="unknown small_fc_lopt config keys"):
        lopt.SmallFCConfig.from_dict({"hidden": 3})


def test_weights_of_wrong_type():
    with pytest.raises(TypeError, match="weights must be a dict of tensors"):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), 3.0)


def test_state_shapes_follow_factored_rule():
    cfg = lopt.ORIGINAL
    shapes = core.state_shapes((8, 3), cfg)
    assert shapes == {"m": (8, 3, 3), "v": (8, 3, 1), "r": (3, 3), "c": (8, 3)}
    assert core.state_shapes((), cfg) == {"m": (1, 3), "v": (1, 1), "vd": (1, 3)}
