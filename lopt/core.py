"""The functional core of small_fc_lopt (design: docs/design/small_fc_lopt.md).

Everything here is a pure function of tensors: nothing is mutated, new state is returned. The
same code runs

* inside :class:`lopt.SmallFCLOpt` (one tensor at a time),
* inside the meta-trainer under ``torch.func.vmap`` over perturbed θ and lanes, and
* as the reference the fused C++/CUDA kernels are tested against.

Layout convention (docs/design/layout.md). PyTorch stores Linear weights as ``(out, in)`` and conv
weights as ``(out, in, kh, kw)``, the reverse of the JAX reference's ``(in, out)`` / ``(kh, kw, in,
out)``. The factored statistics only depend on the layout when the two largest dims tie. lozoo never
transposes tensors; instead the tie rule is a config option: ``tie_break="first"`` (default)
reproduces the reference on PyTorch-layout tensors because reversing the axis order maps the
reference's "later axis wins" onto "earlier axis wins"; ``tie_break="last"`` applies the raw rule to
the tensor as stored, which is what PyLO does.

State of one parameter tensor with shape S (decay axis trailing, as in the reference; a scalar is
stored with S = (1,)): ``m`` S+(3,), ``v`` S+(1,), and either ``r`` (S without d0)+(3,) and ``c``
(S without d1)+(3,) for rank ≥ 2, or ``vd`` S+(3,) for rank ≤ 1. The step counter ``t`` is kept by
the caller and passed in as the *pre-increment* value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from .config import NUM_ELEMENT_FEATURES, TIME_SCALES, SmallFCConfig, TieBreak
from .functional import apply_decoupled_step

TensorState = dict[str, torch.Tensor]
Decays = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Epsilons of the reference, named after the place they guard (design §4-§5).
_EPS_GSQ = 1e-30  # added to g² in the factored / non-factored accumulators
_EPS_RSQRT = 1e-9  # floor of safe_rsqrt and the row-mean guard
_EPS_RMS = 1e-6  # rsqrt(v + eps) and the 1-D momentum factor
_EPS_ROWCOL = 1e-8  # rsqrt(row/col + eps) features
_EPS_NORM = 1e-5  # per-channel feature normalisation


def factored_dims(shape: tuple[int, ...] | torch.Size, tie_break: TieBreak = "first"):
    """The two factored axes ``(d1, d0)`` of a tensor, or ``None`` below rank 2 (design §4.1, §10).

    ``d0`` is the largest axis and ``d1`` the second largest. Ties are broken by an explicit sort
    key rather than a library argsort, whose tie behaviour is unspecified: ``"last"`` lets the
    later axis rank higher (the reference rule on its own layout), ``"first"`` the earlier one.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        return None
    if tie_break == "last":
        order = sorted(range(len(shape)), key=lambda a: (shape[a], a))
    elif tie_break == "first":
        order = sorted(range(len(shape)), key=lambda a: (shape[a], -a))
    else:
        raise ValueError(f"tie_break must be 'first' or 'last', got {tie_break!r}")
    return order[-2], order[-1]


def _decay(base: tuple[float, ...], offset: torch.Tensor) -> torch.Tensor:
    # The literal log/exp form of design §3.1, in float32, for bit parity with the reference.
    base_t = torch.tensor(base, dtype=offset.dtype, device=offset.device)
    beta = 1 - torch.exp(10 * (torch.log(1 - base_t) / 10 + offset))
    # lozoo clips all three families to [0, 1] (the reference leaves momentum unclipped); the
    # result is identical whenever every momentum decay is >= 0, as for all published weights.
    return beta.clamp(0.0, 1.0)


def effective_decays(theta: Mapping[str, torch.Tensor], cfg: SmallFCConfig) -> Decays:
    """``(β_momentum (3,), β_rms (1,), β_adafactor (3,))`` from θ's decay offsets."""
    return (
        _decay(cfg.initial_momentum_decays, theta["momentum_decays"]),
        _decay(cfg.initial_rms_decays, theta["rms_decays"]),
        _decay(cfg.initial_adafactor_decays, theta["adafactor_decays"]),
    )


def state_shapes(shape: tuple[int, ...] | torch.Size, cfg: SmallFCConfig) -> dict:
    """Shapes of the per-tensor state entries for a parameter of ``shape``."""
    shape = tuple(int(s) for s in shape) or (1,)
    return accumulator_shapes(shape, factored_dims(shape, cfg.tie_break))


