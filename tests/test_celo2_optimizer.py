"""The Celo2-family and ELO optimizers: the optimizer contract, table-driven over the five
registered architectures, plus routing, bad input, backends and the compiled kernel's parity."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lopt
from lopt import celo2
from lopt.celo2 import core, fused

NAMES = ("celo2", "celo2_base", "pylo_celo2", "elo_celo2", "elo")
SHAPES = [(), (7,), (6, 6), (5, 9), (3, 2, 4), (4, 4, 3, 3), (8, 3, 5, 5)]


def make_theta(name: str, seed: int = 0) -> dict:
    arch = lopt.get_architecture(name)
    theta = arch.init_theta(arch.preset(), torch.Generator().manual_seed(seed))
    return {k: 2 * v for k, v in theta.items()}


def params_of(shapes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)


def run(name, shapes, steps=3, seed=0, **kwargs):
    params = params_of(shapes, seed)
    opt = lopt.get_architecture(name).optimizer(params, make_theta(name), **kwargs)
    for k in range(steps):
        set_grads(params, 100 + k)
        opt.step()
    return params, opt


# -- registry ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_registered_with_config_theta_and_shell(name):
    arch = lopt.get_architecture(name)
    cfg = arch.preset()
    assert type(cfg).architecture == name and arch.optimizer.architecture == name
    assert type(cfg).from_json(cfg.to_json()) == cfg
    theta = arch.init_theta(cfg)
    assert {k: tuple(v.shape) for k, v in theta.items()} == cfg.theta_shapes()
    assert sum(v.numel() for v in theta.values()) == cfg.num_params
    assert cfg.num_params == (2402 if name == "elo" else 347)
    assert name in arch.summary(cfg).lower()


# -- the optimizer contract -----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_lr_scales_the_step_and_weight_decay_is_decoupled(name):
    shapes = [(6, 5)]
    before = params_of(shapes)[0].detach()
    full, _ = run(name, shapes, steps=1, backend="torch")
    half, _ = run(name, shapes, steps=1, backend="torch", lr=0.5)
    decayed, _ = run(name, shapes, steps=1, backend="torch", lr=0.5, weight_decay=0.1)
    torch.testing.assert_close(half[0] - before, 0.5 * (full[0] - before))
    torch.testing.assert_close(decayed[0] - half[0], -0.05 * before)


@pytest.mark.parametrize("name", NAMES)
def test_maximize_steps_along_the_gradient(name):
    params = params_of([(5, 4), (5,)])
    flipped = [torch.nn.Parameter(p.detach().clone()) for p in params]
    cls = lopt.get_architecture(name).optimizer
    opt = cls(params, make_theta(name), maximize=True, backend="torch")
    ref = cls(flipped, make_theta(name), backend="torch")
    for k in range(2):
        set_grads(params, k)
        set_grads(flipped, k)
        for p in flipped:
            p.grad.neg_()
        opt.step()
        ref.step()
    for a, b in zip(params, flipped):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_closure_loss_is_returned_and_a_scheduler_drives_lr(name):
    params = params_of([(4, 3)])
    opt = lopt.get_architecture(name).optimizer(params, make_theta(name), backend="torch")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    steps = []
    for _ in range(3):
        before = params[0].detach().clone()
        set_grads(params, 0)
        loss = opt.step(lambda: torch.tensor(2.5))
        assert float(loss) == 2.5
        steps.append((params[0] - before).detach())
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)
    if name != "elo":  # a learned matrix step has RMS lr · step_mult exactly
        rms = [s.square().mean().sqrt().item() for s in steps]
        assert rms == pytest.approx([1e-3, 0.5e-3, 0.25e-3], rel=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resumes_identically(name):
    params, opt = run(name, SHAPES, steps=2, backend="torch")
    saved = copy.deepcopy(opt.state_dict())
    assert saved["meta_weights"]["architecture"] == name
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = lopt.get_architecture(name).optimizer(clone, make_theta(name), backend="torch")
    resumed.load_state_dict(saved)
    for p, q in ((params, opt), (clone, resumed)):
        set_grads(p, 7)
        q.step()
    for a, b in zip(params, clone):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["celo2", "celo2_base", "pylo_celo2", "elo_celo2"])
def test_shell_equals_the_functional_update(name):
    arch = lopt.get_architecture(name)
    params, opt = run(name, SHAPES, steps=3, backend="torch", lr=0.7, weight_decay=0.05)
    named = {f"p{i}": p.detach() for i, p in enumerate(params_of(SHAPES))}
    state = arch.init_state(named, arch.preset())
    for k in range(3):
        grads = {f"p{i}": g.grad for i, g in enumerate(_grads_like(named, 100 + k))}
        named, state = arch.update(make_theta(name), state, named, grads, arch.preset(), lr=0.7,
                                   weight_decay=0.05)  # fmt: skip
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), named[f"p{i}"], atol=1e-6, rtol=1e-6)


def _grads_like(named, seed):
    holders = [torch.nn.Parameter(v.clone()) for v in named.values()]
    set_grads(holders, seed)
    return holders


# -- routing, bad input ---------------------------------------------------------------------------
def test_group_option_routes_to_adam_or_to_the_rule():
    emb, bias = params_of([(10, 4), (4,)])
    opt = celo2.Celo2([{"params": [emb], "adam": True}, {"params": [bias], "adam": False}],
                      make_theta("celo2"), backend="torch")  # fmt: skip
    set_grads([emb, bias], 0)
    opt.step()
    assert core.is_adam_state(opt.state[emb]) and not core.is_adam_state(opt.state[bias])
    with pytest.raises(ValueError, match="param group option 'adam' must be True or False"):
        bad = celo2.Celo2([{"params": params_of([(3, 3)]), "adam": "yes"}], make_theta("celo2"))
        set_grads(bad.param_groups[0]["params"], 0)
        bad.step()


def test_named_parameters_route_by_the_configs_name_pattern_and_match_the_functional_update():
    shapes = {"embed.weight": (10, 4), "pos_embed": (6, 4), "body.weight": (5, 4), "body.b": (5,)}
    named = dict(zip(shapes, params_of(list(shapes.values()))))
    start = {n: p.detach().clone() for n, p in named.items()}
    opt = celo2.Celo2(named.items(), make_theta("celo2"), backend="torch", lr=0.5)
    state = celo2.init_state(start, celo2.CELO2)
    params = start
    for k in range(3):
        set_grads(named.values(), 100 + k)
        opt.step()
        grads = {n: p.grad for n, p in named.items()}
        params, state = celo2.update(make_theta("celo2"), state, params, grads, celo2.CELO2, lr=0.5)
    adam = {n for n, p in named.items() if core.is_adam_state(opt.state[p])}
    assert adam == {"embed.weight", "pos_embed", "body.b"}  # "embed" anywhere in the name
    for n, p in named.items():
        torch.testing.assert_close(p.detach(), params[n], atol=1e-6, rtol=1e-6)
    # an explicit group option overrides the name: the embedding takes the learned rule
    emb = params_of([(10, 4)])[0]
    forced = celo2.Celo2([{"params": [("embed.weight", emb)], "adam": False}], make_theta("celo2"))
    set_grads([emb], 0)
    forced.step()
    assert not core.is_adam_state(forced.state[emb])


@pytest.mark.parametrize("name", NAMES)
def test_rank_0_to_4_and_tied_shapes_step_finitely(name):
    params, opt = run(name, SHAPES + [(2, 2, 2, 2)], steps=2, backend="torch")
    assert all(torch.isfinite(p).all() for p in params)
    assert all(float(opt.state[p]["step"]) == 2 for p in params)


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_gradients_skip_their_tensor_or_raise(name):
    """The shared shell policy: a NaN/inf gradient leaves its tensor alone (the ±1000 clip of
    the learned branch is a core property, tested with the core), or raises on request."""
    params = params_of([(5, 4), (6, 3), (4,)])
    before = [p.detach().clone() for p in params]
    opt = lopt.get_architecture(name).optimizer(params, make_theta(name), backend="torch")
    set_grads(params, 0)
    params[0].grad[0, 0] = float("inf")
    params[1].grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert torch.equal(params[0], before[0]) and torch.equal(params[1], before[1])
    assert not torch.equal(params[2], before[2]) and opt.nonfinite_skips == 2
    strict = lopt.get_architecture(name).optimizer(params, make_theta(name), nonfinite="raise")
    with pytest.raises(lopt.NonFiniteGradientError):
        strict.step()


def test_bf16_parameters_step_in_float32():
    params = params_of([(8, 6)], dtype=torch.bfloat16)
    ref = [torch.nn.Parameter(params[0].detach().float())]
    for group, dtype in ((params, torch.bfloat16), (ref, torch.float32)):
        opt = celo2.Celo2(group, make_theta("celo2"), backend="torch")
        set_grads(group, 0)
        group[0].grad = group[0].grad.to(dtype)
        opt.step()
    assert params[0].dtype == torch.bfloat16
    torch.testing.assert_close(params[0].float(), ref[0].detach().bfloat16().float())


def test_backend_errors_name_the_problem(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'gpu' for Celo2; valid backends"):
        celo2.Celo2(params_of([(3, 3)]), make_theta("celo2"), backend="gpu")
    monkeypatch.setattr(fused, "op_is_available", lambda device="cpu": False)
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
        celo2.Celo2(params_of([(3, 3)]), make_theta("celo2"), backend="cuda")


def test_auto_falls_back_loudly_when_the_kernel_is_missing(monkeypatch):
    monkeypatch.setattr(fused, "op_is_available", lambda device="cpu": False)
    monkeypatch.setattr(fused, "_warned", set())
    with pytest.warns(UserWarning, match="no compiled Celo2 kernel for cpu tensors"):
        monkeypatch.setattr(fused, "_warned", set())
        run("celo2", [(4, 4)], steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run("celo2", [(4, 4)], steps=1)  # once per process and device type


@pytest.mark.parametrize("foreach", [False, True])
def test_adam_branch_tensors_resolve_no_kernel_backend(monkeypatch, foreach):
    """The Adam branch has no kernel, so a group of only rank <= 1 tensors never reaches the
    missing-kernel fallback (nor its warning)."""
    monkeypatch.setattr(fused, "op_is_available", lambda device="cpu": False)
    monkeypatch.setattr(fused, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run("celo2", [(7,), ()], steps=2, foreach=foreach)


# -- the compiled CPU kernel ------------------------------------------------------------------
needs_cpp = pytest.mark.skipif(not fused.op_is_available("cpu"), reason="CPU kernel not built")


@needs_cpp
@pytest.mark.parametrize("name", ["celo2", "celo2_base", "elo_celo2", "elo"])
def test_cpp_backend_matches_torch_backend(name):
    shapes = SHAPES + [(5, 5, 3, 2), (64, 33), (16, 16)]
    a, _ = run(name, shapes, steps=4, backend="torch")
    b, _ = run(name, shapes, steps=4, backend="cpp")
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=0)


@needs_cpp
@pytest.mark.parametrize("orthogonalize", [False, True])
@pytest.mark.parametrize("shape", [(1,), (9,), (6, 6), (5, 9), (9, 5), (2, 3, 8), (3, 3, 16, 8)])
def test_kernel_direction_matches_the_core(shape, orthogonalize):
    import dataclasses

    cfg = dataclasses.replace(celo2.CELO2_BASE, layout="as_stored")
    theta = make_theta("celo2", 3)
    args = fused.theta_args(theta)
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(shape, generator=gen)
    want_state = core.init_tensor_state(p, cfg, adam=False)
    got_state = {k: v.clone() for k, v in want_state.items()}
    for t in range(4):
        g = torch.randn(shape, generator=gen) * 10.0 ** (t - 2)
        want, want_state = core.reference_direction(theta, p, g, want_state, orthogonalize)
        d = fused.kernel_direction_(args, p, g, got_state, orthogonalize)
        got = d * fused.unit_rms_scale(d)
        torch.testing.assert_close(got, want, atol=2e-4 if orthogonalize else 2e-5, rtol=0)
        for k in want_state:
            torch.testing.assert_close(got_state[k], want_state[k])


@needs_cpp
def test_kernel_rejects_bad_arguments_with_the_reason():
    args = fused.theta_args(make_theta("celo2"))
    x = torch.zeros(1, 2, 3)
    with pytest.raises(RuntimeError, match="celo2_direction: m has shape"):
        torch.ops.lozoo.celo2_direction(x, x, torch.zeros(1, 2, 3, 2), x,
                                        torch.zeros(1, 9, 2), torch.zeros(1, 9, 3), None,
                                        *args, True)  # fmt: skip
    with pytest.raises(RuntimeError, match="pass row_stats and col_stats"):
        torch.ops.lozoo.celo2_direction(x, x, torch.zeros(1, 2, 3, 3), x, None, None, None,
                                        *args, True)  # fmt: skip


# -- the CUDA kernel (runs where a device is present; CI compiles it with nvcc) ----------------
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not fused.op_is_available("cuda"),
    reason="needs a CUDA device and the compiled CUDA kernel",
)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("orthogonalize", [False, True])
@pytest.mark.parametrize("shape", [(1,), (9,), (6, 6), (5, 9), (9, 5), (2, 3, 8), (3, 3, 16, 8)])
def test_cuda_kernel_direction_matches_the_core(shape, orthogonalize):
    import dataclasses

    cfg = dataclasses.replace(celo2.CELO2_BASE, layout="as_stored")
    theta = {k: v.cuda() for k, v in make_theta("celo2", 3).items()}
    args = fused.theta_args(theta)
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(shape, generator=gen).cuda()
    want_state = core.init_tensor_state(p, cfg, adam=False)
    got_state = {k: v.clone() for k, v in want_state.items()}
    for t in range(4):
        g = (torch.randn(shape, generator=gen) * 10.0 ** (t - 2)).cuda()
        want, want_state = core.reference_direction(theta, p, g, want_state, orthogonalize)
        d = fused.kernel_direction_(args, p, g, got_state, orthogonalize)
        got = d * fused.unit_rms_scale(d)
        torch.testing.assert_close(got, want, atol=2e-4 if orthogonalize else 2e-5, rtol=0)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", ["celo2", "pylo_celo2", "elo"])
def test_cuda_backend_matches_torch_backend_on_the_device(name):
    optimizer = lopt.get_architecture(name).optimizer
    assert_cuda_matches_torch(
        lambda params, backend: optimizer(params, make_theta(name), backend=backend),
        SHAPES + [(5, 5, 3, 2), (64, 33)],
    )


def assert_cuda_matches_torch(make_optimizer, shapes, steps=3):
    """The same 3 steps on the device through the torch backend and the cuda backend agree."""
    results = []
    for backend in ("torch", "cuda"):
        params = [torch.nn.Parameter(p.detach().cuda()) for p in params_of(shapes)]
        opt = make_optimizer(params, backend)
        for k in range(steps):
            set_grads(params, 100 + k)
            opt.step()
        results.append(params)
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, atol=5e-6, rtol=0)


# -- zoo -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_zoo_round_trip_and_make_optimizer(zroot, name):
    import zoo

    arch = lopt.get_architecture(name)
    theta = make_theta(name)
    entry = zoo.publish(theta, arch.preset(), f"{name.replace('_', '-')}/test")
    loaded = zoo.load(entry.ref)
    assert loaded.architecture == name and loaded.config == arch.preset()
    assert loaded.optimizer_class is arch.optimizer
    assert all(torch.equal(loaded.theta[k], theta[k]) for k in theta)
    params = params_of([(4, 3), (4,)])
    opt = lopt.make_optimizer(params, weights=entry.ref, backend="torch")
    assert type(opt) is arch.optimizer and opt.meta_weights_info["source"] == f"zoo:{entry.ref}"
    set_grads(params, 0)
    opt.step()


# -- conv_mode="matrix" -------------------------------------------------------------------------
CONV_SHAPES = [(16, 1, 3, 3), (32, 16, 3, 3), (8, 4, 5, 5), (6, 6, 1, 1), (4, 3, 2, 2, 2),
               (5, 3, 4)]  # fmt: skip


def matrix_config(name="celo2"):
    import dataclasses

    return dataclasses.replace(lopt.get_architecture(name).preset(), conv_mode="matrix")


@needs_cpp
@pytest.mark.parametrize("name", ["celo2", "celo2_base"])
def test_matrix_mode_cpp_backend_matches_torch_backend_on_convs(name):
    shapes = CONV_SHAPES + [(6, 5), (7,)]
    a, _ = run(name, shapes, steps=4, backend="torch", config=matrix_config(name))
    b, _ = run(name, shapes, steps=4, backend="cpp", config=matrix_config(name))
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_matrix_mode_shell_equals_the_functional_update(backend):
    cfg = matrix_config()
    params, _ = run("celo2", CONV_SHAPES, steps=3, backend=backend, config=cfg, lr=0.7,
                    weight_decay=0.05)  # fmt: skip
    named = {f"p{i}": p.detach() for i, p in enumerate(params_of(CONV_SHAPES))}
    state = celo2.init_state(named, cfg)
    for k in range(3):
        grads = {f"p{i}": g.grad for i, g in enumerate(_grads_like(named, 100 + k))}
        named, state = celo2.update(make_theta("celo2"), state, named, grads, cfg, lr=0.7,
                                    weight_decay=0.05)  # fmt: skip
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), named[f"p{i}"], atol=2e-6, rtol=0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_matrix_mode_bf16_conv_steps_in_float32(backend):
    params = params_of([(8, 3, 3, 3)], dtype=torch.bfloat16)
    ref = [torch.nn.Parameter(params[0].detach().float())]
    for group, dtype in ((params, torch.bfloat16), (ref, torch.float32)):
        opt = celo2.Celo2(group, make_theta("celo2"), config=matrix_config(), backend=backend)
        set_grads(group, 0)
        group[0].grad = group[0].grad.to(dtype)
        opt.step()
    torch.testing.assert_close(params[0].float(), ref[0].detach().bfloat16().float())


@pytest.mark.cuda
@needs_cuda
def test_matrix_mode_cuda_backend_matches_torch_backend_on_the_device():
    assert_cuda_matches_torch(
        lambda params, backend: celo2.Celo2(
            params, make_theta("celo2"), config=matrix_config(), backend=backend
        ),
        CONV_SHAPES,
    )


@pytest.mark.parametrize(
    "saved, loaded",
    [("slices", "matrix"), ("matrix", "slices")],
)
def test_state_saved_under_one_conv_mode_is_refused_under_the_other(saved, loaded):
    import dataclasses

    cfgs = {m: dataclasses.replace(celo2.CELO2, conv_mode=m) for m in ("slices", "matrix")}
    shapes = [(6, 5), (8, 4, 3, 3)]
    _, opt = run("celo2", shapes, steps=1, backend="torch", config=cfgs[saved])
    state = copy.deepcopy(opt.state_dict())
    other = celo2.Celo2(params_of(shapes), make_theta("celo2"), config=cfgs[loaded])
    with pytest.raises(
        ValueError,
        match=rf"saved with conv_mode='{saved}', this optimizer has conv_mode='{loaded}'; the "
        r"learned state of parameter 1 \(shape \(8, 4, 3, 3\)\) lives in the rule's frame.*"
        rf"build Celo2 with conv_mode='{saved}' to resume",
    ):
        other.load_state_dict(state)
    same = celo2.Celo2(params_of(shapes), make_theta("celo2"), config=cfgs[saved])
    same.load_state_dict(copy.deepcopy(state))  # the same mode resumes


def test_conv_mode_switch_without_convs_resumes_and_old_records_read_as_slices():
    import dataclasses

    _, opt = run("celo2", [(6, 5), (5,)], steps=1, backend="torch")
    state = opt.state_dict()
    del state["meta_weights"]["config"]["conv_mode"]  # a record from before the field
    matrix = celo2.Celo2(params_of([(6, 5), (5,)]), make_theta("celo2"), config=matrix_config())
    matrix.load_state_dict(copy.deepcopy(state))  # a matrix's frame is the same in both modes
    _, conv_opt = run("celo2", [(4, 2, 3, 3)], steps=1, backend="torch")
    conv_state = conv_opt.state_dict()
    del conv_state["meta_weights"]["config"]["conv_mode"]
    with pytest.raises(ValueError, match="saved with conv_mode='slices'"):
        celo2.Celo2(params_of([(4, 2, 3, 3)]), make_theta("celo2"),
                    config=matrix_config()).load_state_dict(conv_state)  # fmt: skip
    # layout is a frame field too: a square matrix keeps its shapes but swaps its axes
    as_stored = dataclasses.replace(celo2.CELO2, layout="as_stored")
    _, square = run("celo2", [(6, 6)], steps=1, backend="torch")
    with pytest.raises(ValueError, match="saved with layout='torch', this optimizer has "
                                         "layout='as_stored'"):  # fmt: skip
        celo2.Celo2(params_of([(6, 6)]), make_theta("celo2"),
                    config=as_stored).load_state_dict(square.state_dict())  # fmt: skip


# -- the multi-tensor (foreach) path ----------------------------------------------------------
# Repeated shapes stack; (3, 2, 4) repeats but its factored axes are not the last two in the
# rule's frame under conv_mode="slices", so it steps alone there; the second (6, 6) and (7,)
# miss step 0 (other step counts).
FOREACH_SHAPES = [(6, 6), (6, 6), (5, 9), (5, 9), (5, 9), (9, 5), (7,), (7,), (4, 4, 3, 3),
                  (4, 4, 3, 3), (8, 3, 5, 5), (), (3, 2, 4), (3, 2, 4)]  # fmt: skip


def run_foreach(
    name, foreach, backend, conv_mode="slices", device="cpu", steps=4, log=None, **kwargs
):
    import dataclasses

    params = [torch.nn.Parameter(p.detach().to(device)) for p in params_of(FOREACH_SHAPES)]
    arch = lopt.get_architecture(name)
    cfg = dataclasses.replace(arch.preset(), conv_mode=conv_mode)
    opt = arch.optimizer(params, make_theta(name), config=cfg, backend=backend,
                         foreach=foreach, lr=0.7, weight_decay=0.1, maximize=True,
                         **kwargs)  # fmt: skip
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for k in range(steps):
        set_grads(params, 100 + k)
        for p in params:  # small enough for the Adam branch's eps to count
            p.grad *= 1e-6
        if k == 0:
            params[1].grad = params[7].grad = None
        if log is not None:
            log.append(("step", k))
        opt.step()
        schedule.step()  # the learning rate changes every step
    return params, opt


def spy_on_multi_tensor(monkeypatch):
    from lopt.celo2 import multi_tensor

    calls = []
    stacked, adam = multi_tensor.step_learned_stacked_, multi_tensor.step_adam_foreach_

    def spy_stacked(args, params, *rest, **kwargs):
        calls.append(("learned", tuple(params[0].shape), len(params)))
        return stacked(args, params, *rest, **kwargs)

    def spy_adam(params, *rest, **kwargs):
        calls.append(("adam", len(params)))
        return adam(params, *rest, **kwargs)

    monkeypatch.setattr(multi_tensor, "step_learned_stacked_", spy_stacked)
    monkeypatch.setattr(multi_tensor, "step_adam_foreach_", spy_adam)
    return calls


@needs_cpp
@pytest.mark.parametrize("conv_mode", ["slices", "matrix"])
@pytest.mark.parametrize("name", ["celo2", "celo2_base", "pylo_celo2", "elo_celo2"])
def test_foreach_path_computes_what_the_per_tensor_path_computes(monkeypatch, name, conv_mode):
    want, want_opt = run_foreach(name, False, "cpp", conv_mode)
    calls = spy_on_multi_tensor(monkeypatch)
    got, got_opt = run_foreach(name, True, "cpp", conv_mode, log=calls)
    for p, q in zip(want, got):  # same ops on the same numbers: equal, not close
        assert torch.equal(p, q)
        assert want_opt.state[p].keys() == got_opt.state[q].keys()
        for key, value in want_opt.state[p].items():
            assert torch.equal(value, got_opt.state[q][key]), key
    marks = [calls.index(("step", k)) for k in range(4)] + [len(calls)]
    steps = [sorted(calls[i + 1 : j]) for i, j in zip(marks, marks[1:])]
    stacks = [("learned", (4, 4, 3, 3), 2), ("learned", (5, 9), 3)]  # (6, 6) alone at step 0
    if conv_mode == "matrix":  # (3, 2, 4) is the (8, 3) matrix: its axes are the last two
        stacks.insert(0, ("learned", (3, 2, 4), 2))
    later = sorted(stacks + [("learned", (6, 6), 2)])
    if name == "celo2_base":  # no Adam branch: its rank <= 1 tensors take the rule, alone
        assert steps == [stacks] + [later] * 3
    else:  # Adam buckets by step count: (7,) and the scalar; then the (7,) that missed step 0
        assert (
            steps
            == [sorted(stacks + [("adam", 2)])] + [sorted(later + [("adam", 1), ("adam", 2)])] * 3
        )


@needs_cpp
def test_foreach_is_a_group_option_checked_at_construction():
    params = params_of([(6, 6), (6, 6)])
    with pytest.raises(ValueError, match="foreach must be None .* True or False, got 'yes'"):
        celo2.Celo2(params, make_theta("celo2"), foreach="yes")
    with pytest.raises(ValueError, match="foreach must be None .* got 1"):
        celo2.Celo2([{"params": params, "foreach": 1}], make_theta("celo2"))
    opt = celo2.Celo2([{"params": params[:1]}], make_theta("celo2"), foreach=True)
    with pytest.raises(ValueError, match="foreach must be None .* got 'no'"):
        opt.add_param_group({"params": params[1:], "foreach": "no"})
    opt.add_param_group({"params": params[1:], "foreach": False})
    assert [g["foreach"] for g in opt.param_groups] == [True, False]


@needs_cpp
def test_state_dict_without_the_foreach_option_loads_and_steps(monkeypatch):
    params, opt = run_foreach("celo2", True, "cpp", steps=2)
    saved = opt.state_dict()
    assert saved["param_groups"][0]["foreach"] is True
    del saved["param_groups"][0]["foreach"]  # as written before the option existed
    resumed = celo2.Celo2(params, make_theta("celo2"), backend="cpp")
    resumed.load_state_dict(saved)
    calls = spy_on_multi_tensor(monkeypatch)
    set_grads(params, 7)
    resumed.step()
    assert calls == []  # None: per tensor on the CPU
    assert all(torch.isfinite(p).all() for p in params)


@needs_cpp
def test_kernel_direction_refuses_stack_axes_that_are_not_the_last_two():
    p = torch.randn(2, 5, 9)
    state = core.init_tensor_state(p, celo2.CELO2_BASE, adam=False)
    with pytest.raises(ValueError, match=r"axes \(0, 2\) of shape \(2, 5, 9\) are not its last"):
        fused.kernel_direction_(fused.theta_args(make_theta("celo2")), p, p, state, True,
                                axes=(0, 2))  # fmt: skip


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("conv_mode", ["slices", "matrix"])
@pytest.mark.parametrize("name", ["celo2", "pylo_celo2"])
def test_cuda_foreach_path_matches_per_tensor_and_torch_backend(monkeypatch, name, conv_mode):
    want, _ = run_foreach(name, False, "cuda", conv_mode, device="cuda")
    reference, _ = run_foreach(name, False, "torch", conv_mode, device="cuda")
    calls = spy_on_multi_tensor(monkeypatch)
    got, _ = run_foreach(name, None, "cuda", conv_mode, device="cuda")  # None: on for CUDA
    assert ("learned", (5, 9), 3) in calls
    for p, q, r in zip(want, got, reference):
        # batched GEMMs and scalar divisions may round differently on the device
        torch.testing.assert_close(q, p, atol=2e-6, rtol=0)
        torch.testing.assert_close(q, r, atol=5e-6, rtol=0)


def test_cuda_graphs_option_is_checked_kept_and_leaves_cpu_tensors_alone(monkeypatch):
    with pytest.raises(ValueError, match="cuda_graphs must be True or False, got 'yes'"):
        celo2.Celo2(params_of([(6, 6)]), make_theta("celo2"), cuda_graphs="yes")
    want, _ = run_foreach("celo2", None, "torch")
    calls = spy_on_multi_tensor(monkeypatch)
    got, opt = run_foreach("celo2", None, "torch", cuda_graphs=True)
    assert calls == []  # CPU tensors: per tensor, as without the option
    for p, q in zip(want, got):
        assert torch.equal(p, q)
    assert copy.deepcopy(opt).cuda_graphs is True


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("conv_mode", ["slices", "matrix"])
def test_cuda_graphs_replay_what_the_eager_path_computes(conv_mode):
    eager, _ = run_foreach("pylo_celo2", True, "cuda", conv_mode, device="cuda")
    got, opt = run_foreach("pylo_celo2", True, "cuda", conv_mode, device="cuda", cuda_graphs=True)
    # step 0 without the second (6, 6), then with it: two graphs for that shape
    shapes = [key[1] for key in opt._captured_stacks]
    assert shapes.count(core.reference_shape((6, 6), opt.config)) == 2
    for p, q in zip(eager, got):  # the same kernels, replayed
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0)
    # a checkpoint of the graphed optimizer resumes (graphs are recorded again) identically
    resumed = celo2.PyloCelo2(got, make_theta("pylo_celo2"), config=opt.config, backend="cuda",
                          cuda_graphs=True)  # fmt: skip
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin = [torch.nn.Parameter(p.detach().clone()) for p in got]
    again = celo2.PyloCelo2(twin, make_theta("pylo_celo2"), config=opt.config, backend="cuda")
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    for ps, o in ((got, resumed), (twin, again)):
        set_grads(ps, 9)
        o.step()
    for p, q in zip(got, twin):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


class EagerCapture:
    """Stands in for multi_tensor.CapturedStack on the CPU: the same buffers, no graph."""

    made: list = []

    def __init__(self, stack):
        self.stack = stack
        EagerCapture.made.append(stack.p.shape)

    def step(self, params, grads, states, *, lr, weight_decay):
        self.stack.load(params, grads, states)
        self.stack.store(*self.stack.direction(), params, states, lr=lr, weight_decay=weight_decay)


@needs_cpp
def test_graph_buckets_are_kept_per_set_of_tensors_and_step_like_the_eager_path(monkeypatch):
    from lopt.celo2 import multi_tensor

    want, _ = run_foreach("celo2", True, "cpp", steps=5)
    monkeypatch.setattr(multi_tensor, "graphs_apply", lambda enabled, device: enabled)
    monkeypatch.setattr(multi_tensor, "CapturedStack", EagerCapture)
    EagerCapture.made = []
    got, opt = run_foreach("celo2", False, "cpp", steps=5, cuda_graphs=True)
    for p, q in zip(want, got):
        assert torch.equal(p, q)
    # One per set of tensors stepping together, recorded once over 5 steps (shapes in the rule's
    # frame): step 0 has one (6, 6), later steps both, a new set; a bucket of one has a graph too.
    made = sorted(tuple(s) for s in EagerCapture.made)
    assert made == [(1, 5, 9), (1, 6, 6), (2, 3, 3, 4, 4), (2, 6, 6), (3, 9, 5)]
    assert len(opt._captured_stacks) == len(made)


@needs_cpp
def test_a_failed_graph_capture_warns_once_and_steps_without_graphs(monkeypatch):
    from lopt.celo2 import multi_tensor

    def refuse(stack):
        raise RuntimeError("operation not permitted when stream is capturing")

    want, _ = run_foreach("celo2", True, "cpp")
    monkeypatch.setattr(multi_tensor, "graphs_apply", lambda enabled, device: enabled)
    monkeypatch.setattr(multi_tensor, "CapturedStack", refuse)
    with pytest.warns(
        RuntimeWarning, match=r"recording a CUDA graph failed \(operation not"
    ) as rec:
        got, opt = run_foreach("celo2", False, "cpp", cuda_graphs=True)
    assert len([w for w in rec if "CUDA graph" in str(w.message)]) == 1
    assert opt.cuda_graphs is False
    for p, q in zip(want, got):
        assert torch.equal(p, q)
