"""Numerical tests of the small_fc_lopt functional core against the spec and a naive oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lopt
from lopt import core
from lopt.config import SmallFCConfig

from .naive_small_fc import init_state as naive_init_state
from .naive_small_fc import step as naive_step

PRESETS = {"original": lopt.ORIGINAL, "mulo": lopt.MULO}


def random_theta(cfg: SmallFCConfig, seed: int = 0, offsets_scale: float = 0.05) -> dict:
    """θ at init plus small random decay offsets, so decays differ from the base values."""
    gen = torch.Generator().manual_seed(seed)
    theta = lopt.init_theta(cfg, gen)
    for key in ("momentum_decays", "rms_decays", "adafactor_decays"):
        theta[key] = theta[key] + offsets_scale * torch.randn(theta[key].shape, generator=gen)
    theta["b0"] = 0.1 * torch.randn(theta["b0"].shape, generator=gen)
    return theta


def scaled_grads(shape, steps: int, seed: int) -> list[torch.Tensor]:
    """Gradients with strongly non-uniform scales along every axis (catches trap T1/T2)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.ones(shape)
    for axis, size in enumerate(shape):
        view = [1] * len(shape)
        view[axis] = size
        scale = scale * torch.logspace(-1, 1, size).reshape(view)
    return [torch.randn(shape, generator=gen) * scale for _ in range(steps)]


# --------------------------------------------------------------------------- structure & constants
def test_theta_sizes_match_spec():
    assert lopt.ORIGINAL.num_params == 197
    assert lopt.MULO.num_params == 2409
    for cfg in PRESETS.values():
        theta = lopt.init_theta(cfg)
        assert sum(v.numel() for v in theta.values()) == cfg.num_params
        assert theta["w0"].shape == (39, cfg.hidden_size)


def test_init_weights_are_truncated_at_two_std():
    cfg = SmallFCConfig(hidden_size=64)
    w = lopt.init_theta(cfg, torch.Generator().manual_seed(1))["w1"]
    std = 1 / math.sqrt(64)
    assert w.abs().max() <= 2 * std + 1e-7
    # Truncation at ±2σ without variance correction leaves std ≈ 0.8796σ
    # (docs/design/small_fc_lopt.md §3).
    assert w.std().item() == pytest.approx(0.8796 * std, rel=0.05)


def test_zero_offsets_reproduce_base_decays_exactly():
    theta = lopt.init_theta(lopt.ORIGINAL)
    bm, bv, bf = lopt.effective_decays(theta, lopt.ORIGINAL)
    assert bm.tolist() == torch.tensor([0.9, 0.99, 0.999]).tolist()
    assert bv.tolist() == torch.tensor([0.999]).tolist()
    assert bf.tolist() == torch.tensor([0.9, 0.99, 0.999]).tolist()


def test_mulo_offsets_give_published_decays():
    bm, bv, bf = lopt.effective_decays(lopt.init_theta(lopt.MULO), lopt.MULO)
    expected = ([0.542027, 0.958441, 0.998024], [0.998886], [0.356218, 0.996626, 0.999461])
    for got, want in zip((bm, bv, bf), expected):
        assert got.tolist() == pytest.approx(want, abs=1e-6)


def test_time_features_at_zero():
    tf = core.time_features(0, torch.zeros(1))
    assert tf.tolist() == pytest.approx([-0.761594] * 11, abs=1e-6)


FACTORED_DIMS_LAST = [
    ((64, 32), (1, 0)),
    ((32, 64), (0, 1)),
    ((128, 128), (0, 1)),
    ((4, 4, 4), (1, 2)),
    ((5, 3, 5), (0, 2)),
    ((3, 5, 5, 3), (1, 2)),
    ((768, 3, 16, 16), (3, 0)),
    ((64, 64, 3, 3), (0, 1)),
]
FACTORED_DIMS_FIRST = [
    ((64, 32), (1, 0)),
    ((128, 128), (1, 0)),
    ((4, 4, 4), (1, 0)),
    ((5, 3, 5), (2, 0)),
    ((64, 64, 3, 3), (1, 0)),
    ((768, 3, 16, 16), (2, 0)),
]


