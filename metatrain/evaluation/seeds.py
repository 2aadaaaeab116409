"""Held-out task seeds, disjoint from every seed a meta-training run used.

An evaluation is only meaningful on tasks the optimizer never trained on. Tasks, inits and data
orders are all drawn from ``torch.Generator`` seeds, so disjointness is a property of seeds, made
to hold in two ways:

1. **By construction.** Every evaluation seed is ``derive_seed(*EVAL_NAMESPACE, eval_seed,
   purpose, task, [seed index], salt)``. Every meta-training seed is ``derive_seed(run_seed, tag,
   ...)`` or ``derive_seed(estimator_seed, tag)`` with ``tag`` one of
   :data:`metatrain.seeding.METATRAIN_TAGS`; ``EVAL_NAMESPACE[1]`` is none of those, so the two
   never hash the same input.
2. **By check.** Different hash inputs can still collide in the 32 bits a CPU generator actually
   uses (``manual_seed`` keeps only the low 32 bits; tested). When the meta-training config is
   known (run dir or zoo metadata), :func:`metatrain_seeds` enumerates the seeds of that run —
   θ init, worker generators, every estimator that can have existed and its task-lane, data and
   unroll generators — and :func:`make_eval_seeds` re-salts until no evaluation seed equals any
   of them modulo 2³². Runs with ``resample_every > 0`` can create one estimator per slot
   per outer step; beyond :data:`MAX_ENUMERATED` seeds the check is skipped (and the report
   says so), leaving disjointness by construction.

Perturbation seeds (one per outer step) seed no task, init or data generator and are not
enumerated.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from metatrain.seeding import (
    ESTIMATOR_TAGS,
    METATRAIN_TAGS,
    TAG_ESTIMATOR,
    TAG_STREAMS,
    TAG_THETA_INIT,
    TAG_WORKER,
    derive_seed,
    meta_stream_seed,
)

__all__ = [
    "EVAL_NAMESPACE",
    "METATRAIN_TAGS",
    "MAX_ENUMERATED",
    "EvalSeeds",
    "count_metatrain_seeds",
    "effective",
    "make_eval_seeds",
    "metatrain_seeds",
]

EVAL_NAMESPACE = (0x6C7A6F6F, 0x6576616C)  # "lzoo", "eval": the first two words of every tuple
_TASK, _INIT, _DATA, _VALID = 1, 2, 3, 4
_MASK32 = 0xFFFFFFFF
_MAX_SALT = 64
MAX_ENUMERATED = 40_000
"""Enumerate at most this many meta-training seeds (about a second of hashing)."""


def effective(seed: int) -> int:
    """The part of a seed a CPU ``torch.Generator`` uses: its low 32 bits."""
    return int(seed) & _MASK32


@dataclass(frozen=True)
class TaskSeeds:
    """Seeds of one held-out task: its configs, one init per run seed, its data streams."""

    task: int  # static config and lane config
    inits: tuple[int, ...]  # one per evaluation seed: the init draw
    data: int  # the train streams, one stream per evaluation seed
    valid: int  # the fixed validation batches (shared by every seed and optimizer)

    def all(self) -> tuple[int, ...]:
        return (self.task, *self.inits, self.data, self.valid)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "inits": list(self.inits),
            "data": self.data,
            "valid": self.valid,
        }


@dataclass(frozen=True)
class EvalSeeds:
    eval_seed: int
    salt: int
    tasks: tuple[TaskSeeds, ...]
    metatrain_seed: int | None
    checked_against: int  # how many meta-training seeds were enumerated (0: none)
    check: str  # what the check covered, in words

    def all(self) -> list[int]:
        return [s for t in self.tasks for s in t.all()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "eval_seed": self.eval_seed,
            "namespace": list(EVAL_NAMESPACE),
            "salt": self.salt,
            "metatrain_seed": self.metatrain_seed,
            "disjoint": {
                "by_construction": True,
                "checked_against_metatrain_seeds": self.checked_against,
                "check": self.check,
                "effective_bits": 32,
            },
            "tasks": [t.to_dict() for t in self.tasks],
        }


def _eval_seed(eval_seed: int, purpose: int, *parts: int, salt: int) -> int:
    return derive_seed(*EVAL_NAMESPACE, eval_seed, purpose, *parts, salt)


def _task_seeds(eval_seed: int, task: int, num_seeds: int, salt: int) -> TaskSeeds:
    return TaskSeeds(
        task=_eval_seed(eval_seed, _TASK, task, salt=salt),
        inits=tuple(_eval_seed(eval_seed, _INIT, task, s, salt=salt) for s in range(num_seeds)),
        data=_eval_seed(eval_seed, _DATA, task, salt=salt),
        valid=_eval_seed(eval_seed, _VALID, task, salt=salt),
    )


def make_eval_seeds(
    eval_seed: int,
    num_tasks: int,
    num_seeds: int,
    metatrain_config: Mapping[str, Any] | None = None,
) -> EvalSeeds:
    """Seeds for ``num_tasks`` held-out tasks × ``num_seeds`` runs, disjoint from the run's.

    Raises ``RuntimeError`` if no salt below 64 avoids a collision (practically impossible: a
    collision needs one of a handful of 32-bit values to hit the enumerated set).
    """
    forbidden: set[int] = set()
    check = "meta-training config unknown: disjoint by construction only"
    if metatrain_config is not None:
        count = count_metatrain_seeds(metatrain_config)
        if count <= MAX_ENUMERATED:
            forbidden = {effective(s) for s in metatrain_seeds(metatrain_config)}
            check = f"checked against all {len(forbidden)} meta-training generator seeds"
        else:
            check = (
                f"not enumerated: the run may have created {count} generator seeds "
                f"(resample_every > 0), more than {MAX_ENUMERATED}; disjoint by construction"
            )
    for salt in range(_MAX_SALT):
        tasks = tuple(_task_seeds(eval_seed, i, num_seeds, salt) for i in range(num_tasks))
        mine = [effective(s) for t in tasks for s in t.all()]
        if len(set(mine)) == len(mine) and not forbidden.intersection(mine):
            return EvalSeeds(
                eval_seed=eval_seed,
                salt=salt,
                tasks=tasks,
                metatrain_seed=None if metatrain_config is None else _run_seed(metatrain_config),
                checked_against=len(forbidden),
                check=check,
            )
    raise RuntimeError(f"no disjoint evaluation seeds found for eval seed {eval_seed}")


def _run_seed(cfg: Mapping[str, Any]) -> int:
    return int(cfg.get("seed", 0))


def _estimators_per_worker(cfg: Mapping[str, Any]) -> tuple[int, int]:
    workers = max(1, int(cfg.get("workers", 0)))
    # a mixture holds --num-estimators estimators per family (metatrain.worker.estimator_families)
    num_families = len(str(cfg.get("task_family", "")).split(","))
    per_worker = int(cfg.get("num_estimators", 1)) * num_families
    if int(cfg.get("resample_every", 0)) > 0:
        per_worker *= 1 + int(cfg.get("outer_steps", 0))
    return workers, per_worker


def count_metatrain_seeds(cfg: Mapping[str, Any]) -> int:
    """How many seeds :func:`metatrain_seeds` yields for ``cfg`` (without hashing them)."""
    workers, per_worker = _estimators_per_worker(cfg)
    return 2 + workers * (1 + 4 * per_worker)


def metatrain_seeds(cfg: Mapping[str, Any]) -> Iterator[int]:
    """Every task/init/data/θ-init generator seed a meta-training run with ``cfg`` can use.

    ``cfg`` is a ``MetaTrainConfig.to_dict()``. Mirrors ``metatrain/worker.py`` and
    ``trainer.py`` (a test checks it against a real :class:`metatrain.Worker`). With
    ``resample_every > 0`` every estimator that could have been created is included (an upper
    bound: one resample per estimator slot per outer step).
    """
    seed = _run_seed(cfg)
    workers, per_worker = _estimators_per_worker(cfg)
    yield seed
    yield derive_seed(seed, TAG_THETA_INIT)
    for worker in range(workers):
        yield derive_seed(seed, TAG_WORKER, worker)  # the worker's resampling generator
        for created in range(per_worker):
            estimator = derive_seed(seed, TAG_ESTIMATOR, worker, created)  # static config
            yield estimator
            for tag in ESTIMATOR_TAGS:  # data streams, lanes/inits/lengths, full-ES lengths
                yield derive_seed(estimator, tag)
            if cfg.get("meta_loss_split", "train") != "train":  # the meta-objective's batches
                yield meta_stream_seed(derive_seed(estimator, TAG_STREAMS))
