"""Lane-batched small_fc_lopt updates: ``lozoo::small_fc_lanes_step_``, its pure-torch twin and
the :class:`lopt.kernels.lanes.LaneUpdate` seam, against the vmapped functional core."""

from __future__ import annotations

import copy

import pytest
import torch

import lopt
from lopt import core
from lopt.kernels import lanes as kernel_lanes
from lopt.kernels import ops, torch_backend

from .test_kernels_ops import JIT_DEPRECATION, _to_meta
from .test_kernels_parity import cpp_step_fn
from .test_lopt_core import random_theta

LANES = 3
# Every rank, and the tie cases of the factored-dims rule (two largest dims equal).
SHAPES = {
    "scalar": (),
    "vector": (7,),
    "matrix": (6, 9),
    "tie2": (5, 5),
    "rank3": (2, 3, 4),
    "rank3_tie": (4, 2, 4),
    "conv_tie": (4, 4, 3, 3),
    "unit_axis": (1, 6),
}


def lane_thetas(cfg, lanes=LANES) -> torch.Tensor:
    return torch.stack([lopt.flatten_theta(random_theta(cfg, seed=s), cfg) for s in range(lanes)])


def lane_problem(cfg, lanes=LANES, seed=0):
    """Lane-stacked params, grads and a state whose lanes have different counters and moments."""
    gen = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(lanes, *s, generator=gen) for k, s in SHAPES.items()}
    grads = {k: torch.randn(lanes, *s, generator=gen) for k, s in SHAPES.items()}
    one = lopt.init_state({k: v[0] for k, v in params.items()}, cfg)
    tensors = {
        name: {k: 0.01 * torch.rand(lanes, *v.shape, generator=gen) for k, v in st.items()}
        for name, st in one["tensors"].items()
    }
    t = torch.tensor([0.0, 5.0, 3000.0, 17.0, 1.0][:lanes])
    return params, grads, {"t": t, "tensors": tensors}


def run(update, cfg, steps=2, lanes=LANES):
    params, grads, state = lane_problem(cfg, lanes)
    thetas = lane_thetas(cfg, lanes)
    for _ in range(steps):
        update.apply_(update.prepare(thetas, cfg), state, params, grads, cfg)
    return params, state


@pytest.fixture(scope="module")
def reference():
    """The vmapped functional core (the meta-trainer's reference math), per config."""
    cache = {}

    def get(cfg):
        key = cfg.to_json() if hasattr(cfg, "to_json") else repr(cfg)
        if key not in cache:
            update = kernel_lanes.vmapped_lane_update(lopt.update, lopt.unflatten_theta)
            cache[key] = run(update, cfg)
        return cache[key]

    return get


CONFIGS = {
    "original": lopt.ORIGINAL,
    "mulo": lopt.MULO,
    "original_tie_last": lopt.SmallFCConfig(tie_break="last"),
}


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_lane_update_matches_the_vmapped_core(cfg, backend, reference):
    if backend == "cpp":
        cpp_step_fn()
    update = {"cpp": kernel_lanes.SMALL_FC_LANES, "torch": kernel_lanes.SMALL_FC_LANES_TORCH}[
        backend
    ]
    params, state = run(update, cfg)
    ref_params, ref_state = reference(cfg)
    start, _, _ = lane_problem(cfg)
    for name, ref in ref_params.items():
        moved = (ref - start[name]).abs().amax(dim=tuple(range(1, ref.dim())) or None)
        assert (moved > 0).all(), name
        err = (params[name] - ref).abs().amax(dim=tuple(range(1, ref.dim())) or None)
        assert (err <= 1e-5 * moved + 1e-7).all(), (name, err, moved)
        for key, value in ref_state["tensors"][name].items():
            torch.testing.assert_close(
                state["tensors"][name][key], value, rtol=1e-5, atol=1e-7, msg=f"{name}.{key}"
            )
    assert torch.equal(state["t"], ref_state["t"])
    assert torch.equal(state["t"], torch.tensor([2.0, 7.0, 3002.0]))