@pytest.mark.parametrize("shape,expected", FACTORED_DIMS_LAST)
def test_factored_dims_last_matches_spec_table(shape, expected):
    assert lopt.factored_dims(shape, "last") == expected


@pytest.mark.parametrize("shape,expected", FACTORED_DIMS_FIRST)
def test_factored_dims_first(shape, expected):
    assert lopt.factored_dims(shape, "first") == expected


@pytest.mark.parametrize("shape", [(), (7,)])
def test_factored_dims_none_below_rank_two(shape):
    assert lopt.factored_dims(shape) is None


def test_factored_dims_rejects_unknown_rule():
    with pytest.raises(ValueError, match="tie_break must be 'first' or 'last'"):
        lopt.factored_dims((3, 3), "middle")


# --------------------------------------------------------------------------- naive oracle parity
ORACLE_SHAPES = [(), (7,), (6, 4), (5, 5), (3, 4, 5), (4, 4, 4), (4, 4, 2, 2), (2, 3, 4, 3)]


@pytest.mark.parametrize("tie_break", ["first", "last"])
@pytest.mark.parametrize("shape", ORACLE_SHAPES, ids=str)
@pytest.mark.parametrize("preset", ["original", "mulo"])
def test_core_matches_naive_per_element_reference(preset, shape, tie_break):
    cfg = SmallFCConfig(**{**PRESETS[preset].to_dict(), "tie_break": tie_break})
    theta = random_theta(cfg, seed=len(shape))
    steps = 10
    grads = scaled_grads(shape, steps, seed=3)
    p = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    state = core.init_tensor_state(p, cfg)
    naive_p = p.double().numpy().copy()
    naive_st = naive_init_state(tuple(shape), tie_break)
    theta_np = {k: v.double().numpy() for k, v in theta.items()}
    for t in range(steps):
        step, state = core.tensor_step(theta, p, grads[t], state, float(t), cfg)
        new_p = p - step
        naive_new = naive_step(naive_p, grads[t].double().numpy(), naive_st, theta_np, cfg, t)
        # Compare the step itself (p moves by ~1e-3 of its size, so comparing p hides errors).
        want = naive_p - naive_new
        got = step.double().numpy()
        scale = max(np.abs(want).max(), 1e-12)
        assert np.abs(got - want).max() / scale < 2e-5, f"step {t} diverged"
        p, naive_p = new_p, naive_new


# --------------------------------------------------------------------------- layout / tie rules
def _trajectory(p, grads, cfg, theta, transform=lambda x: x):
    state = core.init_tensor_state(transform(p), cfg)
    steps = []
    for t, g in enumerate(grads):
        step, state = core.tensor_step(theta, transform(p), transform(g), state, float(t), cfg)
        steps.append(step)
        p = p - torch.zeros_like(p)  # parameters held fixed: isolate the rule's effect
    return steps