def accumulator_shapes(shape: tuple[int, ...], fd: tuple[int, int] | None) -> dict:
    """Shapes of ``m`` and ``v`` and of ``r``/``c`` (factored axes ``fd``) or ``vd`` (``None``).

    The three-decay accumulators small_fc_lopt and VeLO share; ``shape`` is already at least 1-D.
    """
    out = {"m": shape + (3,), "v": shape + (1,)}
    if fd is None:
        out["vd"] = shape + (3,)
    else:
        d1, d0 = fd
        out["r"] = tuple(s for a, s in enumerate(shape) if a != d0) + (3,)
        out["c"] = tuple(s for a, s in enumerate(shape) if a != d1) + (3,)
    return out


def init_tensor_state(param: torch.Tensor, cfg: SmallFCConfig) -> TensorState:
    """Zero float32 state for one parameter tensor (no bias correction anywhere, design §4)."""
    return {
        k: torch.zeros(s, dtype=torch.float32, device=param.device)
        for k, s in state_shapes(param.shape, cfg).items()
    }


def init_state(params: Mapping[str, torch.Tensor], cfg: SmallFCConfig) -> dict:
    """Optimizer state for a dict of parameters: ``{"t": 0-d float32, "tensors": {name: ...}}``."""
    device = next(iter(params.values())).device if params else None
    return {
        "t": torch.zeros((), dtype=torch.float32, device=device),
        "tensors": {name: init_tensor_state(p, cfg) for name, p in params.items()},
    }


