"""The pure-torch twin of ``lozoo::small_fc_step_``: same signature, same in-place semantics.

It runs the passes of the fused kernels (docs/design/small_fc_lopt.md §13) over slices of the
tensor, so its transient memory is bounded by the chunk size instead of 39 floats per parameter:

0. (rank ≥ 2) Σ g² along d0 and mean g² along d1, chunk by chunk → new r, c, row/col factors.
1. Per chunk: new m, v (vd) written in place; Σ of the 28 squared features per channel.
2. Fold the normalisation into w0 and the time features into b0; per chunk: features → MLP →
   step → p.

Every formula comes from :mod:`lopt.core` (one implementation of the math); this module only
slices. Chunks run along d0 (rank ≥ 2) or axis 0: the row statistic ``r`` has no d0 axis, so it is
shared by every chunk, and ``c``/its factor are sliced along d0 like the element tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from .. import core
from ..config import NUM_ELEMENT_FEATURES
from ..functional import apply_decoupled_step
from .validate import check_lanes_step_args, check_step_args

DEFAULT_CHUNK_ELEMENTS = 1 << 16
"""Elements per chunk: ~28+3h floats each are live at once (≈ 7 MiB at h = 4, 32 MiB at h = 32)."""


class _Multipliers(NamedTuple):
    # The two config fields core.step_from_outputs reads.
    step_mult: float
    exp_mult: float


def _chunks(size: int, per_slice: int, chunk_elements: int) -> Iterator[tuple[int, int]]:
    rows = max(1, chunk_elements // max(1, per_slice))
    for start in range(0, size, rows):
        yield start, min(rows, size - start)


@torch.no_grad()
def small_fc_step_(
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
    t: float,
    lr: float,
    weight_decay: float,
    step_mult: float,
    exp_mult: float,
    maximize: bool,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> None:
    """One small_fc_lopt step of one tensor, in place (see :mod:`lopt.kernels.ops` for the args)."""
    check_step_args(param, grad, m, v, r, c, vd, decays, layers, d1, d0)
    shape = tuple(param.shape) or (1,)
    n = param.numel()
    if n == 0:
        return
    p_all, g_all = param.view(shape), grad.reshape(shape)
    axis = d0 if len(shape) >= 2 else 0
    per_slice = n // shape[axis]
    bm, bv, bf = decays[0:3], decays[3:4], decays[4:7]

    def grad_chunk(start: int, size: int) -> torch.Tensor:
        g = g_all.narrow(axis, start, size).float()
        return -g if maximize else g

    factored = r is not None and c is not None
    if factored:
        d0_in_c = d0 - int(d0 > d1)
        sum_d0 = torch.zeros((*r.shape[:-1], 1), dtype=torch.float32, device=param.device)
        mean_d1 = torch.empty((*c.shape[:-1], 1), dtype=torch.float32, device=param.device)
        for start, size in _chunks(shape[axis], per_slice, chunk_elements):
            gs = core.squared_grad(grad_chunk(start, size).unsqueeze(-1))
            sum_d0 += gs.sum(d0)
            mean_d1.narrow(d0_in_c, start, size).copy_(gs.mean(d1))
        r.copy_(core.ema(bf, r, sum_d0 / shape[d0]))
        c.copy_(core.ema(bf, c, mean_d1))
        del sum_d0, mean_d1
        row_factor, col_factor = core.row_col_factors(r, c, d1, d0)

    def features(start: int, size: int, p_chunk: torch.Tensor, update: bool) -> torch.Tensor:
        g3 = grad_chunk(start, size).unsqueeze(-1)
        m_c, v_c = m.narrow(axis, start, size), v.narrow(axis, start, size)
        if update:
            new_m, new_v = core.moments(g3, m_c, v_c, bm, bv)
            m_c.copy_(new_m)
            v_c.copy_(new_v)
        if factored:
            full = (*p_chunk.shape, 3)
            c_c, cf_c = c.narrow(d0_in_c, start, size), col_factor.narrow(d0_in_c, start, size)
            inputs = core.factored_inputs(r, c_c, row_factor, cf_c, d1, d0, full)
        else:
            vd_c = vd.narrow(axis, start, size)
            if update:
                vd_c.copy_(core.ema(bf, vd_c, core.squared_grad(g3)))
            inputs = core.unfactored_inputs(vd_c)
        return core.element_features(g3, p_chunk.float().unsqueeze(-1), m_c, v_c, inputs)

    sums = torch.zeros(NUM_ELEMENT_FEATURES, dtype=torch.float64, device=param.device)
    for start, size in _chunks(shape[axis], per_slice, chunk_elements):
        x = features(start, size, p_all.narrow(axis, start, size), update=True)
        sums += x.square().sum(dim=tuple(range(x.dim() - 1)))
    scale = core.scale_from_mean_square((sums / n).float())
    theta = {f"{'wb'[i % 2]}{i // 2}": w for i, w in enumerate(layers)}
    w0, b0 = core.first_layer(theta, scale, t)
    mults = _Multipliers(step_mult, exp_mult)
    for start, size in _chunks(shape[axis], per_slice, chunk_elements):
        p_chunk = p_all.narrow(axis, start, size)
        x = features(start, size, p_chunk, update=False)
        out = core.mlp_outputs(theta, x, w0, b0, len(layers) // 2)
        step = core.step_from_outputs(out, mults)
        p_chunk.copy_(apply_decoupled_step(p_chunk.float(), step, lr, weight_decay))


@torch.no_grad()
def small_fc_lanes_step_(
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
    lr: float,
    weight_decay: float,
    step_mult: float,
    exp_mult: float,
    maximize: bool,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> None:
    """The pure-torch twin of ``lozoo::small_fc_lanes_step_``: :func:`small_fc_step_` per lane.

    Lane i is stepped on the lane-i slices with θ ``(decays[i], [w[i] for w in layers])`` and
    counter ``t[i]``, in place. A reference and a fallback, not a fast path: the meta-trainer's
    portable fast path is the vmapped functional core.
    """
    check_lanes_step_args(param, grad, m, v, r, c, vd, decays, layers, d1, d0, t)
    for lane, step in enumerate(t.tolist()):
        r_lane, c_lane, vd_lane = (None if x is None else x[lane] for x in (r, c, vd))
        small_fc_step_(
            param[lane], grad[lane], m[lane], v[lane], r_lane, c_lane, vd_lane, decays[lane],
            [w[lane] for w in layers], d1, d0, step, lr, weight_decay, step_mult, exp_mult,
            maximize, chunk_elements=chunk_elements,
        )  # fmt: skip
