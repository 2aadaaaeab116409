"""Argument checks of ``lozoo::small_fc_step_`` for the pure-torch twin and the fake kernel.

Mirrors ``csrc/small_fc_checks.h`` message for message, so every backend rejects a bad call with
the same words (tests/test_kernels_ops.py asserts them for each backend).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NUM_FEATURES = 39
NUM_DECAYS = 7
_PREFIX = "lozoo::small_fc_step_: "
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dtype(dt: torch.dtype) -> str:
    # ATen prints scalar types as Float / BFloat16 / Half; match it.
    return {
        torch.float32: "Float",
        torch.bfloat16: "BFloat16",
        torch.float16: "Half",
        torch.float64: "Double",
        torch.int64: "Long",
        torch.int32: "Int",
    }.get(dt, str(dt).removeprefix("torch."))


def _shape(shape: Sequence[int]) -> str:
    shape = tuple(int(s) for s in shape)
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _fail(message: str) -> None:
    raise RuntimeError(_PREFIX + message)


def _check_state(t: torch.Tensor, name: str, want: tuple[int, ...], param: torch.Tensor) -> None:
    if t.device != param.device:
        _fail(f"{name} is on {t.device} but param is on {param.device}")
    if t.dtype != torch.float32:
        _fail(f"{name} must be float32 state, got {_dtype(t.dtype)}")
    if tuple(t.shape) != want:
        _fail(
            f"{name} has shape {_shape(t.shape)} but a param of shape {_shape(param.shape)} "
            f"needs {_shape(want)}"
        )
    if not t.is_contiguous():
        _fail(f"{name} must be contiguous")


def check_step_args(
    param: torch.Tensor,
    grad: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor | None,
    c: torch.Tensor | None,
    vd: torch.Tensor | None,
    decays: torch.Tensor,
    layers: Sequence[torch.Tensor],
    d1: int,
    d0: int,
) -> int:
    """Raise ``RuntimeError`` on any malformed argument; return the MLP width h."""
    if param.dtype not in _PARAM_DTYPES:
        _fail(f"param must be float32, bfloat16 or float16, got {_dtype(param.dtype)}")
    if grad.dtype != param.dtype:
        _fail(f"grad must have param's dtype ({_dtype(param.dtype)}), got {_dtype(grad.dtype)}")
    if grad.shape != param.shape:
        _fail(f"grad has shape {_shape(grad.shape)} but param has shape {_shape(param.shape)}")
    if grad.device != param.device:
        _fail(f"grad is on {grad.device} but param is on {param.device}")
    if not param.is_contiguous():
        _fail("param must be contiguous (it is updated in place)")
    shape = tuple(param.shape) or (1,)
    rank = len(shape)
    _check_state(m, "m", (*shape, 3), param)
    _check_state(v, "v", (*shape, 1), param)
    if rank >= 2:
        if not (0 <= d0 < rank and 0 <= d1 < rank and d0 != d1):
            _fail(f"(d1, d0) = ({d1}, {d0}) are not two distinct axes of a rank-{rank} param")
        if r is None or c is None or vd is not None:
            _fail(f"a rank-{rank} param needs the factored state r and c, and no vd")
        _check_state(r, "r", (*(s for i, s in enumerate(shape) if i != d0), 3), param)
        _check_state(c, "c", (*(s for i, s in enumerate(shape) if i != d1), 3), param)
    else:
        if d0 != -1 or d1 != -1:
            _fail(
                f"a rank-{param.dim()} param has no factored axes; pass d1 = d0 = -1, "
                f"got ({d1}, {d0})"
            )
        if vd is None or r is not None or c is not None:
            _fail(f"a rank-{param.dim()} param needs the non-factored state vd, and no r or c")
        _check_state(vd, "vd", (*shape, 3), param)
    if not (
        decays.device == param.device
        and decays.dtype == torch.float32
        and decays.numel() == NUM_DECAYS
        and decays.is_contiguous()
    ):
        _fail(
            "decays must be a contiguous float32 tensor of 7 elements on param's device, got "
            f"{_dtype(decays.dtype)} of shape {_shape(decays.shape)} on {decays.device}"
        )
    return _check_layers(layers, param)


def _check_layers(layers: Sequence[torch.Tensor], param: torch.Tensor) -> int:
    nl = len(layers)
    if nl < 4 or nl % 2:
        _fail(
            "layers must be [w0, b0, w1, b1, ..., wL, bL] with at least two weight matrices, "
            f"got {nl} tensors"
        )
    w0 = layers[0]
    h = int(w0.shape[1]) if w0.dim() == 2 else -1
    if h < 1:
        _fail(f"layers[0] (w0) must have shape (39, h), got {_shape(w0.shape)}")
    for i, w in enumerate(layers):
        k = i // 2
        fan_in = NUM_FEATURES if k == 0 else h
        fan_out = 2 if 2 * k + 2 == nl else h
        want = (fan_in, fan_out) if i % 2 == 0 else (fan_out,)
        if tuple(w.shape) != want:
            kind = "b" if i % 2 else "w"
            _fail(f"layers[{i}] ({kind}{k}) must have shape {_shape(want)}, got {_shape(w.shape)}")
        if not (w.device == param.device and w.dtype == torch.float32 and w.is_contiguous()):
            _fail(
                f"layers[{i}] must be a contiguous float32 tensor on param's device, got "
                f"{_dtype(w.dtype)} on {w.device}"
            )
    return h


_LANES_PREFIX = "lozoo::small_fc_lanes_step_: "


def _lanes_fail(message: str) -> None:
    raise RuntimeError(_LANES_PREFIX + message)


def check_lanes_step_args(
    param: torch.Tensor,
    grad: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor | None,
    c: torch.Tensor | None,
    vd: torch.Tensor | None,
    decays: torch.Tensor,
    layers: Sequence[torch.Tensor],
    d1: int,
    d0: int,
    t: torch.Tensor,
) -> int:
    """The checks of ``lozoo::small_fc_lanes_step_`` (csrc/small_fc_checks.h), same messages.

    Every tensor needs the leading lane axis of ``param`` (and to be contiguous, since lanes are
    addressed by offset); lane 0's slices must then be a valid ``small_fc_step_`` call. Returns
    the MLP width h.
    """
    if param.dim() < 1:
        _lanes_fail("param needs a leading lane axis, got a 0-d tensor")
    lanes = int(param.shape[0])

    def lane_axis(x: torch.Tensor, name: str, contiguous: bool = True) -> None:
        if x.dim() < 1 or x.shape[0] != lanes:
            _lanes_fail(
                f"{name} must have param's {lanes} lanes on its leading axis, got shape "
                f"{_shape(x.shape)}"
            )
        if contiguous and not x.is_contiguous():
            _lanes_fail(f"{name} must be contiguous")

    lane_axis(param, "param")
    lane_axis(grad, "grad", contiguous=False)
    for name, x in (("m", m), ("v", v), ("r", r), ("c", c), ("vd", vd), ("decays", decays)):
        if x is not None:
            lane_axis(x, name)
    for i, w in enumerate(layers):
        lane_axis(w, f"layers[{i}]")
    if not (
        t.device == param.device
        and t.dtype == torch.float32
        and t.dim() == 1
        and t.shape[0] == lanes
        and t.is_contiguous()
    ):
        _lanes_fail(
            f"t must be a contiguous float32 tensor of shape ({lanes},) on param's device (one "
            f"step counter per lane), got {_dtype(t.dtype)} of shape {_shape(t.shape)} on "
            f"{t.device}"
        )
    if lanes == 0:
        return 0

    def first(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[0]

    try:
        return check_step_args(
            param[0], grad[0], m[0], v[0], first(r), first(c), first(vd), decays[0],
            [w[0] for w in layers], d1, d0,
        )  # fmt: skip
    except RuntimeError as err:
        raise RuntimeError(f"{_LANES_PREFIX}per lane: {err}") from None