@pytest.mark.parametrize(
    "shape,to_reference_layout,back",
    [
        ((5, 5), lambda x: x.T, lambda x: x.T),
        ((4, 4, 4), lambda x: x.permute(2, 1, 0), lambda x: x.permute(2, 1, 0)),
        ((16, 16, 3, 3), lambda x: x.permute(2, 3, 1, 0), lambda x: x.permute(3, 2, 0, 1)),
    ],
    ids=["square", "cube", "conv_in_eq_out"],
)
def test_first_rule_on_torch_layout_equals_reference_rule_on_reference_layout(
    shape, to_reference_layout, back
):
    first = SmallFCConfig(tie_break="first")
    last = SmallFCConfig(tie_break="last")
    theta = random_theta(first, seed=11)
    p = torch.randn(shape)
    grads = scaled_grads(shape, 5, seed=2)
    torch_layout = _trajectory(p, grads, first, theta)
    reference_layout = _trajectory(p, grads, last, theta, to_reference_layout)
    for a, b in zip(torch_layout, reference_layout):
        torch.testing.assert_close(a, back(b), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("shape", [(5, 5), (4, 4, 4), (16, 16, 3, 3)], ids=str)
def test_tie_rule_changes_the_step_on_ties(shape):
    theta = random_theta(lopt.ORIGINAL, seed=4)
    p = torch.randn(shape)
    grads = scaled_grads(shape, 3, seed=6)
    a = _trajectory(p, grads, SmallFCConfig(tie_break="first"), theta)[-1]
    b = _trajectory(p, grads, SmallFCConfig(tie_break="last"), theta)[-1]
    assert not torch.allclose(a, b, rtol=1e-4)


@pytest.mark.parametrize("tie_break", ["first", "last"])
def test_non_square_matrix_is_layout_independent(tie_break):
    cfg = SmallFCConfig(tie_break=tie_break)
    theta = random_theta(cfg, seed=8)
    p = torch.randn(6, 9)
    grads = scaled_grads((6, 9), 4, seed=9)
    direct = _trajectory(p, grads, cfg, theta)
    transposed = _trajectory(p, grads, cfg, theta, lambda x: x.T)
    for a, b in zip(direct, transposed):
        torch.testing.assert_close(a, b.T, rtol=1e-5, atol=1e-9)


def test_fac_g_equalises_column_scales_along_d1():
    """Trap T1: the row normaliser must average over axis d1, not over the decays."""
    cfg = lopt.ORIGINAL
    theta = lopt.init_theta(cfg)
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(256, 64, generator=gen) * torch.logspace(0, math.log10(68), 64)
    state = core.init_tensor_state(g, cfg)
    acc = core.accumulate(torch.zeros_like(g), g, state, lopt.effective_decays(theta, cfg), cfg)
    fac_g = acc.features[..., 10]  # channel 10: fac_g for decay 0.9
    col_rms = fac_g.square().mean(0).sqrt()
    assert (col_rms.max() / col_rms.min()).item() < 1.3


def test_scalar_normalised_features_are_sign_like():
    cfg = lopt.ORIGINAL
    theta = lopt.init_theta(cfg)
    p, g = torch.tensor(0.7), torch.tensor(-0.3)
    out = lopt.tensor_features(theta, p, g, core.init_tensor_state(p, cfg), 0, cfg)
    feats = out["features"]
    assert feats.shape == (39,)
    # x / sqrt(1e-5 + x²): |x| <= 1, and ≈ 1 unless x² ≲ 1e-5 (design §7); float32 rounds to 1.
    assert (feats[:28].abs() <= 1).all()
    assert (feats[:28].abs() > 0.02).all()
    assert feats[28:].tolist() == pytest.approx([-0.761594] * 11, abs=1e-6)


@pytest.mark.parametrize("shape", [(), (3,), (4, 6), (2, 3, 4)], ids=str)
def test_feature_tensor_shape_and_consistency_with_step(shape):
    cfg = lopt.MULO
    theta = random_theta(cfg)
    p, g = torch.randn(shape), torch.randn(shape)
    state = core.init_tensor_state(p, cfg)
    out = lopt.tensor_features(theta, p, g, state, 3, cfg)
    assert out["features"].shape == (*shape, 39)
    step, _ = lopt.tensor_step(theta, p, g, state, 3, cfg)
    torch.testing.assert_close(out["step"], step, rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------- functional API
def test_update_counts_steps_and_applies_lr_and_decoupled_weight_decay():
    cfg = lopt.ORIGINAL
    theta = random_theta(cfg)
    params = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    grads = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    state = lopt.init_state(params, cfg)
    plain, s1 = lopt.update(theta, state, params, grads, cfg)
    assert s1["t"].item() == 1.0
    scaled, _ = lopt.update(theta, state, params, grads, cfg, lr=0.5, weight_decay=0.1)
    for k in params:
        step = params[k] - plain[k]
        torch.testing.assert_close(scaled[k], params[k] * (1 - 0.05) - 0.5 * step)


def test_time_features_use_pre_increment_counter():
    cfg = lopt.ORIGINAL
    theta = random_theta(cfg)
    p, g = torch.randn(5), torch.randn(5)
    state = lopt.init_state({"p": p}, cfg)
    new_p, _ = lopt.update(theta, state, {"p": p}, {"p": g}, cfg)
    step0, _ = lopt.tensor_step(theta, p, g, state["tensors"]["p"], 0.0, cfg)
    step1, _ = lopt.tensor_step(theta, p, g, state["tensors"]["p"], 1.0, cfg)
    torch.testing.assert_close(p - new_p["p"], step0)
    assert not torch.allclose(step0, step1)


def test_vmap_over_four_thetas_equals_python_loop():
    cfg = lopt.ORIGINAL
    thetas = [random_theta(cfg, seed=s, offsets_scale=0.1) for s in range(4)]
    flat = torch.stack([lopt.flatten_theta(t, cfg) for t in thetas])
    params = {
        "w": torch.randn(5, 5),
        "v": torch.randn(3, 4, 2),
        "b": torch.randn(5),
        "s": torch.randn(()),
    }
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    state = lopt.init_state(params, cfg)

    # two steps, so the second sees non-zero state
    def two_steps(flat_theta):
        th = lopt.unflatten_theta(flat_theta, cfg)
        p1, s1 = lopt.update(th, state, params, grads, cfg)
        return lopt.update(th, s1, p1, grads, cfg)

    batched_params, batched_state = torch.func.vmap(two_steps)(flat)
    for i, theta in enumerate(thetas):
        p1, s1 = lopt.update(theta, state, params, grads, cfg)
        p2, s2 = lopt.update(theta, s1, p1, grads, cfg)
        for k in params:
            torch.testing.assert_close(batched_params[k][i], p2[k], rtol=1e-6, atol=1e-7)
            for sk, sv in s2["tensors"][k].items():
                torch.testing.assert_close(batched_state["tensors"][k][sk][i], sv)


def test_update_is_differentiable_in_theta():
    cfg = SmallFCConfig(hidden_size=3)
    theta = {k: v.double() for k, v in random_theta(cfg).items()}
    params = {"w": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    state = lopt.init_state(params, cfg)
    state = {
        "t": state["t"].double(),
        "tensors": {
            k: {sk: sv.double() for sk, sv in s.items()} for k, s in state["tensors"].items()
        },
    }
    keys = ["w0", "b0", "w2", "momentum_decays", "adafactor_decays"]
    weights = {k: torch.randn_like(v) for k, v in params.items()}

    def loss(*leaves):
        th = dict(theta, **dict(zip(keys, leaves)))
        p1, s1 = lopt.update(th, state, params, grads, cfg)
        p2, _ = lopt.update(th, s1, p1, grads, cfg)
        # A fixed linear read-out of the two steps, scaled to O(1): keeps finite differences exact.
        return sum(((params[k] - v) * weights[k]).sum() * 1e3 for k, v in p2.items())

    leaves = tuple(theta[k].clone().requires_grad_(True) for k in keys)
    assert torch.autograd.gradcheck(loss, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_flatten_roundtrip_uses_views():
    cfg = lopt.MULO
    theta = random_theta(cfg)
    flat = lopt.flatten_theta(theta, cfg)
    assert flat.shape == (cfg.num_params,)
    back = lopt.unflatten_theta(flat, cfg)
    start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    for k in theta:
        assert torch.equal(back[k], theta[k])
        # a view: same storage, inside the flat vector's bytes
        assert back[k].untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        assert start <= back[k].data_ptr() < end
    flat.mul_(2.0)  # a write to the flat vector shows through every key
    for k in theta:
        assert torch.equal(back[k], 2.0 * theta[k]), k
    with pytest.raises(ValueError, match="flat θ has 10 entries but the config needs 2409"):
        lopt.unflatten_theta(torch.zeros(10), cfg)
