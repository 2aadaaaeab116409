"""Statistical and exact tests of the ES / TES / PES estimators (docs/design/meta_training.md §12).

Tolerances are derived from each estimator's variance (z-scores against empirical standard
errors), with fixed seeds.
"""

from __future__ import annotations

import math

import pytest
import torch

from metatrain.estimators import PES, FullES, TruncatedES, antithetic_sum
from metatrain.schedules import Constant, LogUniform, NeverEnding
from metatrain.shaping import centered_rank, get_shaping, masked_mean, sign
from metatrain.unroll import VectorizedUnroll

from .analytic_problems import DriftProblem, ObjectiveProblem


def es_of(objective, num_pairs, sigma, seed=0):
    unroll = VectorizedUnroll(ObjectiveProblem(objective), num_pairs, NeverEnding(), seed=seed)
    return TruncatedES(unroll, truncation_length=1, sigma=sigma)


# ----------------------------------------------------------------------- S1: analytic objectives
def test_es_on_quadratic_matches_gradient_within_its_variance():
    P, N = 10, 20_000
    gen = torch.Generator().manual_seed(0)
    root = torch.randn(P, P, generator=gen)
    A = root @ root.T / P + torch.eye(P)
    c = torch.randn(P, generator=gen)
    theta = torch.randn(P, generator=gen)

    def objective(th):
        d = th - c
        return 0.5 * ((d @ A) * d).sum(-1)

    grad, _ = es_of(objective, N, sigma=0.1).estimate(theta, seed=1)
    exact = A @ (theta - c)
    # E‖ĝ − ∇F‖² = (P+1)‖∇F‖²/N for the antithetic estimator on a quadratic (§12 S1).
    bound = 4 * math.sqrt((P + 1) / N) * exact.norm()
    assert (grad - exact).norm() <= bound
    assert torch.nn.functional.cosine_similarity(grad, exact, dim=0) > 0.98


def test_es_targets_the_gaussian_smoothed_objective():
    sigma, batches, N = 1.0, 20, 1000
    theta = torch.tensor([0.6, 1.0, 2.0, 2.6, -0.6, -1.2, -2.0, 1.4, -2.5, 0.9])
    assert (theta.sin().abs() >= 0.5).all()
    estimates = torch.stack(
        [
            es_of(lambda th: th.cos().sum(-1), N, sigma, seed=b).estimate(theta, seed=100 + b)[0]
            for b in range(batches)
        ]
    )
    mean, se = estimates.mean(0), estimates.std(0) / math.sqrt(batches)
    smoothed = -math.exp(-(sigma**2) / 2) * theta.sin()
    unsmoothed = -theta.sin()
    assert ((mean - smoothed).abs() / se).max() <= 4
    assert ((mean - unsmoothed).abs() / se).min() >= 8


# --------------------------------------------------------------------------- S2: exact identities
def drift_unroll(num_pairs, schedule, seed=0, d=3, offset=0):
    s0 = torch.linspace(-1.0, 1.0, d)
    return VectorizedUnroll(DriftProblem(s0), num_pairs, schedule, random_offset=offset, seed=seed)


def test_pes_first_truncation_equals_truncated_es():
    theta = torch.tensor([0.3, -0.2, 0.1])
    pes = PES(drift_unroll(64, Constant(100)), truncation_length=5, sigma=0.05)
    tes = TruncatedES(drift_unroll(64, Constant(100)), truncation_length=5, sigma=0.05)
    g_pes, m_pes = pes.estimate(theta, seed=7)
    g_tes, m_tes = tes.estimate(theta, seed=7)
    torch.testing.assert_close(g_pes, g_tes, rtol=1e-6, atol=1e-7)
    assert m_pes["meta_loss"] == pytest.approx(m_tes["meta_loss"])


def test_pes_over_whole_trajectory_equals_full_es_avg():
    theta = torch.tensor([0.3, -0.2, 0.1])
    pes = PES(drift_unroll(32, NeverEnding()), truncation_length=20, sigma=0.05)
    full = FullES(drift_unroll(32, NeverEnding()), length_schedule=Constant(20), sigma=0.05)
    g_pes, _ = pes.estimate(theta, seed=3)
    g_full, _ = full.estimate(theta, seed=3)
    torch.testing.assert_close(g_pes, g_full, rtol=1e-6, atol=1e-7)


