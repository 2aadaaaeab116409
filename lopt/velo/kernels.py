"""``lozoo::velo_mlp_step_``: VeLO's fused per-element step, its pure-torch twin and backends.

The op (defined in ``csrc/velo_cpu.cpp``, CUDA implementation in ``csrc/velo_cuda.cu``)::

    lozoo::velo_mlp_step_(Tensor(a!) param, Tensor grad, Tensor m, Tensor v, Tensor? r,
        Tensor? c, Tensor? row_factor, Tensor? col_factor, Tensor? vd, Tensor[] layers,
        int d1, int d0, float lr_mult, float lr, float weight_decay, float step_mult,
        float exp_mult) -> ()

does, for one tensor and **in place** on ``param``, what :func:`lopt.velo.core.tensor_step`
does after the accumulator update, followed by ``p ← p·(1 − lr·wd) − lr·step``: the 30
per-element features (read from the already updated ``m``, ``v``, ``r``/``c`` with their
row/column factors, or ``vd``), the per-channel normaliser, the tensor's MLP ``layers =
[w0 (30, h), b0, ..., wL (h, 3), bL]`` (``(in, out)``, h ≤ 16) and the step. ``param`` and
``grad`` are contiguous float32 (a scalar is passed as shape (1,)); ``grad`` is the clipped
gradient. The LSTM and hypernetwork are per tensor and tiny; they stay in torch.

:func:`velo_mlp_step_torch` is the pure-torch twin with the same signature. ``backend="auto"``
uses the compiled kernel of each device when it can, and otherwise warns once per device type
and process, naming the reason, before falling back to the twin.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from ..functional import apply_decoupled_step
from ..kernels import ops as small_fc_ops
from . import core

OP_NAME = "lozoo::velo_mlp_step_"
BACKENDS = ("auto", "torch", "cpp", "cuda")
_PREFIX = "lozoo::velo_mlp_step_: "
_warned: set[str] = set()
_fake_registered = False


def _fail(message: str) -> None:
    raise RuntimeError(_PREFIX + message)


def _check(t: torch.Tensor, name: str, want: tuple[int, ...], param: torch.Tensor) -> None:
    if t.device != param.device or t.dtype != torch.float32 or not t.is_contiguous():
        _fail(f"{name} must be a contiguous float32 tensor on param's device")
    if tuple(t.shape) != tuple(want):
        _fail(f"{name} has shape {tuple(t.shape)}, expected {tuple(want)}")


def check_args(param, grad, m, v, r, c, row_factor, col_factor, vd, layers, d1, d0) -> None:
    """The op's argument checks in Python (same conditions as ``csrc/velo_math.h``)."""
    if param.dtype != torch.float32 or not param.is_contiguous():
        _fail("param must be a contiguous float32 tensor")
    shape = tuple(param.shape) or (1,)
    _check(grad, "grad", tuple(param.shape), param)
    _check(m, "m", (*shape, 3), param)
    _check(v, "v", (*shape, 1), param)
    if len(shape) >= 2:
        axes = range(len(shape))
        if d0 not in axes or d1 not in axes or d0 == d1:
            _fail(f"(d1, d0) = ({d1}, {d0}) are not two distinct axes of a rank-{len(shape)} param")
        if None in (r, c, row_factor, col_factor) or vd is not None:
            _fail(f"a rank-{len(shape)} param needs r, c, row_factor and col_factor, and no vd")
        without_d0 = tuple(s for a, s in enumerate(shape) if a != d0) + (3,)
        without_d1 = tuple(s for a, s in enumerate(shape) if a != d1) + (3,)
        _check(r, "r", without_d0, param)
        _check(c, "c", without_d1, param)
        _check(row_factor, "row_factor", without_d0, param)
        _check(col_factor, "col_factor", without_d1, param)
    else:
        if (d1, d0) != (-1, -1) or vd is None or any(x is not None for x in (r, c)):
            _fail(f"a rank-{param.dim()} param needs vd only, and d1 = d0 = -1")
        _check(vd, "vd", (*shape, 3), param)
    if len(layers) < 4 or len(layers) % 2:
        _fail(f"layers must be [w0, b0, ..., wL, bL] with at least two weight matrices, got "
              f"{len(layers)} tensors")  # fmt: skip
    h = layers[0].shape[1] if layers[0].dim() == 2 else -1
    if not 1 <= h <= 16:
        _fail(f"layers[0] (w0) must have shape (30, h) with 1 <= h <= 16, got "
              f"{tuple(layers[0].shape)}")  # fmt: skip


