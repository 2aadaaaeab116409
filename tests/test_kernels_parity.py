"""Parity of the fused small_fc_lopt step (compiled CPU op and chunked torch twin) with the core.

Every backend runs a free trajectory (its own params and state) next to ``core.tensor_step`` in
fp32; parameters must agree to 1e-5 of the distance they travelled and every state tensor to 1e-5 of
its magnitude (issue 7, docs/design/small_fc_lopt.md §13). Shapes cover ranks 0-5, ties, size-1
axes, a single element and a 1M-element tensor; the traps of design §11 get their own cases, with
negative controls showing that the buggy variants would fail these tolerances.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lopt
from lopt import core
from lopt.config import SmallFCConfig
from lopt.kernels import ops, torch_backend

from .test_lopt_core import random_theta, scaled_grads

RTOL = 1e-5
LAST = SmallFCConfig(tie_break="last")
CONFIGS = {
    "original": lopt.ORIGINAL,
    "mulo": lopt.MULO,
    "original_last": LAST,
    "mulo_last": dataclasses.replace(lopt.MULO, tie_break="last"),
    "h5_l3": SmallFCConfig(hidden_size=5, hidden_layers=3),  # padded width, two h×h layers
}


def cpp_step_fn():
    """The compiled op; in CI its absence is a failure, locally a skip."""
    result = ops.load_cpp()
    if not result.ok:
        if os.environ.get("CI"):
            pytest.fail(f"the compiled CPU kernel must be available in CI: {result.error}")
        pytest.skip(f"compiled CPU kernel unavailable: {result.error}")
    return ops.step_op()


@pytest.fixture(params=["cpp", "torch"])
def backend(request):
    return request.param


def step_fn_for(name: str):
    return cpp_step_fn() if name == "cpp" else torch_backend.small_fc_step_


def op_inputs(theta: dict, cfg: SmallFCConfig) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return ops.theta_args(theta, cfg)


def run_backend(fn, cfg, theta, p0, grads, *, lr=1.0, wd=0.0, maximize=False, **kwargs):
    """Trajectory of one backend on p0's device: returns (final param, final state)."""
    theta = {k: v.to(p0.device) for k, v in theta.items()}
    p = p0.clone()
    state = core.init_tensor_state(p, cfg)
    d1, d0 = core.factored_dims(tuple(p.shape) or (1,), cfg.tie_break) or (-1, -1)
    decays, layers = op_inputs(theta, cfg)
    for t, g in enumerate(grads):
        fn(
            p, g.to(p.device, p.dtype), state["m"], state["v"], state.get("r"), state.get("c"),
            state.get("vd"), decays, layers, d1, d0, float(t), lr, wd, cfg.step_mult,
            cfg.exp_mult, maximize, **kwargs,
        )  # fmt: skip
    return p, state


def run_reference(cfg, theta, p0, grads, *, lr=1.0, wd=0.0, maximize=False):
    """The same trajectory through core.tensor_step and SmallFCLOpt's update rule."""
    theta = {k: v.to(p0.device) for k, v in theta.items()}
    p = p0.clone()
    state = core.init_tensor_state(p, cfg)
    for t, g in enumerate(grads):
        g32 = g.to(p.device, p.dtype).float()
        g32 = -g32 if maximize else g32
        step, state = core.tensor_step(theta, p.float(), g32, state, float(t), cfg)
        p32 = p.float() * (1 - lr * wd) if wd else p.float()
        p = (p32 - lr * step).to(p.dtype)
    return p, state


def assert_parity(got, want, p0, steps: int, rtol: float = RTOL) -> None:
    (p, state), (p_ref, state_ref) = got, want
    travelled = (p_ref.double() - p0.double()).abs().max().item()
    # fp32 rounds p at every step: allow that (a random walk of half-ulps) on top of rtol.
    rounding = torch.finfo(p.dtype).eps * p_ref.abs().max().item() * math.sqrt(steps)
    err = (p.double() - p_ref.double()).abs().max().item()
    assert err <= rtol * travelled + rounding, f"param: {err:.3g} vs travelled {travelled:.3g}"
    assert state.keys() == state_ref.keys()
    for key, ref in state_ref.items():
        scale = ref.abs().max().item()
        diff = (state[key] - ref).abs().max().item()
        assert diff <= rtol * scale, f"state {key}: {diff:.3g} vs scale {scale:.3g}"


