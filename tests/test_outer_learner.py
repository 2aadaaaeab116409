"""The outer learner: mean of the workers' gradients, non-finite entries zeroed, elementwise clip,
then Adam on θ — checked against Adam written out in float64."""

from __future__ import annotations

import math

import pytest
import torch

from metatrain.learner import OuterLearner


def adam_reference(theta, grads, lr, betas=(0.9, 0.999), eps=1e-8):
    """torch.optim.Adam's update, element by element in float64 (bias-corrected)."""
    theta = [float(x) for x in theta]
    m = [0.0] * len(theta)
    v = [0.0] * len(theta)
    for t, g in enumerate(grads, start=1):
        for i, gi in enumerate(g):
            m[i] = betas[0] * m[i] + (1 - betas[0]) * gi
            v[i] = betas[1] * v[i] + (1 - betas[1]) * gi * gi
            m_hat = m[i] / (1 - betas[0] ** t)
            v_hat = v[i] / (1 - betas[1] ** t)
            theta[i] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return torch.tensor(theta, dtype=torch.float64)


def test_gradients_are_clipped_elementwise_before_adam():
    steps = [[10.0, -10.0, 0.5], [1.0, 1.0, 1.0]]  # Adam's 2nd step sees the clipped history
    learner = OuterLearner(torch.zeros(3), lr=0.1, grad_clip=3.0)
    metrics = [learner.apply([torch.tensor(g)]) for g in steps]
    clipped = [[max(-3.0, min(3.0, x)) for x in g] for g in steps]
    want = adam_reference([0.0] * 3, clipped, lr=0.1)
    torch.testing.assert_close(learner.theta.double(), want, rtol=1e-6, atol=1e-7)
    unclipped = adam_reference([0.0] * 3, steps, lr=0.1)
    assert not torch.allclose(learner.theta.double(), unclipped, atol=1e-4)  # clipping matters
    assert metrics[0]["grad_clipped"] == 2 and metrics[1]["grad_clipped"] == 0
    assert metrics[0]["grad_norm"] == pytest.approx(math.sqrt(9 + 9 + 0.25))


def test_non_finite_gradient_entries_are_zeroed_and_counted():
    learner = OuterLearner(torch.ones(4), lr=0.1, grad_clip=3.0)
    metrics = learner.apply([torch.tensor([math.nan, math.inf, -math.inf, 2.0])])
    assert metrics["grad_nonfinite"] == 3
    assert torch.isfinite(learner.theta).all()
    want = adam_reference([1.0] * 4, [[0.0, 0.0, 0.0, 2.0]], lr=0.1)
    torch.testing.assert_close(learner.theta.double(), want, rtol=1e-6, atol=1e-7)
    assert learner.theta[:3].tolist() == [1.0, 1.0, 1.0]  # zeroed entries do not move


def test_worker_gradients_are_averaged_and_best_loss_kept():
    learner = OuterLearner(torch.zeros(2), lr=0.05, grad_clip=3.0)
    learner.apply([torch.tensor([1.0, -4.0]), torch.tensor([3.0, 0.0])], meta_loss=2.0)
    learner.apply([torch.tensor([0.5, 0.5])], meta_loss=3.0)
    want = adam_reference([0.0, 0.0], [[2.0, -2.0], [0.5, 0.5]], lr=0.05)
    torch.testing.assert_close(learner.theta.double(), want, rtol=1e-6, atol=1e-7)
    assert learner.best_loss == 2.0


def test_state_dict_resumes_the_same_trajectory():
    grads = [torch.tensor([1.0, -2.0]), torch.tensor([5.0, 0.1]), torch.tensor([-1.0, 1.0])]
    a = OuterLearner(torch.zeros(2), lr=0.1)
    for g in grads:
        a.apply([g])
    b = OuterLearner(torch.zeros(2), lr=0.1)
    b.apply([grads[0]])
    c = OuterLearner(torch.full((2,), 7.0), lr=0.1)
    c.load_state_dict(b.state_dict())
    for g in grads[1:]:
        c.apply([g])
    assert torch.equal(a.theta, c.theta)