@pytest.mark.parametrize("name", SHAPES)
def test_cpp_lanes_op_is_bit_identical_to_the_per_lane_op(name):
    """Lane i of one batched call == the single-tensor op on lane i's slices, bit for bit."""
    step = cpp_step_fn()
    cfg = lopt.MULO
    params, grads, state = lane_problem(cfg)
    decays, layers = kernel_lanes.SMALL_FC_LANES.prepare(lane_thetas(cfg), cfg)
    p, g, st = params[name], grads[name], state["tensors"][name]
    shape = tuple(p.shape[1:]) or (1,)
    d1, d0 = core.factored_dims(shape, cfg.tie_break) or (-1, -1)
    single = copy.deepcopy((p, st))
    for lane in range(LANES):
        sp, sst = single[0][lane], {k: v[lane] for k, v in single[1].items()}
        step(
            sp, g[lane], sst["m"], sst["v"], sst.get("r"), sst.get("c"), sst.get("vd"),
            decays[lane], [w[lane] for w in layers], d1, d0, float(state["t"][lane]), 0.5, 0.1,
            cfg.step_mult, cfg.exp_mult, True,
        )  # fmt: skip
    ops.lanes_step_op()(
        p, g, st["m"], st["v"], st.get("r"), st.get("c"), st.get("vd"), decays, layers, d1, d0,
        state["t"], 0.5, 0.1, cfg.step_mult, cfg.exp_mult, True,
    )  # fmt: skip
    assert torch.equal(p, single[0])
    for key in st:
        assert torch.equal(st[key], single[1][key]), key


def test_one_lane_and_many_threads_agree_bit_for_bit():
    """Lanes spread over threads compute what one thread computes."""
    cpp_step_fn()
    threads = torch.get_num_threads()
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            results.append(run(kernel_lanes.SMALL_FC_LANES, lopt.ORIGINAL, lanes=5))
        finally:
            torch.set_num_threads(threads)
    for name in SHAPES:
        assert torch.equal(results[0][0][name], results[1][0][name]), name


def test_pure_update_lanes_leaves_its_inputs_alone():
    cpp_step_fn()
    cfg = lopt.ORIGINAL
    params, grads, state = lane_problem(cfg)
    before = copy.deepcopy((params, state))
    new_params, new_state = kernel_lanes.update_lanes(lane_thetas(cfg), state, params, grads, cfg)
    for name in SHAPES:
        assert torch.equal(params[name], before[0][name])
        assert not torch.equal(new_params[name], params[name])
    assert torch.equal(state["t"], before[1]["t"])
    assert torch.equal(new_state["t"], before[1]["t"] + 1)


def test_small_fc_registers_its_lane_kernel_and_other_forms_are_adapted():
    assert lopt.get_architecture("small_fc_lopt").lanes_update is kernel_lanes.SMALL_FC_LANES
    assert kernel_lanes.as_lane_update(kernel_lanes.SMALL_FC_LANES) is kernel_lanes.SMALL_FC_LANES
    # the pure form (theta_lanes, state, params, grads, cfg) -> (params, state) is written back
    cpp_step_fn()
    wrapped = kernel_lanes.as_lane_update(kernel_lanes.update_lanes)
    params, state = run(wrapped, lopt.ORIGINAL)
    ref_params, ref_state = run(kernel_lanes.SMALL_FC_LANES, lopt.ORIGINAL)
    for name in SHAPES:
        assert torch.equal(params[name], ref_params[name]), name
    assert torch.equal(state["t"], ref_state["t"])
    with pytest.raises(TypeError, match="lanes_update must be a lopt.kernels.lanes.LaneUpdate"):
        kernel_lanes.as_lane_update(3)


