"""The non-finite gradient policy (lopt.nonfinite) for every registered architecture and backend.

Before it, one NaN in one gradient element of a small_fc_lopt tensor turned all of that tensor
(and its m, v, r, c state) into NaN for good. Now a tensor whose gradient holds NaN or ±inf is
skipped for that step, bit for bit, while every other tensor steps exactly as if that tensor had
no gradient; the skip is counted and warned about once, or raises with ``nonfinite="raise"``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.utils._pytree import tree_map

import lopt
from lopt.kernels import ops
from metatrain.unroll import TaskLanes

BAD_VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
RANK_SHAPES = {0: (), 1: (7,), 2: (4, 5), 3: (3, 4, 5), 4: (2, 3, 4, 3)}


def backend_device(backend: str) -> torch.device:
    if backend == "cuda":
        if ops.cuda_unavailable_reason() is not None:
            pytest.skip(f"cuda backend: {ops.cuda_unavailable_reason()}")
        return torch.device("cuda")
    if backend == "cpp" and not ops.load_cpp().ok:
        pytest.skip("the C++ kernel is not built (python -m lopt.kernels build)")
    return torch.device("cpu")


def shell_backends(arch: lopt.Architecture) -> list[str]:
    """Every backend name the architecture's shell knows (those it cannot run here skip)."""
    names = []
    for backend in ("torch", "cpp", "cuda"):
        try:
            arch.optimizer.check_backend(backend)
        except ValueError:
            continue  # not a backend of this shell
        except RuntimeError:
            pass  # a backend of this shell, not runnable here: skipped in the test
        names.append(backend)
    return names


CASES = [
    (name, backend)
    for name in lopt.architecture_names()
    for backend in shell_backends(lopt.get_architecture(name))
]


def make_optimizer(name: str, backend: str, params, **kwargs):
    arch = lopt.get_architecture(name)
    cfg = arch.preset()
    theta = arch.init_theta(cfg, torch.Generator().manual_seed(0))
    return arch.optimizer(params, theta, cfg, backend=backend, num_steps=100, **kwargs)


def snapshot(opt, params) -> list[dict[str, torch.Tensor]]:
    return [
        {"param": p.detach().clone(), **{k: v.clone() for k, v in opt.state[p].items()}}
        for p in params
    ]


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key}"


def loss_closure():
    return torch.tensor(0.5)


# each rank meets one kind of bad value (NaN, +inf, -inf in turn), so every kind meets
# several ranks without the full product
RANK_BAD = [(rank, list(BAD_VALUES)[rank % len(BAD_VALUES)]) for rank in RANK_SHAPES]


