"""VeLO's functional core against a float64 per-element oracle written from the description."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lopt import velo
from lopt.velo import core
from zoo.pylo_velo import theta_from_pylo, velo_config

from .naive_velo import factored_axes
from .naive_velo import new_state as naive_new_state
from .naive_velo import step as naive_step
from .pylo_layouts import velo_mlp_state, velo_rnn_state

# ranks 0-5, ties on rank 2, 3 and 4 (incl. the 4-D tie on the first two axes)
SHAPES = {
    "w": (20, 10),
    "b": (20,),
    "square": (16, 16),
    "conv_tied": (8, 8, 3, 3),
    "conv": (4, 3, 5, 5),
    "r3": (6, 4, 5),
    "cube": (4, 4, 4),
    "r4_tied": (3, 5, 5, 3),
    "scalar": (),
    "r5": (2, 3, 2, 2, 2),
    "frozen": (5, 3),
}
NUM_STEPS = 50


def pylo_weights(seed=0):
    return velo_rnn_state(seed), velo_mlp_state(seed + 1)


def as64(tree):
    if isinstance(tree, torch.Tensor):
        return tree.double()
    return {k: as64(v) for k, v in tree.items()}


def problem(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in SHAPES.items()}

    def grads(t):
        g = torch.Generator().manual_seed(100 + t)
        out = {}
        for k, s in SHAPES.items():
            # strongly non-uniform magnitudes, so the row/column factors matter
            scale = (3 * torch.rand(s, generator=g, dtype=dtype)) ** 2
            out[k] = None if k == "frozen" else torch.randn(s, generator=g, dtype=dtype) * scale
        return out

    def loss(t):
        # a spike at t = 2 exercises the loss clip (2·|max debiased mean|)
        return 40.0 if t == 2 else 3 * 0.9**t + 0.1 * math.sin(t)

    return params, grads, loss


@pytest.mark.parametrize("tie_break", ["first", "pylo"])
def test_core_matches_float64_oracle(tie_break):
    rnn, mlp = pylo_weights()
    cfg = velo.VeLOConfig(tie_break=tie_break)
    assert velo_config(rnn, mlp) == velo.VELO
    theta = as64(theta_from_pylo(rnn, mlp, cfg))
    params, grads, loss = problem(dtype=torch.float64)
    state = as64(velo.init_state(params, cfg))
    naive_params = {k: v.numpy().copy() for k, v in params.items()}
    naive_st = naive_new_state(SHAPES, tie_break, rnn)
    rnn_np = {k: v.double().numpy() for k, v in rnn.items()}
    mlp_np = {k: v.double().numpy() for k, v in mlp.items()}
    for t in range(4):
        g = grads(t)
        new, state = velo.update(
            theta, state, params, g, cfg, loss=loss(t), num_steps=NUM_STEPS, weight_decay=0.01
        )
        g_np = {k: (None if v is None else v.numpy()) for k, v in g.items()}
        want = naive_step(
            naive_params, g_np, naive_st, rnn_np, mlp_np, loss(t), NUM_STEPS, tie_break, wd=0.01
        )
        for k in SHAPES:
            got_step = (params[k] - new[k]).numpy()
            want_step = naive_params[k] - want[k]
            assert got_step.shape == SHAPES[k]
            scale = max(np.abs(want_step).max(), 1e-300)
            err = np.abs(got_step - want_step).max() / scale
            assert err < 1e-9, f"step {t}, tensor {k}: relative error {err:.2e}"
        assert torch.equal(new["frozen"], params["frozen"])
        params, naive_params = new, want
    assert state["t"].item() == 4
    assert state["tensors"]["frozen"]["updates"].item() == 0
    assert state["tensors"]["w"]["updates"].item() == 4


def test_float32_core_tracks_the_float64_oracle():
    rnn, mlp = pylo_weights(seed=3)
    cfg = velo.VELO
    theta = theta_from_pylo(rnn, mlp, cfg)
    params, grads, loss = problem(seed=1)
    state = velo.init_state(params, cfg)
    naive_st = naive_new_state(SHAPES, "first", rnn)
    rnn_np = {k: v.double().numpy() for k, v in rnn.items()}
    mlp_np = {k: v.double().numpy() for k, v in mlp.items()}
    worst = 0.0
    for t in range(3):
        g = grads(t)
        # compare the steps themselves: p ± step in float32 would round away ~1e-2 of a step
        steps, state = core.compute_steps(
            theta, state, params, g, cfg, loss=loss(t), num_steps=NUM_STEPS
        )
        naive_params = {k: v.double().numpy() for k, v in params.items()}
        g_np = {k: (None if v is None else v.double().numpy()) for k, v in g.items()}
        want = naive_step(naive_params, g_np, naive_st, rnn_np, mlp_np, loss(t), NUM_STEPS)
        for k in steps:
            want_step = naive_params[k] - want[k]
            scale = max(np.abs(want_step).max(), 1e-30)
            worst = max(worst, np.abs(steps[k].double().numpy() - want_step).max() / scale)
        params = {k: (p - steps[k] if k in steps else p) for k, p in params.items()}
    assert worst < 1e-4


# --------------------------------------------------------------------------- factored axes
@pytest.mark.parametrize(
    "shape,expected",
    [
        ((20, 10), (1, 0)),
        ((16, 16), (1, 0)),
        ((8, 8, 3, 3), (0, 1)),
        ((4, 3, 5, 5), (3, 2)),
        ((6, 4, 5), (2, 0)),
        ((3, 5, 5, 3), (2, 1)),
    ],
)
def test_pylo_tie_rule_matches_pylo_examples(shape, expected):
    assert core.factored_dims(shape, "pylo") == expected


def test_first_rule_follows_the_reference_on_tied_conv_weights():
    # (out, in, kh, kw) tied on out/in: the reference (on (kh, kw, in, out)) factors over out
    assert core.factored_dims((8, 8, 3, 3), "first") == (1, 0)
    assert core.factored_dims((4, 4, 4), "first") == (1, 0)
    assert core.factored_dims((4, 4, 4), "pylo") == (2, 1)
    assert core.factored_dims((7,), "pylo") is None
    with pytest.raises(ValueError, match="tie_break must be 'first' or 'pylo', got 'last'"):
        core.factored_dims((3, 3), "last")


def test_oracle_and_core_axis_rules_agree_on_random_shapes():
    rng = np.random.default_rng(0)
    for _ in range(300):
        shape = tuple(int(s) for s in rng.integers(1, 4, size=rng.integers(2, 6)))
        for rule in ("first", "pylo"):
            assert core.factored_dims(shape, rule) == factored_axes(shape, rule), (shape, rule)


# --------------------------------------------------------------------------- unit invariants
def test_loss_decays_for_ten_thousand_steps():
    want = [0.9048374, 0.9546449, 0.9786861, 0.9900498, 0.9953692]
    want += [0.9978479, 0.9990005, 0.9995359, 0.9997846, 0.9999000]
    assert core.loss_decays(10_000).tolist() == pytest.approx(want, abs=1e-7)


def test_lstm_input_of_a_fresh_tensor_at_step_zero():
    cfg = velo.VELO
    p = torch.randn(6, 5)
    st = velo.init_tensor_state(p, cfg)
    loss_state, loss_feats = core.update_loss_state(
        core.init_loss_state(), torch.tensor(2.0), core.loss_decays(100)
    )
    x = core.tensor_inputs(
        p, st["m"], st["v"], core.progress_features(torch.tensor(0.0), 100, p), loss_feats
    )
    fractions = [-0.291313, -0.761594, -0.964028, -0.999329, -0.999988, -1, -1, -1, -1]
    assert x[:9].tolist() == pytest.approx(fractions, abs=1e-6)
    assert x[9:18].tolist() == [0.0] * 9
    assert x[18].item() == pytest.approx(-2.5)
    assert x[19:24].tolist() == [0, 0, 1, 0, 0]
    assert x[24:].tolist() == pytest.approx([-2.5] * 6)


@pytest.mark.parametrize(
    "shape,onehot",
    [((), 0), ((7,), 1), ((1, 7), 1), ((3, 4, 1), 2), ((2, 2, 2, 2), 4), ((2,) * 5, None)],
)
def test_rank_feature_counts_axes_longer_than_one(shape, onehot):
    got = core.rank_features(shape, torch.zeros(())).tolist()
    assert got == [1.0 if i == onehot else 0.0 for i in range(5)]


def test_loss_features_are_zero_for_two_steps_then_move():
    decays = core.loss_decays(100)
    state = core.init_loss_state()
    feats = []
    for loss in (5.0, 4.0, 3.0, 2.5):
        state, f = core.update_loss_state(state, torch.tensor(loss), decays)
        feats.append(f)
    assert feats[0].abs().sum() == 0 and feats[1].abs().sum() == 0
    assert feats[2].abs().sum() > 0


def small_setup(seed=0):
    cfg = velo.VeLOConfig(lstm_hidden_size=16, param_inits=8)
    theta = velo.init_theta(cfg, torch.Generator().manual_seed(seed))
    theta["lstm_init_h"] = torch.randn(16, generator=torch.Generator().manual_seed(seed + 1))
    gen = torch.Generator().manual_seed(seed + 2)
    params = {
        "w": torch.randn(5, 4, generator=gen),
        "b": torch.randn(5, generator=gen),
        "s": torch.randn((), generator=gen),
        "k": torch.randn(3, 2, 2, 2, generator=gen),
    }
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    return cfg, theta, params, grads


def test_permuting_the_tensor_list_permutes_the_steps():
    cfg, theta, params, grads = small_setup()
    state = velo.init_state(params, cfg)
    steps, new_state = core.compute_steps(theta, state, params, grads, cfg, loss=1.0, num_steps=20)
    order = ["k", "s", "w", "b"]
    p2 = {k: params[k] for k in order}
    st2 = {**state, "tensors": {k: state["tensors"][k] for k in order}}
    steps2, new_state2 = core.compute_steps(theta, st2, p2, grads, cfg, loss=1.0, num_steps=20)
    for k in params:
        torch.testing.assert_close(steps2[k], steps[k])
        torch.testing.assert_close(
            new_state2["tensors"][k]["lstm_h"], new_state["tensors"][k]["lstm_h"]
        )


def test_tensors_interact_only_through_the_max_pool():
    cfg, theta, params, grads = small_setup()
    state = velo.init_state(params, cfg)
    alone, _ = core.compute_steps(
        theta, state, {"w": params["w"]}, grads, cfg, loss=1.0, num_steps=20
    )
    together, _ = core.compute_steps(theta, state, params, grads, cfg, loss=1.0, num_steps=20)
    assert not torch.allclose(alone["w"], together["w"])
    theta0 = dict(theta, mix_w=torch.zeros_like(theta["mix_w"]))
    theta0["mix_b"] = torch.zeros_like(theta["mix_b"])
    alone, _ = core.compute_steps(
        theta0, state, {"w": params["w"]}, grads, cfg, loss=1.0, num_steps=20
    )
    together, _ = core.compute_steps(theta0, state, params, grads, cfg, loss=1.0, num_steps=20)
    torch.testing.assert_close(alone["w"], together["w"])


def test_permuting_rows_and_columns_permutes_the_step():
    cfg, theta, params, grads = small_setup()
    state = velo.init_state(params, cfg)
    rows, cols = torch.randperm(5), torch.randperm(4)
    steps, _ = core.compute_steps(theta, state, params, grads, cfg, loss=1.0, num_steps=20)
    pp = dict(params, w=params["w"][rows][:, cols], b=params["b"][rows])
    gg = dict(grads, w=grads["w"][rows][:, cols], b=grads["b"][rows])
    steps2, _ = core.compute_steps(theta, state, pp, gg, cfg, loss=1.0, num_steps=20)
    torch.testing.assert_close(steps2["w"], steps["w"][rows][:, cols])
    torch.testing.assert_close(steps2["b"], steps["b"][rows])


def test_bank_mixture_is_linear_in_the_controls():
    cfg, theta, *_ = small_setup()
    k = 3
    mixture = torch.zeros(1, cfg.param_inits)
    mixture[0, k] = cfg.param_inits / 100
    layers = core.mix_banks(theta, mixture, cfg)
    for i, (w, b) in enumerate(layers):
        torch.testing.assert_close(w[0], theta[f"bank_w{i}"][k])
        torch.testing.assert_close(b[0], theta[f"bank_b{i}"][k])


def test_lr_zero_keeps_params_and_advances_state():
    cfg, theta, params, grads = small_setup()
    state = velo.init_state(params, cfg)
    new, new_state = velo.update(theta, state, params, grads, cfg, lr=0.0, loss=1.0, num_steps=9)
    for k in params:
        assert torch.equal(new[k], params[k])
        assert not torch.equal(new_state["tensors"][k]["m"], state["tensors"][k]["m"])
        assert new_state["tensors"][k]["updates"].item() == 1
    assert new_state["t"].item() == 1 and new_state["loss"]["count"].item() == 1


def test_weight_decay_is_decoupled_and_scaled_by_lr():
    cfg, theta, params, grads = small_setup()
    state = velo.init_state(params, cfg)
    steps, _ = core.compute_steps(theta, state, params, grads, cfg, loss=1.0, num_steps=9)
    new, _ = velo.update(
        theta, state, params, grads, cfg, lr=0.5, weight_decay=0.1, loss=1.0, num_steps=9
    )
    for k in params:
        torch.testing.assert_close(new[k], params[k] * (1 - 0.05) - 0.5 * steps[k])


def test_missing_loss_or_num_steps_is_a_clear_error():
    cfg, theta, params, grads = small_setup()
    state = velo.init_state(params, cfg)
    with pytest.raises(velo.MissingInputError, match="VeLO needs num_steps, the planned total"):
        velo.update(theta, state, params, grads, cfg, loss=1.0)
    with pytest.raises(velo.MissingInputError, match="VeLO needs the current training loss"):
        velo.update(theta, state, params, grads, cfg, num_steps=10)
    with pytest.raises(ValueError, match="num_steps must be a positive int, got 0"):
        velo.update(theta, state, params, grads, cfg, loss=1.0, num_steps=0)


def test_vmap_over_thetas_equals_a_python_loop():
    cfg, _, params, grads = small_setup()
    thetas = [small_setup(seed)[1] for seed in range(3)]
    stacked = {k: torch.stack([t[k] for t in thetas]) for k in thetas[0]}
    state = velo.init_state(params, cfg)

    def two_steps(theta):
        p1, s1 = velo.update(theta, state, params, grads, cfg, loss=2.0, num_steps=10)
        return velo.update(theta, s1, p1, grads, cfg, loss=1.5, num_steps=10)

    batched, batched_state = torch.func.vmap(two_steps)(stacked)
    for i, theta in enumerate(thetas):
        p2, s2 = two_steps(theta)
        for k in params:
            torch.testing.assert_close(batched[k][i], p2[k], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(
                batched_state["tensors"][k]["lstm_c"][i], s2["tensors"][k]["lstm_c"]
            )


def test_update_is_differentiable_in_theta():
    cfg, theta, params, grads = small_setup()
    theta = as64(theta)
    params, grads = as64(params), as64(grads)
    state = as64(velo.init_state(params, cfg))
    keys = ["bank_b0", "controls_b", "step_size_b", "lstm_init_h"]
    weights = {k: torch.randn_like(v) for k, v in params.items()}

    def readout(*leaves):
        th = dict(theta, **dict(zip(keys, leaves)))
        p1, s1 = velo.update(th, state, params, grads, cfg, loss=2.0, num_steps=10)
        p2, _ = velo.update(th, s1, p1, grads, cfg, loss=1.0, num_steps=10)
        return sum(((params[k] - v) * weights[k]).sum() * 1e3 for k, v in p2.items())

    leaves = tuple(theta[k].clone().requires_grad_(True) for k in keys)
    assert torch.autograd.gradcheck(readout, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_config_round_trip_and_unknown_keys():
    cfg = velo.VeLOConfig(tie_break="pylo", mlp_hidden_size=8)
    assert velo.VeLOConfig.from_json(cfg.to_json()) == cfg
    assert velo.VELO.num_params == 2_304_513
    with pytest.raises(ValueError, match=r"unknown VeLO config keys \['hidden'\]; valid keys"):
        velo.VeLOConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="tie_break must be 'first' or 'pylo'"):
        velo.VeLOConfig(tie_break="last")
