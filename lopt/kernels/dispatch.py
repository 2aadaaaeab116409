"""Backend selection for ``SmallFCLOpt(backend=...)``.

- ``"torch"``: the chunked pure-torch twin; runs anywhere.
- ``"cpp"``: the compiled CPU kernel; an error if it cannot be loaded or built, or for a
  parameter that is not on the CPU.
- ``"cuda"``: the compiled CUDA kernel; an error if torch has no CUDA, no device is visible or
  the kernel cannot be built, or for a parameter that is not on a CUDA device.
- ``"auto"`` (default): per parameter device, the compiled kernel of that device when it is
  available, else the torch twin, with one ``UserWarning`` per device type and process saying
  why it fell back.

All backends read and write the same state tensors, so a checkpoint saved with one backend
resumes with any other.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from . import ops, torch_backend

BACKENDS = ("auto", "torch", "cpp", "cuda")
StepFn = Callable[..., None]

_warned: set[str] = set()


def check_backend(backend: str) -> str:
    """Validate a backend name; for ``"cpp"``/``"cuda"`` also that it can run here."""
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r}; valid backends: " + ", ".join(repr(b) for b in BACKENDS)
        )
    if backend == "cpp":
        result = ops.load_cpp()
        if not result.ok:
            raise RuntimeError(
                f"backend='cpp' is unavailable: the compiled CPU kernel could not be loaded or "
                f"built ({result.error}); run `python -m lopt.kernels build` to see the build "
                "log, or use backend='torch'"
            )
    elif backend == "cuda":
        reason = ops.cuda_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"backend='cuda' is unavailable: {reason}; use backend='torch'")
    return backend


def check_backend_device(backend: str, device: torch.device) -> None:
    """An explicit ``backend="cpp"``/``"cuda"`` steps tensors of its own device type only."""
    want = "cpu" if backend == "cpp" else "cuda"
    if device.type != want:
        raise RuntimeError(
            f"backend={backend!r} steps {want} tensors only, got a parameter on {device}; "
            "use backend='auto' to pick a kernel per device"
        )


def _fallback(device_type: str, reason: str) -> StepFn:
    if device_type not in _warned:
        _warned.add(device_type)
        warnings.warn(
            f"SmallFCLOpt(backend='auto'): no compiled small_fc_lopt kernel for {device_type} "
            f"tensors ({reason}); using the slower pure-torch backend",
            UserWarning,
            stacklevel=4,
        )
    return torch_backend.small_fc_step_


def step_function(backend: str, device: torch.device) -> StepFn:
    """The function with the op's signature that steps a parameter on ``device``."""
    if backend == "torch":
        return torch_backend.small_fc_step_
    if backend in ("cpp", "cuda"):
        check_backend_device(backend, device)
        return ops.step_op()
    if device.type == "cpu":
        result = ops.load_cpp()
        return ops.step_op() if result.ok else _fallback("cpu", result.error)
    if device.type == "cuda":
        reason = ops.cuda_unavailable_reason()
        return ops.step_op() if reason is None else _fallback("cuda", reason)
    return _fallback(device.type, "lozoo compiles kernels for CPU and CUDA only")