def _safe_rsqrt(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_min(_EPS_RSQRT).rsqrt()


class Accumulated(NamedTuple):
    """Result of the accumulator pass: the new state and the per-element raw features."""

    state: TensorState
    features: torch.Tensor  # S + (28,), un-normalised, channel order of design §5


class ElementInputs(NamedTuple):
    """Per-element broadcasts of the second-moment statistics that feed channels 10-27.

    ``fac_g = g·g_mult`` and ``fac_m = m·m_mult``; ``row``/``col`` and their ``rsqrt`` are the
    factored statistics broadcast back to S+(3,) (for rank ≤ 1 all of them come from ``vd``).
    """

    g_mult: torch.Tensor
    m_mult: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    row_rs: torch.Tensor
    col_rs: torch.Tensor


# The building blocks below are what :func:`accumulate` is made of. They are public so that the
# chunked backend (lopt.kernels.torch_backend) runs the very same math on slices of a tensor.
def ema(beta: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``β·old + (1 − β)·new``: every accumulator of design §4 (no bias correction)."""
    return beta * old + (1 - beta) * new


def moments(
    g3: torch.Tensor, m: torch.Tensor, v: torch.Tensor, bm: torch.Tensor, bv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """New momenta S+(3,) and RMS S+(1,) from ``g3 = grad[..., None]``."""
    return ema(bm, m, g3), ema(bv, v, g3 * g3)


def squared_grad(g3: torch.Tensor) -> torch.Tensor:
    """``g² + 1e-30``, the input of the factored / non-factored accumulators."""
    return g3 * g3 + _EPS_GSQ


def row_col_factors(
    r: torch.Tensor, c: torch.Tensor, d1: int, d0: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adafactor row factor (shape of ``r``) and column factor (shape of ``c``), design §4.2.

    Only ``r`` is normalised, by its mean over axis d1 alone (trap T1: not over the decays, and
    for rank ≥ 3 not over the other axes either).
    """
    d1_in_r = d1 - int(d1 > d0)  # where axis d1 sits once d0 is removed
    row_factor = _safe_rsqrt(r / (r.mean(d1_in_r, keepdim=True) + _EPS_RSQRT))
    return row_factor, _safe_rsqrt(c)


def factored_inputs(
    r: torch.Tensor,
    c: torch.Tensor,
    row_factor: torch.Tensor,
    col_factor: torch.Tensor,
    d1: int,
    d0: int,
    full: tuple[int, ...],
) -> ElementInputs:
    """Broadcast the factored statistics to the elements of shape ``full`` = S+(3,)."""
    both = row_factor.unsqueeze(d0) * col_factor.unsqueeze(d1)
    return ElementInputs(
        g_mult=both,
        m_mult=both,
        row=r.unsqueeze(d0).expand(full),
        col=c.unsqueeze(d1).expand(full),
        row_rs=(r + _EPS_ROWCOL).rsqrt().unsqueeze(d0).expand(full),
        col_rs=(c + _EPS_ROWCOL).rsqrt().unsqueeze(d1).expand(full),
    )


def unfactored_inputs(vd: torch.Tensor) -> ElementInputs:
    """Rank 0/1 (design §5.2): every statistic is the per-element ``vd``."""
    rs = (vd + _EPS_ROWCOL).rsqrt()
    return ElementInputs(
        g_mult=_safe_rsqrt(vd + _EPS_RSQRT),
        m_mult=(vd + _EPS_RMS).rsqrt(),
        row=vd,
        col=vd,
        row_rs=rs,
        col_rs=rs,
    )


def element_features(
    g3: torch.Tensor, p3: torch.Tensor, m: torch.Tensor, v: torch.Tensor, inputs: ElementInputs
) -> torch.Tensor:
    """The 28 raw features, S+(28,), in the channel order of design §5 (the row order of ``w0``)."""
    rv = (v + _EPS_RMS).rsqrt()
    fac_g, fac_m = g3 * inputs.g_mult, m * inputs.m_mult
    return torch.cat(
        [g3, p3, m, v, m * rv, rv, fac_g, inputs.row, inputs.col]
        + [inputs.row_rs, inputs.col_rs, fac_m],
        dim=-1,
    )


def accumulate(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    decays: Decays,
    cfg: SmallFCConfig,
) -> Accumulated:
    """Update the accumulators with ``grad`` and build the 28 raw features (design §4.4 steps 2-3).

    ``param`` and ``grad`` must already have rank ≥ 1 (scalars are promoted by the caller).
    """
    bm, bv, bf = decays
    g3 = grad.unsqueeze(-1)
    m, v = moments(g3, state["m"], state["v"], bm, bv)
    gs = squared_grad(g3)
    fd = factored_dims(param.shape, cfg.tie_break)
    if fd is not None:
        d1, d0 = fd
        r = ema(bf, state["r"], gs.mean(d0))
        c = ema(bf, state["c"], gs.mean(d1))
        row_factor, col_factor = row_col_factors(r, c, d1, d0)
        inputs = factored_inputs(r, c, row_factor, col_factor, d1, d0, (*param.shape, 3))
        new_state = {"m": m, "v": v, "r": r, "c": c}
    else:
        vd = ema(bf, state["vd"], gs)
        inputs = unfactored_inputs(vd)
        new_state = {"m": m, "v": v, "vd": vd}
    features = element_features(g3, param.unsqueeze(-1), m, v, inputs)
    return Accumulated(new_state, features)


def feature_scale(features: torch.Tensor) -> torch.Tensor:
    """Per-channel normaliser ``rsqrt(1e-5 + mean(X_j²))`` over every element (design §5.3)."""
    dims = tuple(range(features.dim() - 1))
    return scale_from_mean_square(features.square().mean(dim=dims))


def scale_from_mean_square(mean_square: torch.Tensor) -> torch.Tensor:
    """``rsqrt(1e-5 + mean(X_j²))`` from the per-channel mean squares (chunked callers)."""
    return (_EPS_NORM + mean_square).rsqrt()


def time_features(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``tanh(t/τ_j − 1)`` for the 11 time scales, from the pre-increment counter ``t``."""
    tau = torch.tensor(TIME_SCALES, dtype=like.dtype, device=like.device)
    t = torch.as_tensor(t, device=like.device).to(like.dtype)
    return torch.tanh(t / tau - 1)


def first_layer(
    theta: Mapping[str, torch.Tensor],
    scale: torch.Tensor,
    t: torch.Tensor | float,
    num_element_features: int = NUM_ELEMENT_FEATURES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0 with normalisation folded into its weights and time features into its bias.

    Returns ``(w0' (n, h), b0' (h,))`` with ``w0'[j] = s_j·w0[j]`` and
    ``b0' = b0 + tanh(t/τ − 1) @ w0[n:]`` (design §13), ``n`` the per-element channels (28 for
    small_fc_lopt; mlp_lopt passes its own). Both rewrites are exact up to rounding and spare the
    per-element work on 11 constant channels.
    """
    w0 = theta["w0"]
    n = num_element_features
    w0_scaled = w0[:n] * scale.unsqueeze(-1)
    b0 = theta["b0"] + time_features(t, w0) @ w0[n:]
    return w0_scaled, b0


def mlp_outputs(
    theta: Mapping[str, torch.Tensor],
    features: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    num_layers: int,
) -> torch.Tensor:
    """Run the MLP on raw features with a folded first layer; returns ``(..., 2)`` = (d, m)."""
    h = torch.relu(features @ w0 + b0)
    for k in range(1, num_layers - 1):
        h = torch.relu(h @ theta[f"w{k}"] + theta[f"b{k}"])
    last = num_layers - 1
    return h @ theta[f"w{last}"] + theta[f"b{last}"]


def step_from_outputs(outputs: torch.Tensor, cfg: SmallFCConfig) -> torch.Tensor:
    """``step_mult · d · exp(exp_mult · m)`` (design §6)."""
    return cfg.step_mult * outputs[..., 0] * torch.exp(cfg.exp_mult * outputs[..., 1])


def tensor_step(
    theta: Mapping[str, torch.Tensor],
    param: torch.Tensor,
    grad: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    t: torch.Tensor | float,
    cfg: SmallFCConfig,
    decays: Decays | None = None,
) -> tuple[torch.Tensor, TensorState]:
    """The learned step of one tensor: returns ``(step, new_state)`` with ``p_new = p − step``.

    Pure and differentiable in θ; ``vmap``-able over θ, params, grads, state and ``t``.
    ``decays`` may be passed in to compute them once for many tensors.
    """
    if decays is None:
        decays = effective_decays(theta, cfg)
    scalar = param.dim() == 0
    if scalar:  # design §4.3: a scalar takes the rank-1 path with one element
        param, grad = param.reshape(1), grad.reshape(1)
    acc = accumulate(param, grad, state, decays, cfg)
    w0, b0 = first_layer(theta, feature_scale(acc.features), t)
    out = mlp_outputs(theta, acc.features, w0, b0, len(cfg.layer_sizes()))
    step = step_from_outputs(out, cfg)
    return (step.reshape(()) if scalar else step), acc.state


def update(
    theta: Mapping[str, torch.Tensor],
    state: Mapping,
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    cfg: SmallFCConfig,
    *,
    lr: float | torch.Tensor = 1.0,
    weight_decay: float = 0.0,
    loss: torch.Tensor | None = None,
    num_steps: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """One small_fc_lopt step over a dict of parameters (design §4.4, §6).

    ``state`` comes from :func:`init_state`. Returns ``(new_params, new_state)``; the counter is
    incremented after the update, so the time features see the pre-increment value. ``lr``
    multiplies the step and weight decay is decoupled: ``p ← p·(1 − lr·wd) − lr·step``.
    ``loss`` and ``num_steps`` are part of the architecture interface; small_fc_lopt uses
    neither (its only notion of progress is ``t``).
    """
    del loss, num_steps
    decays = effective_decays(theta, cfg)
    t = state["t"]
    new_params: dict[str, torch.Tensor] = {}
    new_tensors: dict[str, TensorState] = {}
    for name, p in params.items():
        step, new_tensors[name] = tensor_step(
            theta, p, grads[name], state["tensors"][name], t, cfg, decays
        )
        new_params[name] = apply_decoupled_step(p, step, lr, weight_decay)
    return new_params, {"t": t + 1, "tensors": new_tensors}


def tensor_features(
    theta: Mapping[str, torch.Tensor],
    param: torch.Tensor,
    grad: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    t: torch.Tensor | float,
    cfg: SmallFCConfig,
) -> dict[str, torch.Tensor]:
    """Inspection helper: the 39 MLP inputs (normalised, time features appended) and outputs.

    Returns ``{"features": S+(39,), "direction": S, "magnitude": S, "step": S}`` for one step
    from ``state``. Slower than :func:`tensor_step` (it materialises all 39 channels); meant for
    notebooks and tests, not for training.
    """
    decays = effective_decays(theta, cfg)
    p, g = (param.reshape(1), grad.reshape(1)) if param.dim() == 0 else (param, grad)
    acc = accumulate(p, g, state, decays, cfg)
    normed = acc.features * feature_scale(acc.features)
    tf = time_features(t, normed).expand(*normed.shape[:-1], len(TIME_SCALES))
    x = torch.cat([normed, tf], dim=-1)
    unit_scale = torch.ones(NUM_ELEMENT_FEATURES, dtype=x.dtype, device=x.device)
    w0, b0 = first_layer(theta, unit_scale, t)
    out = mlp_outputs(theta, normed, w0, b0, len(cfg.layer_sizes()))
    shape = param.shape
    return {
        "features": x.reshape(*shape, x.shape[-1]),
        "direction": out[..., 0].reshape(shape),
        "magnitude": out[..., 1].reshape(shape),
        "step": step_from_outputs(out, cfg).reshape(shape),
    }