def test_zero_perturbation_gives_zero_gradient():
    pes = PES(drift_unroll(1, Constant(4)), truncation_length=6, sigma=0.05)
    out = pes.unroll_step(torch.zeros(2, 3))
    delta = out.losses[:, :1] - out.losses[:, 1:]
    grad = pes.gradient(delta, out, torch.zeros(1, 3))
    assert torch.equal(grad, torch.zeros(3))


def test_antithetic_scale_is_one_over_two_sigma_squared():
    eps = torch.tensor([[0.2, 0.0], [0.0, -0.4]])
    grad = antithetic_sum(torch.tensor([1.0, 2.0]), eps, sigma=0.5)
    torch.testing.assert_close(grad, torch.tensor([0.2, -0.8]) / 2 / (2 * 0.25))


# --------------------------------------------------------------------------- S3: PES with resets
def exact_truncation_gradients(s0, theta, length, trunc, truncations):
    """∇J_k = (1/D_k) Σ_{t∈k, m=1} τ_t (s0 + τ_t θ) for identical lanes without offsets."""
    grads, tau, slot = [], 0, 0
    for _ in range(truncations):
        total, count = torch.zeros_like(theta), 0
        for _ in range(trunc):
            if tau == length:  # reset slot: mask 0
                tau = 0
            else:
                total += tau * (s0 + tau * theta)
                count += 1
                tau += 1
            slot += 1
        grads.append(total / max(count, 1))
    return torch.stack(grads)


@pytest.mark.parametrize("rule", ["exact", "reference"])
def test_pes_is_unbiased_with_resets_only_under_the_exact_rule(rule):
    length, trunc, truncations, groups, pairs = 7, 3, 8, 50, 1000
    s0 = torch.tensor([1.0, -0.5, 0.25])
    theta = torch.tensor([0.2, 0.1, -0.3])
    sigma = 0.05
    estimators = [
        PES(
            VectorizedUnroll(DriftProblem(s0), pairs, Constant(length), seed=g),
            truncation_length=trunc,
            sigma=sigma,
            reset_rule=rule,
        )
        for g in range(groups)
    ]
    per_truncation = torch.stack(
        [
            torch.stack(
                [est.estimate(theta, seed=1000 * k + g)[0] for g, est in enumerate(estimators)]
            )
            for k in range(truncations)
        ]
    )  # [K, groups, d]
    mean = per_truncation.mean(1)
    se = per_truncation.std(1) / math.sqrt(groups)
    exact = exact_truncation_gradients(s0, theta, length, trunc, truncations)
    z = ((mean - exact).abs() / se).amax(1)  # worst coordinate per truncation
    if rule == "exact":
        assert z.max() <= 5, z
    else:
        # The reference rule credits the done slot to ε alone: biased in the truncations that
        # hold one (here 2, 4 and 7, with z in the hundreds); unbiased elsewhere.
        assert z.max() > 10, z


# --------------------------------------------------------------------------- S5: timeline
def test_each_trajectory_takes_length_plus_one_slots_and_t_restarts():
    unroll = drift_unroll(2, Constant(3))
    out = unroll.run(torch.zeros(4, 3), 10)
    assert out.mask[:, 0].tolist() == [1, 1, 1, 0, 1, 1, 1, 0, 1, 1]
    assert out.done[:, 0].tolist() == [0, 0, 1, 0, 0, 0, 1, 0, 0, 0]
    assert out.losses[3].abs().sum() == 0  # reset slots record 0
    assert unroll.state["t"].tolist() == [2, 2, 2, 2]  # the lane counter restarted at the reset


def test_offsets_shorten_only_the_first_trajectory():
    unroll = drift_unroll(64, Constant(5), offset=5, seed=3)
    start = unroll.inner_step.clone()
    assert start.min() >= 0 and start.max() < 5 and len(set(start.tolist())) > 1
    assert torch.equal(unroll.state["t"], torch.zeros(128))  # the lopt counter is never offset
    out = unroll.run(torch.zeros(128, 3), 20)
    for pair in range(64):
        resets = (out.mask[:, pair] == 0).nonzero().squeeze(1).tolist()
        first = max(5 - int(start[pair]), 1)
        assert resets[0] == first  # first trajectory: max(L − k, 1) trained slots
        assert all(b - a == 6 for a, b in zip(resets, resets[1:]))  # then L + 1 slots each