def case(shape, steps=10, seed=0, cfg="original", scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    p0 = scale * torch.randn(shape, generator=gen)
    grads = scaled_grads(shape, steps, seed + 1) if len(shape) else [
        torch.randn((), generator=gen) for _ in range(steps)
    ]  # fmt: skip
    return CONFIGS[cfg], p0, grads


SHAPES = [
    (),  # a scalar: stepped as one element of rank 1
    (1,),
    (1, 1),  # one element, factored, both axes tie
    (1, 1, 1),
    (7,),
    (1000,),
    (5, 5),  # square: the tie rule decides d0
    (6, 9),
    (9, 6),
    (1, 7),  # a size-1 axis
    (130, 70),
    (4, 4, 4),  # rank-3 ties (trap T2)
    (5, 3, 5),  # tie between non-adjacent axes
    (2, 3, 4),
    (3, 5, 5, 3),
    (16, 16, 3, 3),  # conv weight with in == out
    (8, 3, 4, 4),  # conv weight, kernel axes tie
    (6, 2, 2, 6),
    (2, 3, 4, 5, 6),  # rank 5
]


@pytest.mark.parametrize("cfg_name", ["original", "mulo", "original_last", "mulo_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_trajectories_match_core(backend, cfg_name, shape):
    cfg, p0, grads = case(shape, steps=10, cfg=cfg_name)
    theta = random_theta(cfg, seed=3)
    got = run_backend(step_fn_for(backend), cfg, theta, p0, grads)
    assert_parity(got, run_reference(cfg, theta, p0, grads), p0, len(grads))


@pytest.mark.parametrize("shape", [(), (9,), (6, 9), (4, 4, 4), (3, 2, 3, 2)], ids=str)
def test_deeper_and_odd_width_mlp(backend, shape):
    cfg, p0, grads = case(shape, steps=10, cfg="h5_l3", seed=4)
    theta = random_theta(cfg, seed=5)
    got = run_backend(step_fn_for(backend), cfg, theta, p0, grads)
    assert_parity(got, run_reference(cfg, theta, p0, grads), p0, len(grads))


@pytest.mark.parametrize(
    "lr,wd,maximize", [(0.3, 0.0, False), (1.0, 0.1, False), (0.5, 0.2, True)], ids=str
)
@pytest.mark.parametrize("shape", [(), (7,), (6, 9), (3, 5, 5, 3)], ids=str)
def test_lr_weight_decay_and_maximize(backend, shape, lr, wd, maximize):
    cfg, p0, grads = case(shape, steps=10, cfg="mulo", seed=6)
    theta = random_theta(cfg, seed=7)
    kw = {"lr": lr, "wd": wd, "maximize": maximize}
    got = run_backend(step_fn_for(backend), cfg, theta, p0, grads, **kw)
    assert_parity(got, run_reference(cfg, theta, p0, grads, **kw), p0, len(grads))


def test_large_tensor(backend):
    cfg, p0, grads = case((1024, 1030), steps=3, cfg="original", seed=8)
    theta = random_theta(cfg, seed=9)
    got = run_backend(step_fn_for(backend), cfg, theta, p0, grads)
    assert_parity(got, run_reference(cfg, theta, p0, grads), p0, len(grads))


@pytest.mark.parametrize("cfg_name", ["original", "mulo"])
@pytest.mark.parametrize("shape", [(256, 64), (64, 256), (12, 40, 3, 3)], ids=str)
def test_t1_non_uniform_row_and_column_scales_over_60_steps(backend, cfg_name, shape):
    """Trap T1: gradient scales spread 100× along every axis, 60 steps, ≤ 1e-5."""
    cfg, p0, grads = case(shape, steps=60, cfg=cfg_name, seed=10)
    theta = random_theta(cfg, seed=11)
    got = run_backend(step_fn_for(backend), cfg, theta, p0, grads)
    assert_parity(got, run_reference(cfg, theta, p0, grads), p0, len(grads))


def _wrong_axis_row_factors(r, c, d1, d0):
    # PyLO's T1: the row normaliser averages over the decay axis instead of axis d1.
    return core._safe_rsqrt(r / (r.mean(-1, keepdim=True) + 1e-9)), core._safe_rsqrt(c)


def test_t1_negative_control_fails_the_tolerance(monkeypatch):
    cfg, p0, grads = case((256, 64), steps=60, cfg="original", seed=10)
    theta = random_theta(cfg, seed=11)
    want = run_reference(cfg, theta, p0, grads)
    monkeypatch.setattr(core, "row_col_factors", _wrong_axis_row_factors)
    buggy = run_reference(cfg, theta, p0, grads)
    with pytest.raises(AssertionError):
        assert_parity(buggy, want, p0, len(grads))


def test_t2_negative_control_matrix_indexing_fails_the_tolerance():
    """Trap T2: factoring a rank-4 weight as the matrix (S[0], rest) is caught by the tolerance."""
    shape = (12, 40, 3, 3)
    cfg, p0, grads = case(shape, steps=10, cfg="original", seed=12)
    theta = random_theta(cfg, seed=13)
    want = run_reference(cfg, theta, p0, grads)
    flat = run_reference(cfg, theta, p0.reshape(12, -1), [g.reshape(12, -1) for g in grads])
    buggy = (flat[0].reshape(shape), want[1])  # states differ in shape; compare params only
    with pytest.raises(AssertionError):
        assert_parity(buggy, want, p0, len(grads))


def test_t3_tiny_gradients_use_the_1e6_momentum_epsilon(backend):
    """Trap T3: with vd ≪ 1e-6, (vd + 1e-6)^-1/2 and safe_rsqrt(vd + 1e-9) differ a lot."""
    cfg = lopt.ORIGINAL
    gen = torch.Generator().manual_seed(14)
    p0 = 0.1 * torch.randn(50, generator=gen)
    grads = [1e-5 * torch.randn(50, generator=gen) for _ in range(10)]
    theta = random_theta(cfg, seed=15)
    got = run_backend(step_fn_for(backend), cfg, theta, p0, grads)
    assert_parity(got, run_reference(cfg, theta, p0, grads), p0, len(grads))


def test_torch_backend_chunking_does_not_change_results():
    cfg, p0, grads = case((40, 30, 3), steps=5, cfg="mulo", seed=16)
    theta = random_theta(cfg, seed=17)
    whole = run_backend(torch_backend.small_fc_step_, cfg, theta, p0, grads)
    tiny = run_backend(torch_backend.small_fc_step_, cfg, theta, p0, grads, chunk_elements=7)
    assert_parity(tiny, whole, p0, len(grads))


def test_cpp_is_bitwise_reproducible_and_thread_count_independent():
    fn = cpp_step_fn()
    cfg, p0, grads = case((300, 229), steps=4, cfg="mulo", seed=18)  # several reduction tiles
    theta = random_theta(cfg, seed=19)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_backend(fn, cfg, theta, p0, grads)
        torch.set_num_threads(max(2, threads))
        many = run_backend(fn, cfg, theta, p0, grads)
        again = run_backend(fn, cfg, theta, p0, grads)
    finally:
        torch.set_num_threads(threads)
    for a, b in ((one, many), (many, again)):
        assert torch.equal(a[0], b[0])
        assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(), (33,), (20, 12), (6, 4, 3, 3)], ids=str)
def test_low_precision_params_with_fp32_state(backend, dtype, shape):
    cfg, p0, grads = case(shape, steps=8, cfg="mulo", seed=20, scale=1.0)
    theta = random_theta(cfg, seed=21)
    p0 = p0.to(dtype)
    p, state = run_backend(step_fn_for(backend), cfg, theta, p0, grads)
    p_ref, state_ref = run_reference(cfg, theta, p0, grads)
    assert p.dtype == dtype and all(v.dtype == torch.float32 for v in state.values())
    # The step is fp32 math; the result differs at most where rounding to the low-precision
    # dtype flips, i.e. by one of its ulps.
    ulp = torch.finfo(dtype).eps * p_ref.float().abs().clamp_min(1e-3)
    assert ((p.float() - p_ref.float()).abs() <= ulp).all()
    for key, ref in state_ref.items():
        torch.testing.assert_close(state[key], ref, rtol=RTOL, atol=RTOL * ref.abs().max())


def test_fp16_feature_sums_do_not_overflow(backend):
    """Trap T3: rsqrt features reach ~1e3, squares ~1e6 > fp16 max; sums must stay fp32."""
    cfg = lopt.MULO
    theta = random_theta(cfg, seed=22)
    p0 = torch.randn(4096).half()
    grads = [1e-4 * torch.randn(4096) for _ in range(3)]
    p, _ = run_backend(step_fn_for(backend), cfg, theta, p0, grads)
    p_ref, _ = run_reference(cfg, theta, p0, grads)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.float(), p_ref.float(), rtol=1e-3, atol=1e-3)


