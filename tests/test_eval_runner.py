"""The batched evaluation optimizers and inner loop reproduce plain per-run training: functional
Adam ≡ torch.optim.Adam, the vmapped learned optimizer ≡ the small_fc_lopt core run per seed
(which lopt's own tests tie to SmallFCLOpt), and one ``train_task`` call ≡ separate loops with
the same inits and batches."""

from __future__ import annotations

import pytest
import torch

import lopt
import tasks
from metatrain.evaluation.optimizers import AdamGrid, LearnedOptimizer
from metatrain.evaluation.runner import train_task, validation_batch, validation_steps

TINY = {"image_sizes": [8], "depth": 1, "width": 12, "batch_size": 16}


def _stacked(n: int, seeds: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(n, seeds, 5, 7, generator=g),
        "b": torch.randn(n, seeds, 7, generator=g),
        "s": torch.randn(n, seeds, generator=g),  # a scalar parameter per run
    }


def _grad(p: torch.Tensor, k: int) -> torch.Tensor:
    # a deterministic, parameter-dependent gradient (so trajectories drift apart if wrong)
    return torch.sin(p) + 0.1 * (k % 3) * p


def _reference(opt_factory, start: dict[str, torch.Tensor], steps: int):
    params = {k: v.clone().requires_grad_() for k, v in start.items()}
    opt = opt_factory(list(params.values()))
    for k in range(steps):
        for p in params.values():
            p.grad = _grad(p.detach(), k)
        opt.step()
    return {k: v.detach() for k, v in params.items()}


def test_adam_grid_matches_torch_adam_at_every_lr_and_seed():
    lrs = [1e-3, 3e-2, 0.3]
    params = _stacked(len(lrs), 2)
    adam = AdamGrid(lrs)
    state = adam.init(params)
    for k in range(15):
        params, state = adam.update(params, {n: _grad(v, k) for n, v in params.items()}, state)
    start = _stacked(len(lrs), 2)
    for i, lr in enumerate(lrs):
        for s in range(2):
            one = {n: v[i, s] for n, v in start.items()}
            ref = _reference(lambda ps, lr=lr: torch.optim.Adam(ps, lr=lr), one, 15)
            for n in ref:
                torch.testing.assert_close(params[n][i, s], ref[n], rtol=1e-5, atol=1e-6)
    assert adam.labels() == ["adam lr=0.001", "adam lr=0.03", "adam lr=0.3"]


def _lopt_loop(theta, start: dict[str, torch.Tensor], steps: int, lr: float):
    """small_fc_lopt on one run with the plain (un-vmapped) functional core."""
    params, state = dict(start), lopt.init_state(start, lopt.ORIGINAL)
    for k in range(steps):
        grads = {n: _grad(v, k) for n, v in params.items()}
        params, state = lopt.update(theta, state, params, grads, lopt.ORIGINAL, lr=lr)
    return params


def test_learned_optimizer_matches_the_core_per_seed():
    theta = lopt.init_theta(lopt.ORIGINAL, torch.Generator().manual_seed(3))
    learned = LearnedOptimizer(theta, lopt.ORIGINAL, lr=0.7)
    params = _stacked(1, 3)
    state = learned.init(params)
    for k in range(6):
        params, state = learned.update(params, {n: _grad(v, k) for n, v in params.items()}, state)
    start = _stacked(1, 3)
    for s in range(3):
        one = {n: v[0, s] for n, v in start.items()}
        ref = _lopt_loop(theta, one, 6, lr=0.7)
        for n in ref:
            torch.testing.assert_close(params[n][0, s], ref[n], rtol=1e-5, atol=1e-6)


def test_validation_steps():
    assert validation_steps(30, 10) == [0, 10, 20, 30]
    assert validation_steps(25, 10) == [0, 10, 20, 25]
    assert validation_steps(30, 0) == [0, 30]


def test_train_task_equals_separate_loops_with_paired_inits_and_batches():
    family = tasks.get_family("mlp_mnist", **TINY)
    gen = torch.Generator().manual_seed(11)
    static = family.sample_static(gen)
    lane = family.sample_lane(gen, static)
    task = family.make_task(static)
    num_seeds, steps, data_seed = 2, 8, 5
    inits = tasks.stack_lanes([task.init(torch.Generator().manual_seed(s), lane) for s in (1, 2)])
    theta = lopt.init_theta(lopt.ORIGINAL, torch.Generator().manual_seed(4))
    optimizers = [LearnedOptimizer(theta, lopt.ORIGINAL), AdamGrid([1e-2, 1e-1])]
    val = validation_batch(task, 9, max_batches=3)
    curves = train_task(task, lane, inits, data_seed, val, optimizers, steps, [0, 4, 8])
    assert curves.labels == ["learned", "adam lr=0.01", "adam lr=0.1"]
    assert curves.train_loss.shape == (3, num_seeds, steps)
    assert curves.val_loss.shape == curves.val_accuracy.shape == (3, num_seeds, 3)
    assert val["x"].shape[0] == 3 * 16

    stream = task.batches("train", num_seeds, data_seed)
    batches = [next(stream) for _ in range(steps)]
    for o, lr in enumerate([None, 1e-2, 1e-1]):  # None: the learned optimizer
        for s in range(num_seeds):
            params = {k: v[s].clone().requires_grad_() for k, v in inits.items()}
            adam = torch.optim.Adam(params.values(), lr=lr) if lr else None
            state = lopt.init_state(params, lopt.ORIGINAL)
            losses = []
            for batch in batches:
                loss = task.loss(params, {k: v[s] for k, v in batch.items()}, lane)
                grads = torch.autograd.grad(loss, list(params.values()))
                losses.append(loss.item())
                with torch.no_grad():
                    if adam is not None:
                        for p, g in zip(params.values(), grads):
                            p.grad = g
                        adam.step()
                    else:
                        new, state = lopt.update(
                            theta, state, params, dict(zip(params, grads)), lopt.ORIGINAL
                        )
                        params = {k: v.requires_grad_() for k, v in new.items()}
            torch.testing.assert_close(
                curves.train_loss[o, s], torch.tensor(losses), rtol=1e-4, atol=1e-5
            )
            with torch.no_grad():
                final = task.metrics(params, val, lane)
            torch.testing.assert_close(
                curves.val_loss[o, s, -1], final["loss"], rtol=1e-4, atol=1e-5
            )
    # every optimizer starts from the same init on the same first batch (paired comparison)
    assert torch.equal(curves.train_loss[0, :, 0], curves.train_loss[1, :, 0])
    assert not torch.equal(curves.train_loss[0, 0, :], curves.train_loss[0, 1, :])
    with pytest.raises(ValueError, match="validation steps"):
        train_task(task, lane, inits, data_seed, val, optimizers, steps, [0, steps + 1])
