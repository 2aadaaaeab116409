"""A worker owns estimators (and their lane states) and turns (θ, step) into one gradient.

Workers are the unit the executors distribute: the serial executor keeps them in-process, the
Ray executor wraps each in an actor. The learner only ever sends θ and the step number;
perturbations are re-created inside the worker from seeds derived from (run seed, step, worker,
estimator), never shipped as tensors (docs/design/meta_training.md §3, §7).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import tasks

from .config import MetaTrainConfig
from .estimators import PES, Estimator, FullES, TruncatedES
from .schedules import NeverEnding, make_schedule
from .seeding import (
    TAG_ESTIMATOR,
    TAG_FULL_ES_LENGTHS,
    TAG_PERTURBATION,
    TAG_STREAMS,
    TAG_UNROLL,
    TAG_WORKER,
    derive_seed,
)
from .shaping import get_shaping
from .unroll import TaskLanes, VectorizedUnroll

log = logging.getLogger("lozoo.metatrain")

SUMMED_METRICS = ("inner_steps", "nonfinite_grad", "inner_nonfinite_skips", "resets")
"""Counts: totals over estimators and workers. Every other metric is a mean over them."""


def aggregate_metrics(parts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Combine metrics of several estimators (in a worker) or workers (in the trainer).

    One rule at both levels: counts in :data:`SUMMED_METRICS` add up, other metrics average.
    """
    if not parts:
        return {}
    n = len(parts)
    out: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            out[key] = out.get(key, 0.0) + (value if key in SUMMED_METRICS else value / n)
    return out


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
        task, family, static, cfg.lopt_config(), cfg.num_tasks, derive_seed(seed, TAG_STREAMS),
        lopt_backend=cfg.lopt_backend, meta_split=cfg.meta_loss_split,
    )  # fmt: skip
    shaping = get_shaping(cfg.shaping)
    if cfg.estimator == "full_es":
        lengths = make_schedule(cfg.schedule, cfg.trajectory_length, cfg.min_trajectory_length)
        unroll = VectorizedUnroll(
            problem, cfg.num_tasks, NeverEnding(), 0, derive_seed(seed, TAG_UNROLL)
        )
        est: Estimator = FullES(
            unroll,
            lengths,
            cfg.sigma,
            shaping,
            cfg.full_es_reduce,
            derive_seed(seed, TAG_FULL_ES_LENGTHS),
        )
    else:
        schedule = make_schedule(cfg.schedule, cfg.trajectory_length, cfg.min_trajectory_length)
        unroll = VectorizedUnroll(
            problem, cfg.num_tasks, schedule, cfg.offset, derive_seed(seed, TAG_UNROLL)
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
        self.generator = torch.Generator().manual_seed(derive_seed(cfg.seed, TAG_WORKER, worker_id))
        self.created = 0  # estimators built so far: seeds every new one uniquely
        self._warned_nonfinite = False
        self.slot_families = estimator_families(cfg)
        self.estimators: list[Estimator] = []
        self.statics: list[Any] = []
        self.seeds: list[int] = []
        for _ in self.slot_families:
            self._add_estimator()

    def _add_estimator(self, slot: int | None = None, static_dict=None, seed=None) -> None:
        if seed is None:
            seed = derive_seed(self.cfg.seed, TAG_ESTIMATOR, self.worker_id, self.created)
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
        grads, parts = [], []
        for i, est in enumerate(self.estimators):
            seed = derive_seed(self.cfg.seed, TAG_PERTURBATION, step, self.worker_id, i)
            g, m = est.estimate(theta, seed)
            take = getattr(est.unroll.problem, "take_nonfinite_skips", None)
            m["inner_nonfinite_skips"] = float(take()) if take is not None else 0.0
            if m["inner_nonfinite_skips"] and not self._warned_nonfinite:
                self._warned_nonfinite = True
                log.warning(
                    "worker %d, step %d: an inner gradient held NaN/inf; that lane tensor's "
                    "update was skipped (counted per step as inner_nonfinite_skips; shown once)",
                    self.worker_id,
                    step,
                )
            grads.append(g)
            parts.append(m)
        metrics = aggregate_metrics(parts)
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
