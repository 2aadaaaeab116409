"""Seeds of a meta-training run: one hash, and the tags that keep its streams apart.

Every generator of a run is seeded by :func:`derive_seed` of the run seed (or of an estimator's
seed) and a *tag* naming what the generator is for. The evaluation picks its held-out seeds in a
namespace no tag here uses (:mod:`metatrain.evaluation.seeds`), so the tags live in one place.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ESTIMATOR_TAGS",
    "METATRAIN_TAGS",
    "RUN_TAGS",
    "STREAM_TAGS",
    "TAG_ESTIMATOR",
    "TAG_FULL_ES_LENGTHS",
    "TAG_META_STREAM",
    "TAG_PERTURBATION",
    "TAG_STREAMS",
    "TAG_THETA_INIT",
    "TAG_UNROLL",
    "TAG_WORKER",
    "derive_seed",
    "meta_stream_seed",
]

# derive_seed(run_seed, TAG, ...)
TAG_THETA_INIT = 3  # the fresh θ (trainer)
TAG_WORKER = 7  # a worker's resampling generator: (run_seed, TAG_WORKER, worker)
TAG_ESTIMATOR = 11  # an estimator's seed: (run_seed, TAG_ESTIMATOR, worker, created)
TAG_PERTURBATION = 13  # one step's perturbations: (run_seed, TAG_PERTURBATION, step, worker, i)
RUN_TAGS = (TAG_THETA_INIT, TAG_WORKER, TAG_ESTIMATOR, TAG_PERTURBATION)

# derive_seed(estimator_seed, TAG)
TAG_STREAMS = 1  # the estimator's data streams
TAG_UNROLL = 2  # its lanes: task configs, inits, trajectory lengths
TAG_FULL_ES_LENGTHS = 3  # full ES trajectory lengths
ESTIMATOR_TAGS = (TAG_STREAMS, TAG_UNROLL, TAG_FULL_ES_LENGTHS)

# derive_seed(stream_seed, TAG), stream_seed = derive_seed(estimator_seed, TAG_STREAMS)
TAG_META_STREAM = 1  # the meta-objective's batches of a non-train --meta-loss-split
STREAM_TAGS = (TAG_META_STREAM,)

METATRAIN_TAGS = tuple(sorted(set(RUN_TAGS + ESTIMATOR_TAGS + STREAM_TAGS)))
"""Every tag a meta-training run hashes (the second word of its seed tuples)."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts; independent streams for distinct tuples."""
    words = [int(p) & 0xFFFFFFFF for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def meta_stream_seed(stream_seed: int) -> int:
    """A pair's meta-objective stream seed (``--meta-loss-split``), from its data stream's."""
    return derive_seed(stream_seed, TAG_META_STREAM)
