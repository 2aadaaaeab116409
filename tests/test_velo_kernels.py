"""VeLO's fused per-element op: parity with its pure-torch twin, opcheck, backends, fallback."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from lopt import velo
from lopt.velo import core, kernels

from .test_velo_optimizer import CFG, Net, closure_for, theta

SHAPES = [(), (7,), (20, 10), (16, 16), (8, 8, 3, 3), (4, 3, 5, 5), (3, 5, 5, 3), (2, 3, 2, 2, 2),
          (300, 257)]  # fmt: skip


def cpp_op():
    """The compiled op; in CI its absence is a failure, locally a skip."""
    reason = kernels.cpu_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"VeLO's compiled CPU kernel must be available in CI: {reason}")
        pytest.skip(f"VeLO's compiled CPU kernel unavailable: {reason}")
    return kernels.op()


def op_args(shape, seed=0, weight_decay=0.0, hidden=4, layers=2):
    gen = torch.Generator().manual_seed(seed)
    cfg = velo.VeLOConfig(mlp_hidden_size=hidden, mlp_hidden_layers=layers)
    p = torch.randn(shape, generator=gen)
    st = {k: v + 0.01 * torch.rand(v.shape, generator=gen) for k, v in
          velo.init_tensor_state(p, cfg).items()}  # fmt: skip
    sh = tuple(shape) or (1,)
    g = torch.randn(sh, generator=gen) * (3 * torch.rand(sh, generator=gen)) ** 2
    g.view(-1)[0] = 5000.0  # beyond the ±1000 clip
    acc = core.update_accumulators(p.reshape(sh), g, st, cfg)
    d1, d0 = core.factored_dims(sh, cfg.tie_break) or (-1, -1)
    mlp = []
    for fan_in, fan_out in cfg.mlp_layer_sizes():
        mlp += [torch.randn(fan_in, fan_out, generator=gen), torch.randn(fan_out, generator=gen)]
    s = acc.state
    return [p.reshape(sh).clone(), acc.grad, s["m"], s["v"], s.get("r"), s.get("c"),
            acc.row_factor, acc.col_factor, s.get("vd"), mlp, d1, d0, -0.7, 0.5, weight_decay,
            1e-3, 1e-3]  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_compiled_op_matches_the_torch_twin(shape, weight_decay):
    op = cpp_op()
    args = op_args(shape, weight_decay=weight_decay)
    old = args[0].clone()
    ours, twin = copy.deepcopy(args), copy.deepcopy(args)
    op(*ours)
    kernels.velo_mlp_step_torch(*twin)
    got, want = old - ours[0], old - twin[0]
    scale = want.abs().max()
    assert scale > 0
    # float32 sums of 30 squared channels in a different order, and p rounded after the step
    tol = 2e-5 * scale + 4 * torch.finfo(torch.float32).eps * old.abs().max()
    assert (got - want).abs().max() <= tol


def test_twin_equals_the_core_step():
    args = op_args((6, 5), seed=3)
    p, grad, m, v, r, c, rf, cf, vd, mlp, d1, d0, lr_mult, lr, wd, sm, em = args
    old = p.clone()
    kernels.velo_mlp_step_torch(*args)
    acc = core.Accumulated({"m": m, "v": v, "r": r, "c": c}, grad, rf, cf)
    features = core.element_features(old, acc, (d1, d0))
    pairs = [(mlp[i], mlp[i + 1]) for i in range(0, len(mlp), 2)]
    step = core.mlp_step(old, features, pairs, lr_mult, sm, em)
    torch.testing.assert_close(p, old - lr * step)


def test_wider_and_deeper_mlps_match():
    op = cpp_op()
    for hidden, layers in ((16, 1), (7, 3)):
        args = op_args((9, 4), seed=5, hidden=hidden, layers=layers)
        a, b = copy.deepcopy(args), copy.deepcopy(args)
        op(*a)
        kernels.velo_mlp_step_torch(*b)
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)


JIT_DEPRECATION = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"


@pytest.mark.filterwarnings(JIT_DEPRECATION)
@pytest.mark.parametrize("shape", [(), (5,), (6, 4), (3, 4, 2)], ids=str)
def test_opcheck(shape):
    op = cpp_op()
    torch.library.opcheck(op, tuple(op_args(shape)))


@pytest.mark.parametrize("use_op", [True, False], ids=["cpp", "twin"])
def test_bad_arguments_have_clear_messages(use_op):
    fn = cpp_op() if use_op else kernels.velo_mlp_step_torch
    args = op_args((6, 4))
    bad = list(args)
    bad[2] = torch.zeros(6, 4, 2)
    with pytest.raises(RuntimeError, match=r"lozoo::velo_mlp_step_: m has shape"):
        fn(*bad)
    bad = list(args)
    bad[10], bad[11] = 0, 0
    with pytest.raises(RuntimeError, match=r"\(d1, d0\) = \(0, 0\) are not two distinct axes"):
        fn(*bad)
    bad = list(args)
    bad[0] = args[0].double()
    with pytest.raises(RuntimeError, match="param must be a contiguous float32 tensor"):
        fn(*bad)
    bad = list(op_args((5,)))
    bad[4] = torch.zeros(5, 3)
    with pytest.raises(RuntimeError, match="a rank-1 param needs vd only"):
        fn(*bad)
    bad = list(args)
    bad[9] = [torch.zeros(30, 17), torch.zeros(17), torch.zeros(17, 3), torch.zeros(3)]
    with pytest.raises(RuntimeError, match=r"must have shape \(30, h\) with 1 <= h <= 16"):
        fn(*bad)


@pytest.mark.parametrize("tie_break", ["first", "pylo"])
def test_optimizer_backends_agree_over_steps(tie_break):
    cpp_op()
    cfg = velo.VeLOConfig(lstm_hidden_size=16, param_inits=8, tie_break=tie_break)
    th = velo.init_theta(cfg, torch.Generator().manual_seed(0))
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    models = {b: Net() for b in ("torch", "cpp")}
    opts = {
        b: velo.VeLO(m.parameters(), th, cfg, num_steps=10, weight_decay=0.1, backend=b)
        for b, m in models.items()
    }
    for _ in range(3):
        for b in models:
            opts[b].step(closure_for(models[b], x))
    for (n, a), b in zip(models["torch"].named_parameters(), models["cpp"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
        sa, sb = opts["torch"].state[a], opts["cpp"].state[b]
        if sa:
            torch.testing.assert_close(sa["lstm_h"], sb["lstm_h"], rtol=1e-4, atol=1e-5)


def test_auto_falls_back_loudly_and_cpp_refuses(monkeypatch):
    monkeypatch.setattr(kernels, "cpu_unavailable_reason", lambda *a: "no compiler here")
    monkeypatch.setattr(kernels, "_warned", set())
    model = Net()
    opt = velo.VeLO(model.parameters(), theta(), CFG, num_steps=5)
    with pytest.warns(UserWarning, match=r"no compiled VeLO kernel for cpu tensors \(no compiler"):
        opt.step(closure_for(model, torch.randn(4, 3)))
    with pytest.raises(RuntimeError, match="backend='cpp' is unavailable: no compiler here"):
        velo.VeLO(model.parameters(), theta(), CFG, num_steps=5, backend="cpp")
    with pytest.raises(ValueError, match="unknown backend 'gpu' for VeLO"):
        velo.VeLO(model.parameters(), theta(), CFG, num_steps=5, backend="gpu")


def test_channels_last_and_bfloat16_params_take_the_fused_path():
    cpp_op()
    conv = torch.nn.Conv2d(4, 4, 3).to(memory_format=torch.channels_last)
    ref = copy.deepcopy(conv)
    x = torch.randn(2, 4, 5, 5)
    for model, backend in ((conv, "cpp"), (ref, "torch")):
        opt = velo.VeLO(model.parameters(), theta(), CFG, num_steps=5, backend=backend)
        opt.step(closure_for_conv(model, x))
    torch.testing.assert_close(conv.weight, ref.weight, rtol=1e-5, atol=1e-6)
    half = Net().to(torch.bfloat16)
    opt = velo.VeLO(half.parameters(), theta(), CFG, num_steps=5, backend="cpp")
    opt.step(closure_for(half, torch.randn(4, 3, dtype=torch.bfloat16)))
    assert half.mat.dtype == torch.bfloat16 and torch.isfinite(half.mat.float()).all()


def closure_for_conv(model, x):
    def closure():
        model.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("shape", [(), (7,), (20, 10), (8, 8, 3, 3), (3, 5, 5, 3)], ids=str)
def test_cuda_op_matches_the_torch_twin(shape):
    reason = kernels.cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(f"CUDA kernel unavailable: {reason}")
    args = op_args(shape)
    old = args[0].clone()
    on_gpu = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    on_gpu[9] = [w.cuda() for w in args[9]]
    kernels.op()(*on_gpu)
    kernels.velo_mlp_step_torch(*args)
    got, want = old - on_gpu[0].cpu(), old - args[0]
    tol = 2e-5 * want.abs().max() + 4 * torch.finfo(torch.float32).eps * old.abs().max()
    assert (got - want).abs().max() <= tol
