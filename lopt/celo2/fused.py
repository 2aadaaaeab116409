"""In-place Celo2 steps for the optimizer shell: the fused kernel path and the torch path.

The ``"cpp"``/``"cuda"`` paths update the accumulators with in-place torch ops, build the small
row/column statistics, then call ``lozoo::celo2_direction`` (features + MLP in two sweeps over
the tensor, never the n×30 feature matrix), run Newton–Schulz as batched GEMMs and normalise.
The ``"torch"`` path runs :func:`lopt.celo2.core.learned_direction` and copies its new state
back. Both read and write the same state, so checkpoints move freely between backends.

The kernel handles every tensor whose two largest axes are its last two (reference frame):
matrices (conv kernels under ``conv_mode="matrix"`` included), and conv kernels and stacks whose
spatial/leading axes are not larger than both channel axes. Other tensors take the torch path
(same numbers, slower).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from ..functional import apply_decoupled_step
from . import core
from .config import Celo2Config

THETA_ORDER = ("w0", "b0", "w1", "b1", "w2", "b2")
_warned: set[str] = set()


def op_is_available(device_type: str = "cpu") -> bool:
    """Whether ``lozoo::celo2_direction`` can run on ``device_type`` tensors in this process."""
    from ..kernels import ops

    if device_type == "cpu":
        ok = ops.load_cpp().ok
    elif device_type == "cuda":
        ok = ops.cuda_is_available()
    else:
        return False
    return ok and hasattr(torch.ops.lozoo, "celo2_direction")


def unavailable_reason(device_type: str) -> str:
    from ..kernels import ops

    if device_type == "cpu":
        result = ops.load_cpp()
        return "compiled, but without celo2_direction" if result.ok else result.error
    if device_type == "cuda":
        return ops.cuda_unavailable_reason() or "compiled, but without celo2_direction"
    return "lozoo compiles kernels for CPU and CUDA only"


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"torch"`` or ``"kernel"`` for a tensor on ``device``; ``"auto"`` falls back loudly."""
    if backend == "torch":
        return "torch"
    if backend in ("cpp", "cuda"):
        from ..kernels.dispatch import check_backend_device

        check_backend_device(backend, device)
        want = device.type
        if not op_is_available(want):
            raise RuntimeError(
                f"backend={backend!r} is unavailable: {unavailable_reason(want)}; run "
                "`python -m lopt.kernels build` to see the build log, or use backend='torch'"
            )
        return "kernel"
    if op_is_available(device.type):
        return "kernel"
    if device.type not in _warned:
        _warned.add(device.type)
        warnings.warn(
            f"Celo2 (backend='auto'): no compiled Celo2 kernel for {device.type} tensors "
            f"({unavailable_reason(device.type)}); using the slower pure-torch backend",
            UserWarning,
            stacklevel=4,
        )
    return "torch"


def kernel_handles(ref_shape: tuple[int, ...]) -> bool:
    """Whether the kernel covers a tensor of this reference shape (see the module doc)."""
    axes = core.factored_axes(ref_shape)
    n = len(ref_shape)
    return axes is None or set(axes) == {n - 2, n - 1}