def test_pairs_share_masks_batches_and_resets():
    unroll = drift_unroll(4, LogUniform(2, 6), offset=3, seed=5)
    eps = torch.randn(4, 3)
    unroll.run(torch.cat([eps, -eps]), 30)
    t = unroll.state["t"]
    assert torch.equal(t[:4], t[4:])


def test_loguniform_lengths_stay_in_range():
    sched = LogUniform(3, 40)
    lengths = sched.sample(10_000, torch.Generator().manual_seed(0))
    assert lengths.min() >= 3 and lengths.max() < 40
    assert (lengths == 3).any() and (lengths == 39).any()
    # log-uniform: about as many draws in [3, 11) as in [11, 40)
    low = (lengths < 11).float().mean()
    assert 0.4 < low < 0.6


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"length": 0}, "Constant schedule needs length >= 1"),
    ],
)
def test_bad_schedules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Constant(**kwargs)
    with pytest.raises(ValueError, match="LogUniform schedule needs 1 <= low < high"):
        LogUniform(10, 5)


# --------------------------------------------------------------------------- S6: robustness
def test_nan_losses_yield_finite_gradients_and_metrics():
    unroll = VectorizedUnroll(DriftProblem(torch.ones(3), nan_lanes=(0, 5)), 4, Constant(4), seed=0)
    pes = PES(unroll, truncation_length=6, sigma=0.05)
    grad, metrics = pes.estimate(torch.zeros(3), seed=1)
    assert torch.isfinite(grad).all()
    assert math.isfinite(metrics["meta_loss"])


def test_nonfinite_gradient_entries_are_zeroed_and_counted():
    def objective(th):
        out = th.sum(-1)
        out[0] = float("inf")  # the normaliser of this problem does not clip
        return out

    grad, metrics = es_of(objective, 4, sigma=0.1).estimate(torch.zeros(3), seed=0)
    assert torch.isfinite(grad).all()
    assert metrics["nonfinite_grad"] == 3


# --------------------------------------------------------------------------- shaping
def test_shaping_functions():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    pos = torch.tensor([[3.0, 1.0], [1.0, 0.0]])
    neg = torch.tensor([[1.0, 2.0], [2.0, 0.0]])
    torch.testing.assert_close(masked_mean(pos, mask), torch.tensor([2.0, 1.0]))
    assert sign(pos - neg, mask, pos, neg).tolist() == [[1.0, -1.0], [1.0, -1.0]]
    ranks = centered_rank(pos - neg, mask, pos, neg)
    # per-pair means: pos [2, 1], neg [1.5, 2] → ranks of [2, 1, 1.5, 2] = [2, 0, 1, 3] / 3 - 0.5
    torch.testing.assert_close(ranks[0], torch.tensor([(2 - 1) / 3, (0 - 3) / 3]))
    with pytest.raises(ValueError, match="unknown loss shaping 'rank'; valid"):
        get_shaping("rank")


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).tolist() == [0.0, 0.0, 0.0]


def test_estimator_argument_errors():
    with pytest.raises(ValueError, match="sigma must be > 0"):
        PES(drift_unroll(1, Constant(3)), truncation_length=2, sigma=0.0)
    with pytest.raises(ValueError, match="truncation_length must be >= 1"):
        PES(drift_unroll(1, Constant(3)), truncation_length=0)
    with pytest.raises(ValueError, match="reset_rule must be 'exact' or 'reference'"):
        PES(drift_unroll(1, Constant(3)), truncation_length=2, reset_rule="fast")
    with pytest.raises(ValueError, match="full ES reduce must be 'avg' or 'last'"):
        FullES(drift_unroll(1, Constant(3)), Constant(10), reduce="min")
    with pytest.raises(ValueError, match=r"theta_lanes must have shape \[2N=2, P\]"):
        drift_unroll(1, Constant(3)).run(torch.zeros(3, 3), 1)
