"""Gradient estimators for meta-training: full ES, truncated ES and PES."""

from .base import Estimator, antithetic_sum, perturbations
from .full_es import FullES
from .pes import PES
from .truncated_es import TruncatedES

ESTIMATOR_NAMES = ("pes", "tes", "full_es")

__all__ = [
    "ESTIMATOR_NAMES",
    "PES",
    "Estimator",
    "FullES",
    "TruncatedES",
    "antithetic_sum",
    "perturbations",
]