def theta_args(theta: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """θ as the op's contiguous float32 arguments ``w0, b0, w1, b1, w2, b2``."""
    return [theta[k].detach().to(torch.float32).contiguous() for k in THETA_ORDER]


@torch.no_grad()
def kernel_direction_(
    args: list[torch.Tensor],
    p: torch.Tensor,
    g: torch.Tensor,
    state: dict,
    orthogonalize: bool,
    axes: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The (orthogonalised) direction of a float32 reference-frame tensor (rank >= 1) before the
    unit-RMS rescale (see :func:`unit_rms_scale`); updates ``state`` in place.

    ``d · unit_rms_scale(d)`` is :func:`lopt.celo2.core.reference_direction`'s ``u``; the
    accumulators are updated in place and the features + MLP run in the fused op. ``axes``
    overrides the factored axes ``(b, a)`` of the shape, which must then be its last two: a stack
    of same-shape tensors along a new leading axis keeps each tensor's own axes.
    """
    shape = tuple(p.shape)
    n = len(shape)
    g = g.contiguous()
    p = p.contiguous()
    clipped = g.clamp(-core.GRAD_CLIP, core.GRAD_CLIP)
    g3 = clipped.unsqueeze(-1)
    bf = _factored_decays(g.device)
    # m and v are advanced by the op itself (in its first sweep); the factored statistics need a
    # reduction over the whole tensor first, so they are updated here.
    q = g3 * g3 + core.EPS_GSQ
    if axes is None:
        axes = core.factored_axes(shape)
    elif set(axes) != {n - 2, n - 1}:
        raise ValueError(f"kernel_direction_: axes {axes} of shape {shape} are not its last two")
    if axes is None:
        state["v_diag"].mul_(bf).add_((1 - bf) * q)
        view = (1, 1, shape[0])
        row_stats = col_stats = None
        v_diag = state["v_diag"].view(*view, 3)
        row_by_i = False
    else:
        b, a = axes
        state["v_row"].mul_(bf).add_((1 - bf) * q.mean(a))
        state["v_col"].mul_(bf).add_((1 - bf) * q.mean(b))
        v_row, v_col = state["v_row"], state["v_col"]
        b_in_row = b - int(b > a)
        rho = (
            (v_row / (v_row.mean(b_in_row, keepdim=True) + core.EPS_SAFE))
            .clamp_min(core.EPS_SAFE)
            .rsqrt()
        )
        kappa = v_col.clamp_min(core.EPS_SAFE).rsqrt()
        lead = shape[:-2]
        lead_n = 1
        for s in lead:
            lead_n *= s
        view = (lead_n, shape[-2], shape[-1])
        row_stats = torch.cat([v_row, (v_row + core.EPS_RSQRT).rsqrt(), rho], -1)
        col_stats = torch.cat([v_col, (v_col + core.EPS_RSQRT).rsqrt(), kappa], -1)
        # statistic-major (L, 9, K): the kernel reads one statistic across a block contiguously
        row_stats = row_stats.reshape(lead_n, -1, 9).transpose(1, 2).contiguous()
        col_stats = col_stats.reshape(lead_n, -1, 9).transpose(1, 2).contiguous()
        v_diag = None
        row_by_i = b == n - 2
    if not hasattr(torch.ops.lozoo, "celo2_direction") and not op_is_available(g.device.type):
        reason = unavailable_reason(g.device.type)
        raise RuntimeError(f"lozoo::celo2_direction is unavailable: {reason}")
    d = torch.ops.lozoo.celo2_direction(
        g.view(view), p.view(view), state["m"].view(*view, 3), state["v"].view(view),
        row_stats, col_stats, v_diag, *args, row_by_i,
    ).view(shape)  # fmt: skip
    if orthogonalize and n >= 2:
        d = core.newton_schulz(d)
    return d


_decays_by_device: dict[torch.device, torch.Tensor] = {}


def _factored_decays(device: torch.device) -> torch.Tensor:
    # Made once per device: building it per step is a host-to-device copy, and on CUDA that
    # waits for the queued kernels (the host could no longer run ahead of the GPU).
    if device not in _decays_by_device:
        _decays_by_device[device] = torch.tensor(
            core.FACTORED_DECAYS, dtype=torch.float32, device=device
        )
    return _decays_by_device[device]


def unit_rms_scale(d: torch.Tensor) -> torch.Tensor:
    """``rsqrt(1e-9 + mean(d²))`` over the last two axes (keepdim): ``u = d · scale``."""
    dims = (-2, -1) if d.dim() >= 2 else (-1,)
    return (d.square().mean(dim=dims, keepdim=True) + core.EPS_SAFE).rsqrt()


@torch.no_grad()
def step_learned_(
    theta: Mapping[str, torch.Tensor],
    args: list[torch.Tensor] | None,
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    cfg: Celo2Config,
    *,
    lr: float,
    weight_decay: float,
    use_kernel: bool,
) -> None:
    """One learned-branch step of ``param`` in place (state updated in place too)."""
    p = core.to_reference(param.float(), cfg)
    g = core.to_reference(grad.float(), cfg)
    ref_shape = core.reference_shape(param.shape, cfg)
    if use_kernel and args is not None and kernel_handles(ref_shape):
        d = kernel_direction_(args, p.reshape(ref_shape), g.reshape(ref_shape), state,
                              cfg.orthogonalize)  # fmt: skip
        scale = unit_rms_scale(d)
        if param.dtype == torch.float32:  # rescale and step in one pass over the parameter
            eta = lr
            if weight_decay:
                param.mul_(1 - eta * weight_decay)
            if param.dim() == 0:
                param.add_((d * scale).reshape(()), alpha=-eta * cfg.step_mult)
            else:
                # The scale has one entry per matrix of the frame (per slice, or one for a
                # conv_mode="matrix" kernel); expanded to the frame it maps back as a view.
                scale = core.from_reference(scale.expand(ref_shape), cfg, param.shape)
                d = core.from_reference(d, cfg, param.shape)
                param.addcmul_(d, scale, value=-eta * cfg.step_mult)
            return
        u = d * scale
        u = u.reshape(()) if p.dim() == 0 else core.from_reference(u, cfg, param.shape)
    else:
        u, new_state = core.learned_direction(theta, param, grad, state, cfg)
        for key, value in new_state.items():
            state[key].copy_(value)
    _apply(param, u, lr, weight_decay, cfg.step_mult)


@torch.no_grad()
def step_adam_(
    param: torch.Tensor, grad: torch.Tensor, state: dict, t: torch.Tensor, cfg: Celo2Config, *,
    lr: float, weight_decay: float,
) -> None:  # fmt: skip
    """One Adam-branch step of ``param`` in place; ``t`` counts steps from 1."""
    direction, new_state = core.adam_direction(grad, state, t, cfg)
    for key, value in new_state.items():
        state[key].copy_(value)
    _apply(param, direction, lr * cfg.adam_lr_mult, weight_decay, cfg.step_mult)


def _apply(param: torch.Tensor, direction: torch.Tensor, eta: float, wd: float, sm: float) -> None:
    if param.dtype == torch.float32:
        if wd:
            param.mul_(1 - eta * wd)
        param.add_(direction.reshape(param.shape), alpha=-eta * sm)
    else:  # low precision: do the arithmetic in float32, round once
        direction = direction.reshape(param.shape)
        param.copy_(apply_decoupled_step(param.float(), direction, eta, wd, step_size=eta * sm))