@pytest.mark.parametrize("rank,bad", RANK_BAD)
@pytest.mark.parametrize("name,backend", CASES)
def test_a_non_finite_gradient_skips_only_its_tensor(name, backend, rank, bad):
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(rank)
    shapes = [RANK_SHAPES[rank], (6, 3), (5,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    opt = make_optimizer(name, backend, params)
    for p in params:  # one clean step first: the state is not all zeros any more
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    opt.step(loss_closure)
    grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
    grads[0].view(-1)[grads[0].numel() // 2] = BAD_VALUES[bad]
    for p, g in zip(params, grads):
        p.grad = g

    # what the step must do: exactly the step in which the bad tensor has no gradient
    reference = copy.deepcopy((opt, params))
    ref_opt, ref_params = reference
    ref_params[0].grad = None
    for p, g in zip(ref_params[1:], grads[1:]):
        p.grad = g.clone()
    ref_opt.step(loss_closure)

    before = snapshot(opt, params)
    with pytest.warns(RuntimeWarning, match=r"non-finite gradient \(NaN or inf\) for parameter 0"):
        opt.step(loss_closure)
    assert opt.nonfinite_skips == 1
    assert_same(snapshot(opt, params)[0], before[0], "the skipped tensor and its state")
    for i in (1, 2):
        assert_same(snapshot(opt, params)[i], snapshot(ref_opt, ref_params)[i], f"tensor {i}")
        assert not torch.equal(params[i], before[i]["param"]), "the other tensors still step"
    assert all(torch.isfinite(v).all() for s in snapshot(opt, params) for v in s.values())

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per optimizer, not every step
        opt.step(loss_closure)
    assert opt.nonfinite_skips == 2


@pytest.mark.parametrize("name,backend", CASES)
def test_raise_policy_raises_before_anything_changes(name, backend):
    device = backend_device(backend)
    params = [torch.nn.Parameter(torch.randn(s).to(device)) for s in [(4, 5), (3,)]]
    # two param groups: the bad gradient is in the second, the first must not step either
    opt = make_optimizer(name, backend, [{"params": params[:1]}, {"params": params[1:]}],
                         nonfinite="raise")  # fmt: skip
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step(loss_closure)
    params[0].grad = torch.randn(4, 5).to(device)
    params[1].grad = torch.tensor([1.0, float("inf"), 0.0]).to(device)
    before = snapshot(opt, params)
    with pytest.raises(lopt.NonFiniteGradientError, match=r"parameter 1 \(shape \(3,\)\)"):
        opt.step(loss_closure)
    for a, b in zip(snapshot(opt, params), before):
        assert_same(a, b, "raise must leave everything as it was")


def test_the_reported_case_small_fc_lopt_default_optimizer():
    # issue 16, item 1, verbatim: 20/20 elements became NaN, the state poisoned, no warning
    p = torch.nn.Parameter(torch.randn(4, 5))
    opt = lopt.SmallFCLOpt([p])
    g = torch.randn(4, 5)
    g[0, 0] = float("nan")
    p.grad = g
    before = p.detach().clone()
    with pytest.warns(RuntimeWarning, match="update was skipped"):
        opt.step()
    assert torch.equal(p, before) and opt.nonfinite_skips == 1
    p.grad = torch.randn(4, 5)
    opt.step()
    assert torch.isfinite(p).all() and not torch.equal(p, before)
    assert all(torch.isfinite(v).all() for v in opt.state[p].values())


def test_nonfinite_policy_is_validated_and_survives_pickling():
    import pickle

    with pytest.raises(ValueError, match="Invalid nonfinite policy 'ignore'; valid: 'skip'"):
        lopt.SmallFCLOpt([torch.nn.Parameter(torch.randn(2))], nonfinite="ignore")
    opt = lopt.SmallFCLOpt([torch.nn.Parameter(torch.randn(2))], nonfinite="raise")
    assert pickle.loads(pickle.dumps(opt))._nonfinite.policy == "raise"


# ------------------------------------------------------------------------------ functional guard
@pytest.mark.parametrize("name", lopt.architecture_names())
def test_guarded_update_under_vmap_skips_only_the_bad_lane_tensor(name):
    arch = lopt.get_architecture(name)
    cfg = arch.preset()
    lanes = 3
    thetas = torch.stack(
        [
            lopt.flatten_theta(arch.init_theta(cfg, torch.Generator().manual_seed(i)), cfg)
            for i in range(lanes)
        ]
    )
    gen = torch.Generator().manual_seed(1)
    shapes = {"w": (4, 5), "b": (5,), "s": ()}
    params = {k: torch.randn((lanes, *s), generator=gen) for k, s in shapes.items()}
    grads = {k: torch.randn((lanes, *s), generator=gen) for k, s in shapes.items()}
    one = {k: v[0] for k, v in params.items()}
    state0 = arch.init_state(one, cfg)
    state = tree_map(lambda v: v.expand(lanes, *v.shape).clone(), state0)  # every state key
    grads["w"][1, 2, 3] = float("nan")  # lane 1, tensor w only

    inputs = {"num_steps": 100, "loss": torch.tensor(0.5)}  # for architectures that use them

    def plain(theta_flat, st, p, g):
        return arch.update(lopt.unflatten_theta(theta_flat, cfg), st, p, g, cfg, **inputs)

    def guarded(theta_flat, st, p, g):
        return lopt.guarded_update(arch.update)(
            lopt.unflatten_theta(theta_flat, cfg), st, p, g, cfg, **inputs
        )

    new_p, new_s, skipped = torch.func.vmap(guarded)(thetas, state, params, grads)
    ref_p, ref_s = torch.func.vmap(plain)(thetas, state, params, grads)
    assert skipped.tolist() == [0, 1, 0]
    assert torch.equal(new_p["w"][1], params["w"][1])
    for key, value in new_s["tensors"]["w"].items():
        assert torch.equal(value[1], state["tensors"]["w"][key][1]), key
    for k in shapes:  # clean lanes: exactly the unguarded update
        for lane in (0, 2):
            assert torch.equal(new_p[k][lane], ref_p[k][lane]), (k, lane)
    assert all(torch.isfinite(v).all() for v in new_p.values())
    assert not torch.isfinite(ref_p["w"][1]).all(), "without the guard the NaN spreads"


def test_guarded_update_is_differentiable_in_theta_with_a_nan_gradient():
    cfg = lopt.ORIGINAL
    theta = {k: v.requires_grad_() for k, v in lopt.init_theta(cfg).items()}
    params = {"w": torch.randn(4, 5), "b": torch.randn(5)}
    grads = {"w": torch.randn(4, 5), "b": torch.full((5,), float("nan"))}
    state = lopt.init_state(params, cfg)
    new_p, _, skipped = lopt.guarded_update(lopt.update)(theta, state, params, grads, cfg)
    total = sum(v.sum() for v in new_p.values())
    total.backward()
    assert int(skipped) == 1
    assert all(torch.isfinite(v.grad).all() for v in theta.values())


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_meta_trainer_inner_step_skips_a_lane_with_a_nan_gradient(backend):
    import tasks

    backend_device(backend)
    family = tasks.get_family("quadratic")
    gen = torch.Generator().manual_seed(0)
    static = family.sample_static(gen)
    problem = TaskLanes(
        family.make_task(static), family, static, lopt.ORIGINAL, 4, 0, lopt_backend=backend
    )
    state = problem.fresh(4, torch.Generator().manual_seed(1))
    theta = lopt.flatten_theta(lopt.init_theta(lopt.ORIGINAL), lopt.ORIGINAL)
    thetas = theta.expand(4, -1).clone()
    poisoned = copy.deepcopy(state)
    name = next(iter(poisoned["params"]))
    poisoned["params"][name][2].view(-1)[0] = float("nan")  # lane 2's gradient goes non-finite
    before = copy.deepcopy(poisoned)  # the cpp path steps the lane state in place
    batch = problem.next_batch()
    clean, _ = problem.step(thetas, state, batch)
    assert problem.take_nonfinite_skips() == 0
    out, _ = problem.step(thetas, poisoned, batch)
    assert problem.take_nonfinite_skips() >= 1
    for k in out["params"]:
        skipped = out["params"][k][2], before["params"][k][2]  # bit for bit, its NaN included
        assert torch.allclose(*skipped, rtol=0, atol=0, equal_nan=True), k
        for lane in (0, 1, 3):  # the other lanes are untouched by lane 2's NaN
            assert torch.equal(out["params"][k][lane], clean["params"][k][lane]), (k, lane)
    for k, st in out["opt_state"]["tensors"].items():
        for key, value in st.items():
            assert torch.isfinite(value[[0, 1, 3]]).all(), (k, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_multi_tensor_finiteness_check_agrees_with_the_per_tensor_one(dtype):
    """CUDA takes the multi-tensor form; both run here, on the same tensors."""
    from lopt.nonfinite import _finite_multi_tensor, _finite_per_tensor

    big = torch.finfo(dtype).max
    grads = [
        torch.full((4096,), big, dtype=dtype),  # finite; its L1 norm would overflow
        torch.randn(3, 5).to(dtype),
        torch.tensor([1.0, float("nan")]).to(dtype),
        torch.tensor([[float("-inf")]]).to(dtype),
        torch.tensor(float("inf")).to(dtype),
        torch.tensor(-0.0).to(dtype),
    ]
    want = [True, True, False, False, False, True]
    assert _finite_per_tensor(grads).tolist() == want
    assert _finite_multi_tensor(grads).tolist() == want
