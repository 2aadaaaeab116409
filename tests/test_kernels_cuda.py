"""CUDA kernel parity with the core (run on a machine with a GPU: benchmarks/gpu_check.sh).

Skipped where torch sees no CUDA device. Where it does, the compiled CUDA kernel must build and
load: a build failure fails these tests instead of skipping them.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lopt
from lopt.kernels import ops, torch_backend

from .test_kernels_ops import JIT_DEPRECATION, make_args
from .test_kernels_parity import (
    SHAPES,
    assert_parity,
    case,
    random_theta,
    run_backend,
    run_reference,
)
from .test_optimizer import batch, make_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEV = torch.device("cuda")


@pytest.fixture(scope="module")
def cuda_op():
    reason = ops.cuda_unavailable_reason()
    assert reason is None, f"a CUDA device is visible but the CUDA kernel is unusable: {reason}"
    return ops.step_op()


def on_cuda(cfg_name, shape, steps=10, seed=0, scale=0.1):
    cfg, p0, grads = case(shape, steps=steps, cfg=cfg_name, seed=seed, scale=scale)
    return cfg, p0.to(DEV), [g.to(DEV) for g in grads]


@pytest.mark.parametrize("cfg_name", ["original", "mulo", "original_last", "mulo_last"])
@pytest.mark.parametrize("shape", SHAPES + [(768, 3, 16, 16)], ids=str)
def test_cuda_trajectories_match_core(cuda_op, cfg_name, shape):
    cfg, p0, grads = on_cuda(cfg_name, shape)
    theta = random_theta(cfg, seed=3)
    got = run_backend(cuda_op, cfg, theta, p0, grads)
    assert_parity(got, run_reference(cfg, theta, p0, grads), p0, len(grads))


@pytest.mark.parametrize("cfg_name", ["original", "mulo", "h5_l3"])
@pytest.mark.parametrize("shape", [(256, 64), (64, 256), (12, 40, 3, 3)], ids=str)
def test_cuda_t1_non_uniform_scales_over_60_steps(cuda_op, cfg_name, shape):
    cfg, p0, grads = on_cuda(cfg_name, shape, steps=60, seed=10)
    theta = random_theta(cfg, seed=11)
    got = run_backend(cuda_op, cfg, theta, p0, grads)
    assert_parity(got, run_reference(cfg, theta, p0, grads), p0, len(grads))


@pytest.mark.parametrize("hidden", [8, 16, 64, 7])  # exact-width kernels and the generic one
def test_cuda_other_widths(cuda_op, hidden):
    cfg = lopt.SmallFCConfig(hidden_size=hidden)
    theta = random_theta(cfg, seed=4)
    _, p0, grads = on_cuda("original", (48, 20, 3), seed=5)
    got = run_backend(cuda_op, cfg, theta, p0, grads)
    assert_parity(got, run_reference(cfg, theta, p0, grads), p0, len(grads))


@pytest.mark.parametrize("lr,wd,maximize", [(0.3, 0.1, False), (1.0, 0.0, True)], ids=str)
def test_cuda_lr_weight_decay_maximize(cuda_op, lr, wd, maximize):
    cfg, p0, grads = on_cuda("mulo", (33, 17, 5), seed=6)
    theta = random_theta(cfg, seed=7)
    kw = {"lr": lr, "wd": wd, "maximize": maximize}
    got = run_backend(cuda_op, cfg, theta, p0, grads, **kw)
    assert_parity(got, run_reference(cfg, theta, p0, grads, **kw), p0, len(grads))


def test_cuda_large_tensor_uses_many_blocks(cuda_op):
    cfg, p0, grads = on_cuda("mulo", (2304, 3072), steps=3, seed=8)  # > 2048 blocks of 256
    theta = random_theta(cfg, seed=9)
    got = run_backend(cuda_op, cfg, theta, p0, grads)
    assert_parity(got, run_reference(cfg, theta, p0, grads), p0, len(grads))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(), (33,), (20, 12), (6, 4, 3, 3)], ids=str)
def test_cuda_low_precision_params(cuda_op, dtype, shape):
    cfg, p0, grads = on_cuda("mulo", shape, steps=8, seed=20, scale=1.0)
    theta = random_theta(cfg, seed=21)
    p0 = p0.to(dtype)
    p, state = run_backend(cuda_op, cfg, theta, p0, grads)
    p_ref, state_ref = run_reference(cfg, theta, p0, grads)
    ulp = torch.finfo(dtype).eps * p_ref.float().abs().clamp_min(1e-3)
    assert ((p.float() - p_ref.float()).abs() <= ulp).all()
    for key, ref in state_ref.items():
        torch.testing.assert_close(state[key], ref, rtol=1e-5, atol=1e-5 * ref.abs().max())


def test_cuda_matches_the_torch_twin_and_is_bitwise_reproducible(cuda_op):
    cfg, p0, grads = on_cuda("mulo", (300, 229), steps=4, seed=18)
    theta = random_theta(cfg, seed=19)
    a = run_backend(cuda_op, cfg, theta, p0, grads)
    b = run_backend(cuda_op, cfg, theta, p0, grads)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    twin = run_backend(torch_backend.small_fc_step_, cfg, theta, p0, grads)
    assert_parity(a, twin, p0, len(grads))


@pytest.mark.filterwarnings(JIT_DEPRECATION)
@pytest.mark.parametrize("shape,dtype", [((6, 9), torch.float32), ((7,), torch.bfloat16)])
def test_cuda_opcheck(cuda_op, shape, dtype):
    args = make_args(shape, lopt.MULO, dtype)
    moved = tuple(
        x.to(DEV) if isinstance(x, torch.Tensor)
        else [t.to(DEV) for t in x] if isinstance(x, list) else x
        for x in args
    )  # fmt: skip
    torch.library.opcheck(cuda_op, moved)


def test_cuda_rejects_mixed_devices(cuda_op):
    args = list(make_args((6, 9)))
    args[0], args[1] = args[0].to(DEV), args[1].to(DEV)
    with pytest.raises(RuntimeError, match="m is on cpu but param is on cuda:0"):
        cuda_op(*args)


def test_cuda_backend_in_the_optimizer_matches_torch(cuda_op):
    start = make_model().to(DEV)
    runs = {}
    for backend in ("cuda", "torch"):
        model = copy.deepcopy(start)
        cfg = lopt.MULO
        opt = lopt.SmallFCLOpt(model.parameters(), random_theta(cfg, seed=1), cfg, backend=backend)
        for i in range(4):
            x, y = (t.to(DEV) for t in batch(i))
            opt.zero_grad()
            (model(x) * model.temperature - y).square().mean().backward()
            opt.step()
        runs[backend] = model
    for a, b, s in zip(runs["cuda"].parameters(), runs["torch"].parameters(), start.parameters()):
        travelled = (b - s).abs().max()
        assert (a - b).abs().max() <= 1e-5 * travelled + 4e-7 * b.abs().max()