# -- the op's contract: schema, opcheck, bad inputs on every implementation ----------------------
def lanes_args(shape=(6, 9), lanes=2, cfg=lopt.ORIGINAL, **over):
    p = torch.randn(lanes, *shape)
    one = core.init_tensor_state(p[0], cfg)
    st = {k: torch.zeros(lanes, *v.shape) for k, v in one.items()}
    decays, layers = kernel_lanes.SMALL_FC_LANES.prepare(lane_thetas(cfg, lanes), cfg)
    d1, d0 = core.factored_dims(tuple(shape) or (1,), cfg.tie_break) or (-1, -1)
    args = {
        "param": p, "grad": torch.randn(lanes, *shape), "m": st["m"], "v": st["v"],
        "r": st.get("r"), "c": st.get("c"), "vd": st.get("vd"), "decays": decays,
        "layers": layers, "d1": d1, "d0": d0, "t": torch.arange(lanes, dtype=torch.float32),
        "lr": 0.5, "weight_decay": 0.1, "step_mult": cfg.step_mult, "exp_mult": cfg.exp_mult,
        "maximize": False,
    }  # fmt: skip
    args.update(over)
    return tuple(args.values())


def test_registered_lanes_schema_is_the_documented_one():
    cpp_step_fn()
    assert str(ops.lanes_step_op()._schema) == ops.LANES_SCHEMA


@pytest.mark.parametrize("shape", [(), (7,), (4, 4, 3, 3)], ids=str)
@pytest.mark.filterwarnings(JIT_DEPRECATION)
def test_lanes_opcheck(shape):
    cpp_step_fn()
    torch.library.opcheck(ops.lanes_step_op(), lanes_args(shape))


@pytest.fixture(params=["cpp", "torch", "fake"])
def lanes_call(request):
    cpp_step_fn()
    if request.param == "cpp":
        return ops.lanes_step_op()
    if request.param == "torch":
        return torch_backend.small_fc_lanes_step_
    return lambda *args: ops.lanes_step_op()(*_to_meta(args))


BAD_LANE_INPUTS = {
    "zero_dim_param": (
        lambda: lanes_args(param=torch.zeros(())),
        "param needs a leading lane axis, got a 0-d tensor",
    ),
    "grad_lanes": (
        lambda: lanes_args(grad=torch.zeros(3, 6, 9)),
        r"grad must have param's 2 lanes on its leading axis, got shape \(3, 6, 9\)",
    ),
    "m_lanes": (
        lambda: lanes_args(m=torch.zeros(1, 6, 9, 3)),
        r"m must have param's 2 lanes on its leading axis, got shape \(1, 6, 9, 3\)",
    ),
    "decays_lanes": (
        lambda: lanes_args(decays=torch.zeros(7)),
        r"decays must have param's 2 lanes on its leading axis, got shape \(7,\)",
    ),
    "noncontiguous_param": (
        lambda: lanes_args(param=torch.zeros(9, 2, 6).permute(1, 2, 0)),
        "param must be contiguous",
    ),
    "t_shape": (
        lambda: lanes_args(t=torch.zeros(())),
        r"t must be a contiguous float32 tensor of shape \(2,\) on param's device \(one step "
        r"counter per lane\), got Float of shape \(\)",
    ),
    "t_dtype": (
        lambda: lanes_args(t=torch.zeros(2, dtype=torch.float64)),
        r"t must be a contiguous float32 tensor of shape \(2,\)",
    ),
    "lane_shape": (
        lambda: lanes_args(r=torch.zeros(2, 9, 3)),
        r"per lane: lozoo::small_fc_step_: r has shape \(9, 3\) but a param of shape \(6, 9\) "
        r"needs \(6, 3\)",
    ),
}


@pytest.mark.parametrize("case", BAD_LANE_INPUTS)
def test_bad_lane_inputs_are_rejected_with_the_same_message(lanes_call, case):
    make, message = BAD_LANE_INPUTS[case]
    with pytest.raises(RuntimeError, match="lozoo::small_fc_lanes_step_: " + message):
        lanes_call(*make())
