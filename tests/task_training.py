"""Train a sampled task-family problem with a ``torch.optim`` optimizer (shared by the tests of
the bundled zoo entries)."""

from __future__ import annotations

import torch


def sample_problem(family, seed: int):
    """``(task, lane, params)`` of one sampled problem; ``params`` are fresh leaf tensors."""
    gen = torch.Generator().manual_seed(seed)
    static = family.sample_static(gen)
    task = family.make_task(static)
    lane = family.sample_lane(gen, static)
    params = {k: v.clone().requires_grad_(True) for k, v in task.init(gen, lane).items()}
    return task, lane, params


def train_losses(task, lane, params, opt, steps: int, data_seed: int) -> list[float]:
    """The training loss before each of ``steps`` steps of ``opt`` on one train-batch stream."""
    stream = task.batches("train", 1, data_seed)
    losses = []
    for _ in range(steps):
        batch = {k: v[0] for k, v in next(stream).items()}
        loss = task.loss(params, batch, lane)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
