"""The Celo2 functional core: float64 oracle, golden values, invariants, routing, Adam, vmap."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from lopt import celo2
from lopt.celo2 import core

from . import celo2_oracle as oracle

AS_STORED = dataclasses.replace(celo2.CELO2_BASE, layout="as_stored")


def golden_theta() -> dict:
    return celo2.unflatten_theta(torch.tensor(oracle.golden_theta(), dtype=torch.float32),
                                 celo2.CELO2)  # fmt: skip


def random_theta(seed: int) -> dict:
    # Larger than the init scale so that every channel matters to the output.
    theta = celo2.init_theta(celo2.CELO2, torch.Generator().manual_seed(seed))
    return {k: v * 2 + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(seed))
            for k, v in theta.items()}  # fmt: skip


def run_direction(theta, shape, grads, p, orthogonalize, layout="as_stored"):
    cfg = dataclasses.replace(AS_STORED, orthogonalize=orthogonalize, layout=layout)
    state = core.init_tensor_state(p, cfg, adam=False)
    out = []
    for g in grads:
        u, state = core.learned_direction(theta, p, g, state, cfg)
        out.append(u)
    return out, state


# -- float64 oracle ----------------------------------------------------------------------------
ORACLE_SHAPES = [(), (7,), (7, 5), (5, 7), (6, 6), (2, 5, 4), (3, 3, 4, 6), (3, 3, 6, 6)]


@pytest.mark.parametrize("orthogonalize", [False, True])
@pytest.mark.parametrize("shape", ORACLE_SHAPES)
def test_learned_direction_matches_float64_oracle(shape, orthogonalize):
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    theta = random_theta(3)
    theta_np = oracle.split_theta(celo2.flatten_theta(theta, celo2.CELO2).double().numpy())
    p = torch.randn(shape, generator=gen)
    scales = [1e-3, 1e-2, 0.1, 1.0, 10.0, 3.0]
    grads = [torch.randn(shape, generator=gen) * s for s in scales]
    if len(shape) >= 1:
        grads[2].view(-1)[0] = 5000.0  # exercises the ±1000 clip
    us, _ = run_direction(theta, shape, grads, p, orthogonalize)
    state = oracle.zero_state(tuple(shape))
    tol = 1e-4 if orthogonalize else 1e-5
    for step, (g, u) in enumerate(zip(grads, us)):
        expected, state = oracle.step(theta_np, p.double().numpy(), g.double().numpy(), state,
                                      orthogonalize)  # fmt: skip
        err = (u.double() - torch.from_numpy(np.asarray(expected))).abs().max().item()
        assert err <= tol, f"step {step}: max |Δu| {err:.2e} > {tol}"


# -- golden values (deterministic θ and inputs, u after the third step) ------------------------
def golden_inputs(shape, t):
    if len(shape) == 1:
        i, j = torch.arange(shape[0], dtype=torch.float64), 0.0
    else:
        i = torch.arange(shape[-2], dtype=torch.float64)[:, None]
        j = torch.arange(shape[-1], dtype=torch.float64)[None, :]
    p = (0.5 * torch.cos(0.3 * i + 0.7 * j + 0.2)).float()
    g = (0.2 * torch.sin(0.9 * t + 0.5 * i - 0.3 * j + 0.1 * i * j)).float()
    return p.expand(shape).contiguous(), g.expand(shape).contiguous()


GOLDEN = [  # shape, NS, u[0,0], u[1,2], u[last], Σu, Σu·(1 + i + 2j)
    ((6, 4), True, -1.126404, 1.693145, -0.709183, -6.917787, -40.795609),
    ((6, 4), False, -0.080431, 0.435050, -1.490981, -15.889508, -122.130072),
    ((4, 6), True, -0.178771, 0.906569, -1.039404, -2.677826, 3.112349),
    ((4, 6), False, 0.101651, 0.619845, -1.693797, -5.558576, -40.754722),
    ((5, 5), True, -0.915604, 1.277749, -1.661386, -5.137130, -27.913922),
    ((5, 5), False, 0.060524, 0.432812, -1.762928, -12.601049, -102.125511),
    ((7,), False, -0.231923, -1.078066, -1.239862, -6.498511, -30.821703),  # u[0], u[3]
]


def _golden_check(u, shape, expected):
    u00, u12, ulast, total, wsum = expected
    if len(shape) == 1:
        i = torch.arange(shape[0], dtype=torch.float64)
        weights, second = 1 + i, u[3]
    else:
        i = torch.arange(shape[0], dtype=torch.float64)[:, None]
        j = torch.arange(shape[1], dtype=torch.float64)[None, :]
        weights, second = 1 + i + 2 * j, u[1, 2]
    u = u.double()
    assert u.reshape(-1)[0].item() == pytest.approx(u00, abs=2e-4)
    assert second.item() == pytest.approx(u12, abs=2e-4)
    assert u.reshape(-1)[-1].item() == pytest.approx(ulast, abs=2e-4)
    assert u.sum().item() == pytest.approx(total, abs=2e-3)
    assert (u * weights).sum().item() == pytest.approx(wsum, abs=2e-3)
    assert u.square().sum().item() == pytest.approx(u.numel(), abs=1e-5 * u.numel())


@pytest.mark.parametrize("case", GOLDEN, ids=lambda c: f"{c[0]}-{'ns' if c[1] else 'raw'}")
def test_golden_values_as_stored(case):
    shape, ns, *expected = case
    grads, p = [], None
    for t in (1, 2, 3):
        p, g = golden_inputs(shape, t)
        grads.append(g)
    # p is the same at every step in the golden case (the parameter is not updated).
    us, _ = run_direction(golden_theta(), shape, grads, p, ns)
    _golden_check(us[-1], shape, expected)


@pytest.mark.parametrize("case", GOLDEN, ids=lambda c: f"{c[0]}-{'ns' if c[1] else 'raw'}")
def test_golden_values_through_torch_layout(case):
    """A PyTorch-layout tensor holding the reference tensor transposed gives the golden u."""
    shape, ns, *expected = case
    grads, p = [], None
    for t in (1, 2, 3):
        p, g = golden_inputs(shape, t)
        grads.append(g.mT.contiguous() if g.dim() == 2 else g)
    p_torch = p.mT.contiguous() if p.dim() == 2 else p
    us, _ = run_direction(golden_theta(), shape, grads, p_torch, ns, layout="torch")
    u = us[-1].mT if us[-1].dim() == 2 else us[-1]
    _golden_check(u, shape, expected)


@pytest.mark.parametrize("ns, u00", [(True, -0.178771), (False, 0.101651)])
def test_golden_rank4_slices_are_independent_2d_problems(ns, u00):
    """(3,2,4,6): each slice over the last two axes is its own (4,6) problem."""
    gen = torch.Generator().manual_seed(0)
    slices_p = torch.randn(3, 2, 4, 6, generator=gen)
    grads = [torch.randn(3, 2, 4, 6, generator=gen) for _ in range(3)]
    p0, _ = golden_inputs((4, 6), 1)
    slices_p[0, 0] = p0
    for t in (1, 2, 3):
        grads[t - 1][0, 0] = golden_inputs((4, 6), t)[1]
    us, _ = run_direction(golden_theta(), (3, 2, 4, 6), grads, slices_p, ns)
    assert us[-1][0, 0, 0, 0].item() == pytest.approx(u00, abs=2e-4)
    for a in range(3):
        for b in range(2):
            single, _ = run_direction(golden_theta(), (4, 6), [g[a, b] for g in grads],
                                      slices_p[a, b], ns)  # fmt: skip
            torch.testing.assert_close(us[-1][a, b], single[-1], atol=1e-5, rtol=0)


# -- Newton–Schulz ----------------------------------------------------------------------------
def test_newton_schulz_singular_values_in_analytic_band():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = torch.linalg.svdvals(core.newton_schulz(x))
    assert s.min() >= 0.6818 and s.max() <= 1.1344


def test_newton_schulz_scalar_map_iterates():
    # A 1x1 matrix is its own singular value: f⁵(1) with iterates 0.7010, 1.1136, ... 0.6964.
    x = torch.ones(1, 1, dtype=torch.float64)
    assert core.newton_schulz(x).item() == pytest.approx(0.69644, abs=1e-5)


def test_newton_schulz_is_orthogonally_equivariant_and_transposes():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(9, 9, generator=gen, dtype=torch.float64))
    torch.testing.assert_close(core.newton_schulz(u @ x @ v), u @ core.newton_schulz(x) @ v,
                               atol=1e-5, rtol=0)  # fmt: skip
    assert torch.equal(core.newton_schulz(x.mT), core.newton_schulz(x).mT)


def test_newton_schulz_batches_over_leading_axes():
    x = torch.randn(3, 2, 5, 7, generator=torch.Generator().manual_seed(2))
    batched = core.newton_schulz(x)
    for a in range(3):
        for b in range(2):
            torch.testing.assert_close(batched[a, b], core.newton_schulz(x[a, b]))


# -- invariants of the whole rule -------------------------------------------------------------
def _one_step(theta, p, g, ns=True, layout="as_stored"):
    us, state = run_direction(theta, p.shape, [g], p, ns, layout)
    return us[0], state


@pytest.mark.parametrize("shape", [(5, 7), (6, 6), (2, 3, 4, 5)])
def test_every_matrix_slice_has_unit_rms(shape):
    gen = torch.Generator().manual_seed(3)
    p, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen) * 1e-3
    for ns in (False, True):
        u, _ = _one_step(random_theta(0), p, g, ns)
        rms = u.square().mean(dim=(-2, -1)).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-6, rtol=0)


def test_scalar_parameter_steps_by_plus_or_minus_one():
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        u, _ = _one_step(random_theta(seed), torch.randn((), generator=gen),
                         torch.randn((), generator=gen))  # fmt: skip
        # |u| = (1 + 1e-9/d²)^-½ for the MLP output d: 1 up to the normaliser's eps.
        assert u.shape == () and abs(u.abs().item() - 1) < 1e-4


def test_parameter_scale_invariance():
    gen = torch.Generator().manual_seed(4)
    p, g = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    u1, _ = _one_step(random_theta(1), p, g)
    u2, _ = _one_step(random_theta(1), 37 * p, g)
    torch.testing.assert_close(u1, u2, atol=1e-5, rtol=0)


def test_permutation_equivariance():
    gen = torch.Generator().manual_seed(5)
    p, g = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    rows, cols = torch.randperm(5, generator=gen), torch.randperm(7, generator=gen)
    u, _ = _one_step(random_theta(2), p, g)
    u_perm, _ = _one_step(random_theta(2), p[rows][:, cols], g[rows][:, cols])
    torch.testing.assert_close(u_perm, u[rows][:, cols], atol=1e-5, rtol=0)


def test_transposition_equivariant_for_non_square_but_not_square():
    gen = torch.Generator().manual_seed(6)
    for ns in (False, True):
        p, g = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
        u, _ = _one_step(random_theta(0), p, g, ns)
        u_t, _ = _one_step(random_theta(0), p.mT, g.mT, ns)
        torch.testing.assert_close(u_t, u.mT, atol=1e-5, rtol=0)
        # Square: row and column statistics feed different MLP inputs, so transposing the
        # input does not transpose the output. Guards against a "fix" that breaks parity.
        p, g = torch.randn(6, 6, generator=gen), torch.randn(6, 6, generator=gen)
        u, _ = _one_step(random_theta(0), p, g, ns)
        u_t, _ = _one_step(random_theta(0), p.mT, g.mT, ns)
        assert (u_t - u.mT).abs().max() > 0.1


@pytest.mark.parametrize("shape", [(6, 6), (8, 3, 3, 3), (4, 4, 5, 5), (5, 4, 3)])
def test_torch_layout_is_the_rule_on_the_reference_permutation(shape):
    gen = torch.Generator().manual_seed(7)
    p, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    perm = (*range(2, len(shape)), 1, 0)
    u_torch, state = _one_step(random_theta(4), p, g, True, layout="torch")
    u_ref, _ = _one_step(random_theta(4), p.permute(perm).contiguous(),
                         g.permute(perm).contiguous(), True)  # fmt: skip
    torch.testing.assert_close(u_torch.permute(perm), u_ref, atol=1e-5, rtol=0)
    assert state["m"].shape == tuple(shape[a] for a in perm) + (3,)
    if len(shape) >= 3:  # a conv weight in the torch layout is a different problem as stored
        u_raw, _ = _one_step(random_theta(4), p, g, True)
        assert (u_raw - u_torch).abs().max() > 0.1


def test_accumulators_after_one_step_from_zero():
    gen = torch.Generator().manual_seed(8)
    g = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    zero = {k: v.double() for k, v in core.init_tensor_state(g, AS_STORED, adam=False).items()}
    theta = {k: v.double() for k, v in random_theta(0).items()}
    _, state = core.reference_direction(theta, torch.randn(4, 9, dtype=torch.float64), g, zero,
                                        True)  # fmt: skip
    one_minus = torch.tensor([0.1, 0.01, 0.001], dtype=torch.float64)
    torch.testing.assert_close(state["m"], g[..., None] * one_minus)
    torch.testing.assert_close(state["v"], 0.05 * g[..., None] ** 2)
    q = g**2 + 1e-30
    # (4, 9): the big axis a is 1, so v_row averages over axis 1 and is indexed by axis 0.
    torch.testing.assert_close(state["v_row"], q.mean(1)[:, None] * one_minus)
    torch.testing.assert_close(state["v_col"], q.mean(0)[:, None] * one_minus)


def test_factored_axes_stable_sort():
    assert core.factored_axes((3, 7)) == (0, 1)
    assert core.factored_axes((7, 3)) == (1, 0)
    assert core.factored_axes((5, 5)) == (0, 1)
    assert core.factored_axes((3, 3, 64, 64)) == (2, 3)
    assert core.factored_axes((5, 5, 3, 32)) == (1, 3)
    assert core.factored_axes((7,)) is None and core.factored_axes(()) is None


# -- Adam branch, routing, update ----------------------------------------------------------------
def _update_once(cfg, params, grads, lr=1.0, weight_decay=0.0, state=None, theta=None):
    theta = theta if theta is not None else random_theta(0)
    state = state if state is not None else celo2.init_state(params, cfg)
    return celo2.update(theta, state, params, grads, cfg, lr=lr, weight_decay=weight_decay)


def test_meta_adam_first_step_is_0_447_times_lr_mult():
    params, grads = {"b": torch.zeros(3)}, {"b": torch.ones(3)}
    new, _ = _update_once(celo2.CELO2, params, grads)
    expected = -20 * 1e-3 * 0.1 / math.sqrt(0.05 + 1e-8)
    torch.testing.assert_close(new["b"], torch.full((3,), expected), atol=1e-9, rtol=1e-6)


def test_adamw_first_step_is_bias_corrected_sign():
    params, grads = {"b": torch.zeros(3)}, {"b": torch.ones(3)}
    new, state = _update_once(celo2.PYLO_CELO2, params, grads, lr=2.0)
    torch.testing.assert_close(new["b"], torch.full((3,), -2e-3 * (1 - 1e-8)))
    # Second step with the same gradient: still ±1 after bias correction.
    new2, _ = _update_once(celo2.PYLO_CELO2, new, grads, lr=2.0, state=state)
    torch.testing.assert_close(new2["b"], torch.full((3,), -4e-3), atol=1e-9, rtol=1e-6)


def test_routing_by_rank_and_name():
    params = {"net.0.weight": torch.randn(32, 64), "net.0.bias": torch.randn(32),
              "tok_embed.weight": torch.randn(100, 16), "scale": torch.randn(())}  # fmt: skip
    state = celo2.init_state(params, celo2.CELO2)["tensors"]
    assert [core.is_adam_state(state[k]) for k in params] == [False, True, True, True]
    base = celo2.init_state(params, celo2.CELO2_BASE)["tensors"]
    assert not any(core.is_adam_state(s) for s in base.values())


def test_weight_matrix_step_has_rms_lr_times_step_mult():
    gen = torch.Generator().manual_seed(9)
    params = {"w": torch.randn(64, 32, generator=gen), "b": torch.randn(64, generator=gen)}
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    new, _ = _update_once(celo2.CELO2, params, grads, lr=0.5)
    rms = (new["w"] - params["w"]).square().mean().sqrt().item()
    assert rms == pytest.approx(0.5e-3, rel=1e-5)


def test_decoupled_weight_decay_per_branch():
    gen = torch.Generator().manual_seed(10)
    params = {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(6, generator=gen)}
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    plain, _ = _update_once(celo2.CELO2, params, grads, lr=0.5)
    decayed, _ = _update_once(celo2.CELO2, params, grads, lr=0.5, weight_decay=0.1)
    torch.testing.assert_close(decayed["w"] - plain["w"], -0.5 * 0.1 * params["w"])
    torch.testing.assert_close(decayed["b"] - plain["b"], -0.5 * 20 * 0.1 * params["b"])


def test_global_norm_clipping_scales_all_gradients():
    gen = torch.Generator().manual_seed(11)
    params = {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(6, generator=gen)}
    grads = {k: 10 * torch.randn(v.shape, generator=gen) for k, v in params.items()}
    norm = torch.cat([g.reshape(-1) for g in grads.values()]).norm()
    clipped = {k: g / norm for k, g in grads.items()}
    got, state = _update_once(celo2.ELO_CELO2, params, grads)
    want, _ = _update_once(dataclasses.replace(celo2.ELO_CELO2, global_clip_norm=None), params,
                           clipped)  # fmt: skip
    torch.testing.assert_close(got, want)
    # The steps are nearly scale-free, so check the clipped gradient in the moments directly.
    torch.testing.assert_close(state["tensors"]["b"]["exp_avg"], 0.1 * clipped["b"])
    _, unclipped = _update_once(celo2.PYLO_CELO2, params, grads)
    torch.testing.assert_close(unclipped["tensors"]["b"]["exp_avg"], 0.1 * grads["b"])


def test_update_counts_steps_keeps_dtype_and_does_not_mutate():
    params = {"w": torch.randn(6, 5, dtype=torch.bfloat16), "b": torch.randn(6)}
    grads = {k: torch.randn(v.shape).to(v.dtype) for k, v in params.items()}
    before = {k: v.clone() for k, v in params.items()}
    state = celo2.init_state(params, celo2.CELO2)
    new, new_state = _update_once(celo2.CELO2, params, grads, state=state)
    assert new["w"].dtype == torch.bfloat16 and new_state["t"].item() == 1
    assert state["t"].item() == 0 and all(torch.equal(before[k], params[k]) for k in params)
    assert all(v.dtype == torch.float32 for s in new_state["tensors"].values() for v in s.values())


def test_infinite_gradient_is_clipped_in_the_learned_branch():
    params = {"w": torch.randn(4, 6)}
    g = torch.randn(4, 6)
    g[0, 0] = float("inf")
    new, state = _update_once(celo2.CELO2, params, {"w": g})
    assert torch.isfinite(new["w"]).all()
    # Reference frame of a (4, 6) torch tensor is (6, 4): element (0, 0) is still (0, 0).
    assert state["tensors"]["w"]["m"][0, 0, 0].item() == pytest.approx(100.0)


# -- meta-training: vmap and gradients ---------------------------------------------------------
def _lane_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(7, 5, generator=gen), "b": torch.randn(7, generator=gen)}
    grads = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(2)]
    return params, grads


def _two_steps(flat_theta, params, grads, cfg):
    theta = celo2.unflatten_theta(flat_theta, cfg)
    state = celo2.init_state(params, cfg)
    for g in grads:
        params, state = celo2.update(theta, state, params, g, cfg)
    return params["w"].sum() + params["b"].square().sum() + params["w"].square().sum()


@pytest.mark.parametrize("cfg", [celo2.CELO2, celo2.CELO2_BASE], ids=["celo2", "celo2_base"])
def test_vmap_over_theta_equals_loop(cfg):
    params, grads = _lane_inputs(12)
    thetas = torch.stack([celo2.flatten_theta(random_theta(s), cfg) for s in range(3)])
    batched = torch.func.vmap(lambda th: _two_steps(th, params, grads, cfg))(thetas)
    looped = torch.stack([_two_steps(th, params, grads, cfg) for th in thetas])
    torch.testing.assert_close(batched, looped, atol=1e-6, rtol=1e-6)


def test_update_is_differentiable_in_theta_and_dead_heads_get_zero_gradient():
    params, grads = _lane_inputs(13)
    flat = celo2.flatten_theta(random_theta(5), celo2.CELO2).requires_grad_(True)
    _two_steps(flat, params, grads, celo2.CELO2).backward()
    grad = celo2.unflatten_theta(flat.grad, celo2.CELO2)
    assert torch.isfinite(flat.grad).all() and grad["w0"].abs().sum() > 0
    assert grad["w2"][:, 0].abs().sum() > 0
    assert torch.equal(grad["w2"][:, 1:], torch.zeros(8, 2))
    assert torch.equal(grad["b2"][1:], torch.zeros(2))


def test_vmap_over_lanes_of_params_grads_and_state():
    cfg = celo2.CELO2
    theta = random_theta(6)
    lanes = [_lane_inputs(20 + i) for i in range(3)]
    params = {k: torch.stack([lane[0][k] for lane in lanes]) for k in lanes[0][0]}
    grads = {k: torch.stack([lane[1][0][k] for lane in lanes]) for k in lanes[0][0]}
    one = celo2.init_state(lanes[0][0], cfg)
    state = {"t": one["t"].expand(3).clone(),
             "tensors": {n: {k: v.expand(3, *v.shape).clone() for k, v in s.items()}
                         for n, s in one["tensors"].items()}}  # fmt: skip
    step = torch.func.vmap(lambda p, s, g: celo2.update(theta, s, p, g, cfg))
    new, _ = step(params, state, grads)
    for i, (p, g) in enumerate(lanes):
        want, _ = celo2.update(theta, celo2.init_state(p, cfg), p, g[0], cfg)
        for k in p:
            torch.testing.assert_close(new[k][i], want[k])


# -- θ and config ---------------------------------------------------------------------------
def test_theta_has_347_parameters_in_reference_order():
    assert celo2.CELO2.num_params == 347
    flat = torch.arange(347, dtype=torch.float32)
    theta = celo2.unflatten_theta(flat, celo2.CELO2)
    assert theta["w0"].shape == (30, 8) and theta["w0"][0, 0] == 0 and theta["b2"][2] == 346
    torch.testing.assert_close(celo2.flatten_theta(theta, celo2.CELO2), flat)


def test_init_theta_statistics():
    theta = celo2.init_theta(celo2.CELO2, torch.Generator().manual_seed(0))
    draws = [celo2.init_theta(celo2.CELO2, torch.Generator().manual_seed(s)) for s in range(420)]
    w0 = torch.cat([d["w0"].reshape(-1) for d in draws])
    assert w0.abs().max() <= 2 / math.sqrt(30) + 1e-7
    assert w0.std().item() == pytest.approx(0.8796 / math.sqrt(30), rel=0.01)
    assert torch.equal(theta["b0"], torch.zeros(8))


def test_config_json_round_trip_and_unknown_keys():
    for cfg in celo2.VARIANTS.values():
        assert type(cfg).from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match=r"unknown Celo2 config keys \['lr'\]; valid keys"):
        celo2.Celo2Config.from_dict({"lr": 1.0})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layout": "jax"}, "layout must be 'torch' or 'as_stored'"),
        ({"adam_form": "sgd"}, "adam_form must be 'meta' or 'adamw'"),
        ({"adam_betas": (0.9, 1.0)}, r"adam_betas must be two decays in \[0, 1\)"),
        ({"step_mult": float("nan")}, "step_mult must be a finite float > 0"),
        ({"global_clip_norm": 0.0}, "global_clip_norm must be a float > 0 or None"),
        ({"adam_name_pattern": "("}, "is not a valid regex"),
        ({"orthogonalize": 1}, "orthogonalize must be a bool"),
        ({"conv_mode": "flat"}, "conv_mode must be one of 'slices', 'matrix', got 'flat'"),
        (
            {"conv_mode": "matrix", "layout": "as_stored"},
            r"conv_mode='matrix' needs layout='torch' .* got layout='as_stored'; set "
            r"layout='torch' or conv_mode='slices'",
        ),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        celo2.Celo2Config(**kwargs)


def test_validate_theta_names_the_problem():
    theta = random_theta(0)
    with pytest.raises(ValueError, match=r"missing keys \['b2'\]"):
        celo2.validate_theta({k: v for k, v in theta.items() if k != "b2"}, celo2.CELO2)
    with pytest.raises(ValueError, match=r"'w1' has shape \(8, 9\) but .* needs \(8, 8\)"):
        celo2.validate_theta({**theta, "w1": torch.zeros(8, 9)}, celo2.CELO2)
    with pytest.raises(ValueError, match="'b0' contains NaN or inf"):
        celo2.validate_theta({**theta, "b0": torch.full((8,), float("nan"))}, celo2.CELO2)


# -- conv_mode="matrix": a conv kernel is one (in·∏spatial, out) matrix -------------------------
MATRIX = dataclasses.replace(celo2.CELO2, conv_mode="matrix")
CONV_SHAPES = [(16, 1, 3, 3), (32, 16, 3, 3), (8, 4, 5, 5), (6, 6, 1, 1), (4, 3, 2, 2, 2),
               (5, 3, 4)]  # fmt: skip


@pytest.mark.parametrize("cfg", [MATRIX, dataclasses.replace(celo2.CELO2_BASE, conv_mode="matrix")],
                         ids=["celo2", "celo2_base"])  # fmt: skip
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=str)
def test_matrix_mode_conv_steps_exactly_as_the_flattened_linear_weight(shape, cfg):
    """Bit for bit, over steps, state included: the conv (out, in, *k) under conv_mode="matrix"
    and an nn.Linear weight (out, in·∏k) holding the same numbers run the same float ops."""
    gen = torch.Generator().manual_seed(sum(shape))
    theta = random_theta(7)
    conv = {"w": torch.randn(shape, generator=gen)}
    linear = {"w": conv["w"].reshape(shape[0], -1).clone()}
    linear_cfg = dataclasses.replace(cfg, conv_mode="slices")  # the default: a Linear's frame
    conv_state, linear_state = celo2.init_state(conv, cfg), celo2.init_state(linear, linear_cfg)
    assert conv_state["tensors"]["w"]["m"].shape == (math.prod(shape[1:]), shape[0], 3)
    for step, scale in enumerate([1e-3, 1.0, 30.0, 0.1]):
        g = torch.randn(shape, generator=gen) * scale
        conv, conv_state = celo2.update(theta, conv_state, conv, {"w": g}, cfg, lr=0.7,
                                        weight_decay=0.1)  # fmt: skip
        linear, linear_state = celo2.update(theta, linear_state, linear,
                                            {"w": g.reshape(shape[0], -1)}, linear_cfg, lr=0.7,
                                            weight_decay=0.1)  # fmt: skip
        assert conv["w"].shape == shape
        assert torch.equal(conv["w"].reshape(shape[0], -1), linear["w"]), f"step {step}"
        for key, value in linear_state["tensors"]["w"].items():
            assert torch.equal(conv_state["tensors"]["w"][key], value), f"step {step}: {key}"


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=str)
def test_matrix_mode_steps_the_whole_kernel_to_unit_rms_and_differs_from_slices(shape):
    gen = torch.Generator().manual_seed(1)
    p, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    theta = random_theta(2)
    u, _ = core.learned_direction(theta, p, g, core.init_tensor_state(p, MATRIX), MATRIX)
    slices, _ = core.learned_direction(theta, p, g, core.init_tensor_state(p, celo2.CELO2),
                                       celo2.CELO2)  # fmt: skip
    assert u.shape == shape
    assert u.square().mean().item() == pytest.approx(1.0, abs=1e-5)
    if math.prod(shape[2:]) > 1:  # one RMS for the kernel, not one per spatial position
        per_slice = u.square().mean(dim=(0, 1)).sqrt()
        assert (per_slice - 1).abs().max() > 1e-2
        assert (u - slices).abs().max() > 0.1
    else:  # a 1×1 kernel is a matrix either way
        torch.testing.assert_close(u, slices, atol=0, rtol=0)


def test_frame_mapping_per_mode():
    x = torch.arange(4 * 3 * 2 * 5, dtype=torch.float32).reshape(4, 3, 2, 5)
    for cfg, want in [(celo2.CELO2, (2, 5, 3, 4)), (MATRIX, (30, 4))]:
        ref = core.to_reference(x, cfg)
        assert tuple(ref.shape) == want == core.reference_shape(x.shape, cfg)
        assert torch.equal(core.from_reference(ref, cfg, x.shape), x)
    torch.testing.assert_close(core.to_reference(x, MATRIX), x.reshape(4, -1).T, atol=0, rtol=0)
    # a per-matrix statistic, expanded to the frame, maps back as a view of the same numbers
    scale = torch.tensor([[2.0]])
    back = core.from_reference(scale.expand(30, 4), MATRIX, x.shape)
    assert back.shape == x.shape and back.data_ptr() == scale.data_ptr()
    for shape in [(), (7,), (5, 9), (6, 6)]:  # rank <= 2: the mode changes nothing
        assert core.reference_shape(shape, MATRIX) == core.reference_shape(shape, celo2.CELO2)
        assert core.same_frame(shape, MATRIX, celo2.CELO2)
    assert not core.same_frame((4, 3, 2, 5), MATRIX, celo2.CELO2)
    assert not core.same_frame((4, 4, 1, 1), MATRIX, celo2.CELO2)
    as_stored = dataclasses.replace(celo2.CELO2, layout="as_stored")
    assert not core.same_frame((6, 6), as_stored, celo2.CELO2)  # equal shapes, axes swapped


@pytest.mark.parametrize("cfg", [celo2.CELO2, MATRIX], ids=["slices", "matrix"])
def test_vmap_over_lanes_with_conv_kernels(cfg):
    """The meta-training path: update vmapped over θ, params, grads and state, conv included."""
    gen = torch.Generator().manual_seed(14)
    shapes = {"conv": (6, 2, 3, 3), "w": (7, 5), "b": (7,)}
    lanes = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(3)]
    grads = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(3)]
    thetas = [random_theta(s) for s in range(3)]
    stack = lambda dicts: {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}  # noqa: E731
    one = celo2.init_state(lanes[0], cfg)
    state = {"t": one["t"].expand(3).clone(),
             "tensors": {n: {k: v.expand(3, *v.shape).clone() for k, v in s.items()}
                         for n, s in one["tensors"].items()}}  # fmt: skip
    step = torch.func.vmap(lambda th, p, s, g: celo2.update(th, s, p, g, cfg))
    new, new_state = step(stack(thetas), stack(lanes), state, stack(grads))
    for i in range(3):
        want, want_state = celo2.update(thetas[i], celo2.init_state(lanes[i], cfg), lanes[i],
                                        grads[i], cfg)  # fmt: skip
        for k in shapes:
            torch.testing.assert_close(new[k][i], want[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(new_state["tensors"]["conv"]["m"][i],
                                   want_state["tensors"]["conv"]["m"])  # fmt: skip


def test_conv_mode_config_default_json_files_and_old_records(tmp_path):
    import lopt

    assert all(cfg.conv_mode == "slices" for cfg in celo2.VARIANTS.values())
    assert celo2.Celo2Config.from_json(MATRIX.to_json()) == MATRIX
    assert MATRIX.to_dict()["conv_mode"] == "matrix"
    summary = lopt.get_architecture("celo2").summary
    assert "conv kernels as one" in summary(MATRIX) and "conv" not in summary(celo2.CELO2)
    old = {k: v for k, v in celo2.CELO2.to_dict().items() if k != "conv_mode"}
    assert celo2.Celo2Config.from_dict(old) == celo2.CELO2
    assert lopt.resolve_config("celo2", {"conv_mode": "matrix"}) == MATRIX  # --lopt-option
    lopt.save_theta(tmp_path / "m.safetensors", random_theta(0), MATRIX)
    assert lopt.load_theta(tmp_path / "m.safetensors")[1] == MATRIX
