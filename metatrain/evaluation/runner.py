"""Inner training of one held-out task by every optimizer and seed at once.

All optimizer instances (the learned optimizer, Adam at each grid LR) and all seeds share one
task, so their parameters are stacked ``[O, S, ...]`` and one nested ``torch.func.vmap`` computes
every loss and gradient per step: an outer vmap over optimizers (same batch) around an inner one
over seeds (each seed its own data order). Optimizers then update their own ``[n, S, ...]``
blocks (:mod:`metatrain.evaluation.optimizers`). Within a seed every optimizer starts from the same
init and sees the same batches, so comparisons are paired.

Recorded: the train loss of every step (before the update, on that step's batch — the quantity
meta-training minimises) and, at ``val_steps``, loss and accuracy on a fixed set of
``outer_valid`` batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tasks import Task

from .optimizers import BatchedOptimizer

__all__ = ["TaskCurves", "train_task", "validation_batch", "validation_steps"]


@dataclass
class TaskCurves:
    """Raw results of one task: ``O`` optimizer instances × ``S`` seeds."""

    labels: list[str]  # one per optimizer instance, in stacking order
    train_loss: Tensor  # [O, S, K] float32
    val_steps: list[int]  # updates done at each validation point (0 … K)
    val_loss: Tensor  # [O, S, E]
    val_accuracy: Tensor | None  # [O, S, E], None for tasks without classes
    seconds: float


def validation_steps(steps: int, eval_every: int) -> list[int]:
    """0, every ``eval_every`` updates (0: none in between), and always the final ``steps``."""
    points = {0, steps}
    if eval_every > 0:
        points.update(range(eval_every, steps, eval_every))
    return sorted(points)


def validation_batch(task: Task, seed: int, max_batches: int) -> dict[str, Tensor]:
    """A fixed validation set: up to one epoch of ``outer_valid`` batches, concatenated.

    The same set serves every optimizer, seed and validation point, so differences between them
    are not sampling noise; capping at one epoch keeps small splits free of repeats.
    """
    stream = task.batches("outer_valid", 1, seed)
    n = max(1, min(max_batches, stream.batches_per_epoch))
    batches = [next(stream) for _ in range(n)]
    return {k: torch.cat([b[k][0] for b in batches]) for k in batches[0]}


def train_task(
    task: Task,
    lane_cfg: Mapping[str, Tensor],
    inits: Mapping[str, Tensor],
    train_seed: int,
    val_batch: Mapping[str, Tensor],
    optimizers: Sequence[BatchedOptimizer],
    steps: int,
    val_steps: Sequence[int],
    on_step: Callable[[int], None] | None = None,
) -> TaskCurves:
    """Train ``inits`` (``{name: [S, ...]}``) for ``steps`` updates with every optimizer.

    ``train_seed`` seeds the ``S`` train streams (stream ``s`` feeds seed ``s``). ``on_step(n)``
    is called with the number of steps just done (progress bars), about every 10 steps.
    """
    if any(not 0 <= v <= steps for v in val_steps):
        raise ValueError(f"validation steps must lie in [0, {steps}], got {list(val_steps)}")
    start = time.perf_counter()
    num_seeds = next(iter(inits.values())).shape[0]
    sizes = [opt.size for opt in optimizers]
    total = sum(sizes)
    params = {k: v.unsqueeze(0).expand(total, *v.shape).clone() for k, v in inits.items()}
    blocks = _split(params, sizes)
    states = [opt.init(block) for opt, block in zip(optimizers, blocks)]
    stream = task.batches("train", num_seeds, train_seed)
    lane = dict(lane_cfg)

    # Loss per (optimizer, seed) lane: vmap over seeds (own batch) inside vmap over optimizers
    # (shared batch). Lanes are independent, so the gradient of the summed loss is every lane's
    # own gradient; one autograd pass over the batched graph beats vmap(grad) on CPU.
    lane_loss = torch.func.vmap(
        torch.func.vmap(task.loss, in_dims=(0, 0, None)), in_dims=(0, None, None)
    )
    metric_fn = torch.func.vmap(
        torch.func.vmap(task.metrics, in_dims=(0, None, None)), in_dims=(0, None, None)
    )

    def loss_and_grad(p: dict[str, Tensor], batch: dict[str, Tensor]):
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_() for k, v in p.items()}
            loss = lane_loss(leaves, batch, lane)
            grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
        return dict(zip(leaves, grads)), loss.detach()

    val_set = set(val_steps)
    train_loss = torch.empty(total, num_seeds, steps)
    val: list[dict[str, Tensor]] = []
    pending = 0
    with torch.no_grad():
        for k in range(steps + 1):
            if k in val_set:
                val.append(dict(metric_fn(params, val_batch, lane)))
            if k == steps:
                break
            grads, loss = loss_and_grad(params, next(stream))
            train_loss[:, :, k] = loss
            new_blocks = []
            for i, (opt, p, g) in enumerate(zip(optimizers, blocks, _split(grads, sizes))):
                block, states[i] = opt.update(p, g, states[i])
                new_blocks.append(block)
            blocks = new_blocks
            params = {n: torch.cat([b[n] for b in blocks]) for n in params}
            pending += 1
            if on_step is not None and (pending == 10 or k == steps - 1):
                on_step(pending)
                pending = 0

    labels = [label for opt in optimizers for label in opt.labels()]
    acc = [v["accuracy"] for v in val] if val and "accuracy" in val[0] else None
    return TaskCurves(
        labels=labels,
        train_loss=train_loss,
        val_steps=sorted(val_set),
        val_loss=torch.stack([v["loss"] for v in val], dim=-1),
        val_accuracy=None if acc is None else torch.stack(acc, dim=-1),
        seconds=time.perf_counter() - start,
    )


def _split(tree: Mapping[str, Tensor], sizes: Sequence[int]) -> list[dict[str, Tensor]]:
    """``{name: [O, ...]}`` → one ``{name: [n_i, ...]}`` per optimizer (views, no copies)."""
    out, offset = [], 0
    for n in sizes:
        out.append({k: v[offset : offset + n] for k, v in tree.items()})
        offset += n
    return out
