"""Held-out evaluation seeds are disjoint from every meta-training seed, by construction and by
an explicit check against the seeds a real meta-training worker uses."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import lopt
import metatrain.evaluation.seeds as seeds_mod
from metatrain import MetaTrainConfig, Worker, seeding
from metatrain.evaluation.seeds import (
    EVAL_NAMESPACE,
    effective,
    make_eval_seeds,
    metatrain_seeds,
)
from metatrain.seeding import METATRAIN_TAGS

ROOT = Path(__file__).resolve().parents[1]


def _quadratic_config(**overrides) -> MetaTrainConfig:
    values = dict(
        task_family="quadratic",
        num_tasks=1,
        truncation_length=2,
        schedule="constant",
        trajectory_length=4,
        num_estimators=2,
        outer_steps=3,
        seed=1234,
        progress=False,
    )
    values.update(overrides)
    return MetaTrainConfig(**values)


def test_cpu_generators_use_only_the_low_32_bits_of_a_seed():
    # Why disjointness is checked modulo 2**32 (seeds.effective).
    a = torch.rand(4, generator=torch.Generator().manual_seed(5))
    b = torch.rand(4, generator=torch.Generator().manual_seed(5 + 2**40))
    assert torch.equal(a, b)
    assert effective(5 + 2**40) == 5


def test_metatrain_tags_are_the_ones_the_trainer_uses_and_the_namespace_avoids_them():
    # Every seed of a run is derive_seed(seed, TAG_..., ...) with a tag named in
    # metatrain.seeding, whose METATRAIN_TAGS the evaluation namespace avoids.
    sources = [ROOT / "metatrain" / n for n in ("worker.py", "trainer.py", "unroll.py")]
    tags = set()
    for path in sources:
        for match in re.finditer(r"derive_seed\(\s*[\w.]+\s*,\s*(\w+)", path.read_text()):
            tags.add(match.group(1))
    assert tags, "no derive_seed calls found"
    unnamed = sorted(t for t in tags if not t.startswith("TAG_"))
    assert not unnamed, f"derive_seed with a literal tag {unnamed}: name it in metatrain.seeding"
    assert {getattr(seeding, t) for t in tags} <= set(METATRAIN_TAGS)
    assert set(METATRAIN_TAGS) == (
        set(seeding.RUN_TAGS) | set(seeding.ESTIMATOR_TAGS) | set(seeding.STREAM_TAGS)
    )
    assert EVAL_NAMESPACE[1] not in METATRAIN_TAGS


def test_enumeration_covers_a_real_worker_including_resampled_estimators():
    cfg = _quadratic_config(workers=2, resample_every=1)
    enumerated = set(metatrain_seeds(cfg.to_dict()))
    worker = Worker(cfg, worker_id=1)
    theta = lopt.flatten_theta(lopt.init_theta(lopt.ORIGINAL), lopt.ORIGINAL)
    seen = set(worker.seeds)
    for step in range(cfg.outer_steps):
        worker.compute(theta, step)
        seen.update(worker.seeds)
    assert worker.created > cfg.num_estimators  # resampling happened (probability 1 per step)
    assert seen <= enumerated
    for est in worker.estimators:
        assert est.unroll.generator.initial_seed() in enumerated  # lanes, inits, lengths
    assert seeds_mod.count_metatrain_seeds(cfg.to_dict()) == len(
        list(metatrain_seeds(cfg.to_dict()))
    )


def test_enumeration_covers_the_validation_objective_streams(monkeypatch):
    import metatrain.unroll

    drawn = []

    def spy(stream_seed):
        drawn.append(seeding.meta_stream_seed(stream_seed))
        return drawn[-1]

    monkeypatch.setattr(metatrain.unroll, "meta_stream_seed", spy)
    cfg = _quadratic_config(meta_loss_split="outer_valid")
    Worker(cfg, worker_id=0)
    assert len(drawn) == cfg.num_estimators  # one meta stream per estimator
    assert set(drawn) <= set(metatrain_seeds(cfg.to_dict()))
    plain = set(metatrain_seeds(_quadratic_config().to_dict()))
    assert not set(drawn) & plain


def test_eval_seeds_are_disjoint_distinct_and_reproducible():
    cfg = _quadratic_config().to_dict()
    made = make_eval_seeds(7, num_tasks=5, num_seeds=4, metatrain_config=cfg)
    mine = [effective(s) for s in made.all()]
    assert len(mine) == 5 * (4 + 3) == len(set(mine))
    assert not set(mine) & {effective(s) for s in metatrain_seeds(cfg)}
    assert made.checked_against == len({effective(s) for s in metatrain_seeds(cfg)})
    assert made.metatrain_seed == 1234
    assert make_eval_seeds(7, 5, 4, cfg) == made
    other = make_eval_seeds(8, 5, 4, cfg)
    assert not set(other.all()) & set(made.all())
    # more tasks or seeds keep the earlier ones: task i's seeds depend on i only
    assert make_eval_seeds(7, 6, 4, cfg).tasks[:5] == made.tasks
    record = made.to_dict()
    assert record["metatrain_seed"] == 1234 and "checked against" in record["disjoint"]["check"]


def test_a_collision_is_resalted_away(monkeypatch):
    first = make_eval_seeds(0, 2, 2)
    victim = first.tasks[1].inits[0]
    monkeypatch.setattr(seeds_mod, "metatrain_seeds", lambda cfg: iter([victim + 2**40]))
    made = make_eval_seeds(0, 2, 2, metatrain_config={"seed": 0})
    assert made.salt == 1
    assert effective(victim) not in {effective(s) for s in made.all()}


def test_unknown_or_huge_runs_fall_back_to_disjointness_by_construction():
    assert make_eval_seeds(0, 1, 1).to_dict()["disjoint"]["check"].startswith("meta-training")
    huge = _quadratic_config(resample_every=10, outer_steps=10**6).to_dict()
    made = make_eval_seeds(0, 1, 1, huge)
    assert made.checked_against == 0 and "not enumerated" in made.check