def test_empty_tensor_is_a_no_op(backend):
    cfg = lopt.ORIGINAL
    p0 = torch.zeros(0, 5)
    p, state = run_backend(step_fn_for(backend), cfg, random_theta(cfg), p0, [torch.zeros(0, 5)])
    assert p.shape == (0, 5)


_ISA_CHECK = """
import sys, torch
from lopt.kernels import ops
from tests.test_kernels_parity import (CONFIGS, assert_parity, case, random_theta, run_backend,
                                       run_reference)
assert ops.load_cpp().ok
print(torch.ops.lozoo.cpu_isa())
for cfg_name in ("original", "mulo_last", "h5_l3"):
    for shape in [(), (7,), (70, 130), (5, 3, 5), (16, 16, 3, 3), (2, 3, 4, 5, 6)]:
        cfg, p0, grads = case(shape, steps=10, cfg=cfg_name)
        theta = random_theta(cfg, seed=3)
        got = run_backend(ops.step_op(), cfg, theta, p0, grads)
        assert_parity(got, run_reference(cfg, theta, p0, grads), p0, len(grads))
"""


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_narrower_instruction_set_paths_match_core(isa):
    """The CPU kernel picks AVX-512 / AVX2 / baseline code at run time; test the others too."""
    cpp_step_fn()
    env = dict(os.environ, LOZOO_CPU_ISA=isa)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _ISA_CHECK], cwd=root, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    used = proc.stdout.split()[0]
    if used != isa:
        pytest.skip(f"this CPU cannot run the {isa} path (got {used})")
