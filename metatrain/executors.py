"""Executors: who computes the workers' gradients. The trainer only sees this seam.

``SerialExecutor`` runs every worker in this process, one after the other: the default for
tests and debugging (Ray's ``local_mode`` no longer exists), and bit-reproducible. With the same
``--workers N`` it computes exactly what a Ray run in sync mode computes (same worker ids, same
seeds, same averaging order), and both write the same checkpoint layout, so a run can be
compared or resumed across the two. ``RayExecutor`` (``ray_executor.py``) wraps each worker in
an actor.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .config import MetaTrainConfig
from .worker import Worker, WorkerResult


class Executor(Protocol):
    def gradients(self, theta: torch.Tensor, step: int) -> list[WorkerResult]:
        """Gradient results to average for outer step ``step`` at θ."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def checkpoint_workers(state: dict[str, Any], num_workers: int) -> list[dict[str, Any] | None]:
    """A checkpoint's per-worker states (``None``: saved as fresh), checked against this run."""
    if len(state["workers"]) != num_workers:
        raise ValueError(
            f"checkpoint has {len(state['workers'])} workers but this run has "
            f"{num_workers}; resume with the same --workers"
        )
    return state["workers"]


class SerialExecutor:
    def __init__(self, cfg: MetaTrainConfig, num_workers: int = 1) -> None:
        self.workers = [Worker(cfg, i) for i in range(max(1, num_workers))]

    def gradients(self, theta: torch.Tensor, step: int) -> list[WorkerResult]:
        return [w.compute(theta, step) for w in self.workers]

    def task_configs(self) -> list[dict[str, Any]]:
        return [c for w in self.workers for c in w.task_configs()]

    def state_dict(self) -> dict[str, Any]:
        return {"workers": [w.state_dict() for w in self.workers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = checkpoint_workers(state, len(self.workers))
        for worker, ws in zip(self.workers, states):
            if ws is not None:  # None: a Ray worker that was down at the checkpoint; keep fresh
                worker.load_state_dict(ws)

    def close(self) -> None:
        pass


def make_executor(cfg: MetaTrainConfig) -> Executor:
    """Serial for ``--workers 0`` or ``--executor serial``, else Ray actors."""
    if not cfg.uses_ray:
        return SerialExecutor(cfg, max(1, cfg.workers))
    from .ray_executor import RayExecutor  # imported lazily: Ray is heavy

    return RayExecutor(cfg)