def velo_mlp_step_torch(
    param: torch.Tensor,
    grad: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor | None,
    c: torch.Tensor | None,
    row_factor: torch.Tensor | None,
    col_factor: torch.Tensor | None,
    vd: torch.Tensor | None,
    layers: Sequence[torch.Tensor],
    d1: int,
    d0: int,
    lr_mult: float,
    lr: float,
    weight_decay: float,
    step_mult: float,
    exp_mult: float,
) -> None:
    """The op in pure torch (:mod:`lopt.velo.core`'s functions), same signature and semantics."""
    check_args(param, grad, m, v, r, c, row_factor, col_factor, vd, layers, d1, d0)
    shaped = param.reshape(tuple(param.shape) or (1,))
    g = grad.reshape(shaped.shape)
    state = {"m": m, "v": v, **({"vd": vd} if vd is not None else {"r": r, "c": c})}
    acc = core.Accumulated(state, g, row_factor, col_factor)
    fd = None if vd is not None else (d1, d0)
    with torch.no_grad():
        features = core.element_features(shaped, acc, fd)
        pairs = [(layers[i], layers[i + 1]) for i in range(0, len(layers), 2)]
        step = core.mlp_step(shaped, features, pairs, lr_mult, step_mult, exp_mult)
        shaped.copy_(apply_decoupled_step(shaped, step, lr, weight_decay))


def _fake(param, grad, m, v, r, c, row_factor, col_factor, vd, layers, d1, d0, lr_mult, lr,
          weight_decay, step_mult, exp_mult) -> None:  # fmt: skip
    check_args(param, grad, m, v, r, c, row_factor, col_factor, vd, layers, d1, d0)


def cpu_unavailable_reason(build_if_needed: bool = True) -> str | None:
    """``None`` when the compiled CPU kernel can run here, else why not."""
    global _fake_registered
    result = small_fc_ops.load_cpp(build_if_needed)
    if not result.ok:
        return f"the compiled CPU library is unavailable ({result.error})"
    if not hasattr(torch.ops.lozoo, "velo_mlp_step_"):
        return (
            "the loaded CPU library predates VeLO's kernel (rebuild: python -m lopt.kernels build)"
        )
    if not _fake_registered:
        torch.library.register_fake(OP_NAME)(_fake)
        _fake_registered = True
    return None


def cuda_unavailable_reason(build_if_needed: bool = True) -> str | None:
    """``None`` when the compiled CUDA kernel can run here, else why not."""
    reason = cpu_unavailable_reason(build_if_needed)
    return reason or small_fc_ops.cuda_unavailable_reason(build_if_needed)


def op() -> Callable[..., None]:
    return torch.ops.lozoo.velo_mlp_step_.default


def check_backend(backend: str) -> str:
    """Validate ``backend``; ``"cpp"``/``"cuda"`` must also be able to run here."""
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r} for VeLO; valid backends: "
            + ", ".join(repr(b) for b in BACKENDS)
        )
    reason = {"cpp": cpu_unavailable_reason, "cuda": cuda_unavailable_reason}.get(
        backend, lambda: None
    )()
    if reason is not None:
        raise RuntimeError(f"VeLO backend={backend!r} is unavailable: {reason}; use 'torch'")
    return backend


def step_function(backend: str, device: torch.device) -> Callable[..., None]:
    """The function with the op's signature that steps a tensor on ``device``."""
    if backend == "torch":
        return velo_mlp_step_torch
    want = {"cpp": "cpu", "cuda": "cuda"}.get(backend)
    if want is not None:
        if device.type != want:
            raise RuntimeError(
                f"VeLO backend={backend!r} steps {want} tensors only, got one on {device}; use "
                "backend='auto' to pick a kernel per device"
            )
        return op()
    if device.type == "cpu":
        reason = cpu_unavailable_reason()
    elif device.type == "cuda":
        reason = cuda_unavailable_reason()
    else:
        reason = "lozoo compiles kernels for CPU and CUDA only"
    if reason is None:
        return op()
    if device.type not in _warned:
        _warned.add(device.type)
        warnings.warn(
            f"VeLO(backend='auto'): no compiled VeLO kernel for {device.type} tensors ({reason}); "
            "using the slower pure-torch backend",
            UserWarning,
            stacklevel=4,
        )
    return velo_mlp_step_torch
