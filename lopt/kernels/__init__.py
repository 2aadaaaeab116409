"""Fused small_fc_lopt steps: the ``lozoo::small_fc_step_`` op, its backends and their build.

- :mod:`.ops` — the op's schema and semantics, fake kernel, ``cpp_is_available()`` /
  ``cuda_is_available()`` probes, ``theta_args()`` (the op's θ-derived arguments).
- :mod:`.torch_backend` — the chunked pure-torch twin with the op's signature.
- :mod:`.dispatch` — ``backend="auto" | "torch" | "cpp" | "cuda"`` selection.
- :mod:`.build` — cached JIT builds of ``csrc/`` (``python -m lopt.kernels build``).
"""

from .dispatch import BACKENDS, check_backend, step_function
from .ops import (
    cpp_is_available,
    cuda_is_available,
    cuda_unavailable_reason,
    load_cpp,
    theta_args,
)
from .torch_backend import small_fc_step_ as torch_small_fc_step_

__all__ = [
    "BACKENDS",
    "check_backend",
    "cpp_is_available",
    "cuda_is_available",
    "cuda_unavailable_reason",
    "load_cpp",
    "step_function",
    "theta_args",
    "torch_small_fc_step_",
]
