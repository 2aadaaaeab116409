"""A worker owns estimators (and their lane states) and turns (θ, step) into one gradient.

Workers are the unit the executors distribute: the serial executor keeps them in-process, the
Ray executor wraps each in an actor. The learner only ever sends θ and the step number;
perturbations are re-created inside the worker from seeds derived from (run seed, step, worker,
estimator), never shipped as tensors (meta_training.md §3, §7).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import tasks

from .config import MetaTrainConfig
from .estimators import PES, Estimator, FullES, TruncatedES
from .schedules import NeverEnding, make_schedule
from .shaping import get_shaping
from .unroll import TaskLanes, VectorizedUnroll

SUMMED_METRICS = ("inner_steps", "nonfinite_grad", "resets")  # totals; other metrics average


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts; independent streams for distinct tuples."""
    words = [int(p) & 0xFFFFFFFF for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass
class WorkerResult:
    """What a worker sends back for one outer step."""

    grad: torch.Tensor
    step: int
    worker_id: int
    metrics: dict[str, float] = field(default_factory=dict)


def build_estimator(
    cfg: MetaTrainConfig,
    static_dict: dict[str, Any] | None,
    seed: int,
    family_name: str | None = None,
):
    """One estimator with its own task (static config sampled from ``seed`` unless given).

    ``family_name`` picks one family of a mixture (default: the run's only family).
    """
    family_name = family_name or cfg.families[0]
    family = tasks.get_family(family_name, **cfg.family_options(family_name))
    gen = torch.Generator().manual_seed(seed)
    static = tasks.static_from_dict(static_dict) if static_dict else family.sample_static(gen)
    task = family.make_task(static)
    problem = TaskLanes(
        task, family, static, cfg.lopt_config(), cfg.num_tasks, derive_seed(seed, 1),
        lopt_backend=cfg.lopt_backend,
    )  # fmt: skip
    shaping = get_shaping(cfg.shaping)
    if cfg.estimator == "full_es":
        lengths = make_schedule(cfg.schedule, cfg.trajectory_length, cfg.min_trajectory_length)
        unroll = VectorizedUnroll(problem, cfg.num_tasks, NeverEnding(), 0, derive_seed(seed, 2))
        est: Estimator = FullES(
            unroll, lengths, cfg.sigma, shaping, cfg.full_es_reduce, derive_seed(seed, 3)
        )
    else:
        schedule = make_schedule(cfg.schedule, cfg.trajectory_length, cfg.min_trajectory_length)
        unroll = VectorizedUnroll(
            problem, cfg.num_tasks, schedule, cfg.offset, derive_seed(seed, 2)
        )
        if cfg.estimator == "pes":
            est = PES(unroll, cfg.truncation_length, cfg.sigma, shaping, cfg.pes_reset_rule)
        else:
            est = TruncatedES(unroll, cfg.truncation_length, cfg.sigma, shaping)
    return est, static


def estimator_families(cfg: MetaTrainConfig) -> list[str]:
    """The family of each estimator slot of a worker: ``num_estimators`` per family.

    Slot ``j`` belongs to family ``j mod F`` (in ``--task-family`` order) for the whole run,
    resamples included, so a mixture's families are weighted equally and deterministically.
    """
    families = cfg.families
    return [families[j % len(families)] for j in range(cfg.num_estimators * len(families))]


class Worker:
    """Holds ``cfg.num_estimators`` estimators per task family and averages their estimates."""

    def __init__(self, cfg: MetaTrainConfig, worker_id: int = 0) -> None:
        self.cfg = cfg
        self.worker_id = worker_id
        self.generator = torch.Generator().manual_seed(derive_seed(cfg.seed, 7, worker_id))
        self.created = 0  # estimators built so far: seeds every new one uniquely
        self.slot_families = estimator_families(cfg)
        self.estimators: list[Estimator] = []
        self.statics: list[Any] = []
        self.seeds: list[int] = []
        for _ in self.slot_families:
            self._add_estimator()

    def _add_estimator(self, slot: int | None = None, static_dict=None, seed=None) -> None:
        if seed is None:
            seed = derive_seed(self.cfg.seed, 11, self.worker_id, self.created)
            self.created += 1
        index = len(self.estimators) if slot is None else slot
        est, static = build_estimator(self.cfg, static_dict, seed, self.slot_families[index])
        if slot is None:
            self.estimators.append(est)
            self.statics.append(static)
            self.seeds.append(seed)
        else:
            self.estimators[slot], self.statics[slot], self.seeds[slot] = est, static, seed

    def compute(self, theta: torch.Tensor, step: int) -> WorkerResult:
        """Average the estimators' gradients at θ for outer step ``step``."""
        grads, metrics = [], {}
        n = len(self.estimators)
        for i, est in enumerate(self.estimators):
            g, m = est.estimate(theta, derive_seed(self.cfg.seed, 13, step, self.worker_id, i))
            grads.append(g)
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + (v if k in SUMMED_METRICS else v / n)
        grad = torch.nan_to_num(torch.stack(grads).mean(0), nan=0.0, posinf=0.0, neginf=0.0)
        if self.cfg.resample_every > 0:
            for i in range(len(self.estimators)):
                u = torch.rand((), generator=self.generator).item()
                if u < 1.0 / self.cfg.resample_every:
                    self._add_estimator(slot=i)
        return WorkerResult(grad, step, self.worker_id, metrics)

    def task_configs(self) -> list[dict[str, Any]]:
        return [
            {"family": family, **s.to_dict()} for family, s in zip(self.slot_families, self.statics)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "generator": self.generator.get_state(),
            "created": self.created,
            "estimators": [
                {"family": family, "static": s.to_dict(), "seed": seed, "state": est.state_dict()}
                for family, s, seed, est in zip(
                    self.slot_families, self.statics, self.seeds, self.estimators
                )
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.created = state["created"]
        saved = [entry.get("family", self.slot_families[0]) for entry in state["estimators"]]
        if saved != self.slot_families:
            raise ValueError(
                f"checkpoint estimators belong to families {saved}, but this run's slots are "
                f"{self.slot_families}; resume with the same --task-family and --num-estimators"
            )
        self.estimators, self.statics, self.seeds = [], [], []
        for entry in state["estimators"]:
            self._add_estimator(static_dict=entry["static"], seed=entry["seed"])
            self.estimators[-1].load_state_dict(entry["state"])
