"""Meta-training of learned optimizers (any registered architecture) with ES, truncated ES
and PES over vectorised unrolls."""

import lopt  # noqa: F401  (first: it keeps `tasks`/`zoo` folders in the cwd from shadowing ours)

from .config import PRESETS, QUICK, MetaTrainConfig
from .estimators import PES, FullES, TruncatedES
from .trainer import RunResult, train
from .unroll import TaskLanes, VectorizedUnroll
from .worker import Worker, WorkerResult

__all__ = [
    "PES",
    "PRESETS",
    "QUICK",
    "FullES",
    "MetaTrainConfig",
    "RunResult",
    "TaskLanes",
    "TruncatedES",
    "VectorizedUnroll",
    "Worker",
    "WorkerResult",
    "train",
]
