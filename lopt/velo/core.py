"""The functional core of VeLO (design notes and the exact step: docs/design/velo.md).

Pure functions of tensors, like :mod:`lopt.core`: nothing is mutated, new state is returned, and
:func:`update` is differentiable in θ and ``torch.func.vmap``-able over θ, params, grads and
state. The per-element accumulators and 28 of the 30 per-element features are small_fc_lopt's
(reused from :mod:`lopt.core`, not rewritten); VeLO adds the clipped gradient, ``g·rsqrt(v)``, a
per-tensor LSTM fed with loss and training-progress features, and a hypernetwork that mixes
``param_inits`` weight banks into one small MLP per tensor.

State: ``{"t": 0-d, "tensors": {name: TensorState}, "loss": {"means", "running_min", "count"}}``.
A tensor's state holds ``m`` S+(3,), ``v`` S+(1,), ``r``/``c`` (rank ≥ 2) or ``vd`` (rank ≤ 1)
exactly as in :mod:`lopt.core`, plus its LSTM row ``lstm_h``/``lstm_c`` (H,) and ``updates`` (how
many steps it took part in: a row that has never stepped starts from θ's learned initial state).
A scalar parameter is treated as shape (1,) throughout, as in the JAX original.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from .. import core as sfc
from ..functional import apply_decoupled_step
from .config import (
    NUM_LOSS_DECAYS,
    NUM_RANK_FEATURES,
    PROGRESS_POINTS,
    VeLOConfig,
    VeLOTieBreak,
)

TensorState = dict[str, torch.Tensor]

GRAD_CLIP = 1000.0  # elementwise clip before every accumulator and feature
GRAD_FEATURE_CLIP = 0.1  # channel 1
_EPS_PARAM_RMS = 1e-9  # floor of mean(p²) in the LSTM input scale and the step's param scale
_EPS_LOG = 1e-8  # inside the log of the clipped-log statistics
_EPS_LOSS = 1e-8  # floor of the loss-feature denominator
_LOG_CLIP = 5.0
_HYPER_SCALE = 100.0  # the bank mixture is 100 · mean_k(ctrl_k · bank_k)
_LOSS_MIN_INIT = 999999999999.0
_FORGET_BIAS = 1.0


class MissingInputError(ValueError):
    """VeLO was called without the training loss or the planned number of steps."""


def check_num_steps(num_steps: object) -> int:
    """``num_steps`` as a positive int, or a clear error naming the fix."""
    if num_steps is None:
        raise MissingInputError(
            "VeLO needs num_steps, the planned total number of optimizer steps, up front: its "
            "loss features and training-progress inputs are defined relative to it. Pass "
            "num_steps=<total steps> (e.g. VeLO(params, weights, num_steps=10_000))."
        )
    if isinstance(num_steps, torch.Tensor) and num_steps.numel() == 1:
        num_steps = num_steps.item()
    if isinstance(num_steps, float) and num_steps.is_integer():
        num_steps = int(num_steps)
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    return num_steps


def factored_dims(shape: tuple[int, ...] | torch.Size, tie_break: VeLOTieBreak = "first"):
    """``(d1, d0)``: second-largest and largest axis, or ``None`` below rank 2.

    ``"first"`` is :func:`lopt.core.factored_dims` with ties going to the earlier axis, which is
    the reference rule seen through PyTorch's reversed layout. ``"pylo"`` is PyLO's rule: a stable
    ascending sort picks the last two axes ``(x, y)``; on a tie it returns ``(y, x)``, except that a
    4-D tensor tied on axes (0, 1) gets ``(0, 1)``.
    """
    shape = tuple(int(s) for s in shape)
    if tie_break == "first":
        return sfc.factored_dims(shape, "first")
    if tie_break != "pylo":
        raise ValueError(f"tie_break must be 'first' or 'pylo', got {tie_break!r}")
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda a: shape[a])  # stable: ties keep axis order
    x, y = order[-2], order[-1]
    if shape[x] != shape[y]:
        return x, y
    if len(shape) == 4 and (x, y) == (0, 1):
        return 0, 1
    return y, x


def _shape(param: torch.Tensor | torch.Size | tuple) -> tuple[int, ...]:
    shape = tuple(param.shape) if isinstance(param, torch.Tensor) else tuple(param)
    return shape or (1,)


def state_shapes(shape, cfg: VeLOConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the per-tensor state entries for a parameter of ``shape``."""
    shape = _shape(shape)
    out = sfc.accumulator_shapes(shape, factored_dims(shape, cfg.tie_break))
    out["lstm_h"] = (cfg.lstm_hidden_size,)
    out["lstm_c"] = (cfg.lstm_hidden_size,)
    out["updates"] = ()
    return out


def init_tensor_state(param: torch.Tensor, cfg: VeLOConfig) -> TensorState:
    """Zero float32 state for one tensor (no bias correction anywhere)."""
    return {
        k: torch.zeros(s, dtype=torch.float32, device=param.device)
        for k, s in state_shapes(param.shape, cfg).items()
    }


def init_loss_state(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The empty loss buffer: 10 EMAs, their running minima and the number of losses seen."""
    return {
        "means": torch.zeros(NUM_LOSS_DECAYS, dtype=torch.float32, device=device),
        "running_min": torch.full(
            (NUM_LOSS_DECAYS,), _LOSS_MIN_INIT, dtype=torch.float32, device=device
        ),
        "count": torch.zeros((), dtype=torch.float32, device=device),
    }


def init_state(params: Mapping[str, torch.Tensor], cfg: VeLOConfig) -> dict:
    """``{"t": 0-d float32, "tensors": {name: ...}, "loss": loss buffer}``."""
    device = next(iter(params.values())).device if params else None
    return {
        "t": torch.zeros((), dtype=torch.float32, device=device),
        "tensors": {name: init_tensor_state(p, cfg) for name, p in params.items()},
        "loss": init_loss_state(device),
    }


# -- loss features ------------------------------------------------------------------------------
def loss_decays(num_steps: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """Decays of the 10 loss EMAs: half-lives log-spaced from 10 to ``num_steps`` steps."""
    n = check_num_steps(num_steps)
    exponent = [1 + i * (math.log10(n) - 1) / (NUM_LOSS_DECAYS - 1) for i in range(NUM_LOSS_DECAYS)]
    values = [math.exp(-1.0 / 10**e) for e in exponent]
    if like is None:
        return torch.tensor(values, dtype=torch.float32)
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def update_loss_state(
    loss_state: Mapping[str, torch.Tensor], loss: torch.Tensor, decays: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Feed one training loss to the buffer; returns ``(new buffer, 9 loss features)``.

    The clip bound uses the *old* means debiased with the *new* count (an original quirk the
    weights were trained with); the features are 0 until three losses have been seen.
    """
    means, running_min, count = (loss_state[k] for k in ("means", "running_min", "count"))
    loss = loss.to(means.dtype)
    debias = 1 - decays ** (count + 1)
    bound = torch.where(count == 0, loss, (means / debias).max())
    clipped = torch.minimum(2 * bound.abs(), loss)
    means = decays * means + (1 - decays) * clipped
    debiased = means / debias
    running_min = torch.minimum(running_min, debiased)
    count = count + 1
    relative = (debiased[:-1] - running_min[:-1]) / (debiased[1:] - running_min[:-1]).clamp_min(
        _EPS_LOSS
    )
    features = torch.where(count <= 2, 0.0, (relative - 1).clamp(-1.0, 1.0))
    return {"means": means, "running_min": running_min, "count": count}, features


# -- per-tensor LSTM ----------------------------------------------------------------------------
def clipped_log(x: torch.Tensor) -> torch.Tensor:
    """``0.5·clip(ln(1e-8 + |10x|), −5, 5)``: the squashing of the LSTM's variance inputs."""
    return 0.5 * torch.log(_EPS_LOG + (10 * x).abs()).clamp(-_LOG_CLIP, _LOG_CLIP)


def progress_features(t: torch.Tensor, num_steps: int, like: torch.Tensor) -> torch.Tensor:
    """``tanh(10·(t/N − τ_j))`` for the 9 progress points, from the pre-increment ``t``."""
    tau = torch.tensor(PROGRESS_POINTS, dtype=like.dtype, device=like.device)
    t = torch.as_tensor(t, device=like.device).to(like.dtype)
    return torch.tanh(10 * (t / num_steps - tau))


def rank_features(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """One-hot of the number of axes longer than 1; all zero from 5 such axes on (as in JAX)."""
    rank = sum(1 for s in shape if s > 1)
    out = torch.zeros(NUM_RANK_FEATURES, dtype=like.dtype, device=like.device)
    if rank < NUM_RANK_FEATURES:
        out[rank] = 1.0
    return out


def tensor_inputs(
    param: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    progress: torch.Tensor,
    loss_features: torch.Tensor,
) -> torch.Tensor:
    """The 30 LSTM inputs of one tensor from ``p`` and the *old* momenta and rms (rank ≥ 1).

    Momenta and rms are scaled by ``1/rms(p)`` (not its square), and the rms variance is taken
    around the *momentum* mean: both quirks of the original that the weights were trained with.
    Concatenated in alphabetical key order: progress, loss, mean_rms, rank, var_m, var_rms.
    """
    axes = tuple(range(param.dim()))
    inv_scale = param.square().mean().clamp_min(_EPS_PARAM_RMS).rsqrt()
    m_hat, v_hat = m * inv_scale, v * inv_scale
    mean_m = m_hat.mean(axes)
    var_m = (m_hat - mean_m).square().mean(axes)
    mean_rms = v_hat.mean(axes)
    var_rms = (v_hat - mean_m).square().mean(axes)
    return torch.cat(
        [
            progress,
            loss_features,
            clipped_log(mean_rms),
            rank_features(tuple(param.shape), param),
            clipped_log(var_m),
            clipped_log(var_rms),
        ]
    )


class Controls(NamedTuple):
    """LSTM outputs for T tensors: bank mixture ``(T, K)``, step scale ``(T,)`` and new state."""

    mixture: torch.Tensor
    lr_mult: torch.Tensor
    h: torch.Tensor
    c: torch.Tensor


def lstm_controls(
    theta: Mapping[str, torch.Tensor], inputs: torch.Tensor, h: torch.Tensor, c: torch.Tensor
) -> Controls:
    """One LSTM step over the T rows of ``inputs`` (T, 30); rows meet only in a max-pool."""
    pooled = torch.relu(inputs @ theta["mix_w"] + theta["mix_b"]).amax(dim=-2, keepdim=True)
    x = inputs @ theta["final_mix_w"] + theta["final_mix_b"] + pooled
    gates = torch.cat([x, h], dim=-1) @ theta["lstm_w"] + theta["lstm_b"]
    i, g, f, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f + _FORGET_BIAS) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    mixture = h @ theta["controls_w"] + theta["controls_b"]
    lr_mult = (h @ theta["step_size_w"] + theta["step_size_b"]).squeeze(-1)
    return Controls(mixture, lr_mult, h, c)


def mix_banks(
    theta: Mapping[str, torch.Tensor], mixture: torch.Tensor, cfg: VeLOConfig
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-tensor MLP layers ``[(W (T, in, out), b (T, out)), ...]`` from the bank mixture."""
    coef = mixture * (_HYPER_SCALE / cfg.param_inits)
    layers = []
    for i in range(len(cfg.mlp_layer_sizes())):
        w = torch.einsum("tk,kio->tio", coef, theta[f"bank_w{i}"])
        layers.append((w, coef @ theta[f"bank_b{i}"]))
    return layers


# -- per-element features and step --------------------------------------------------------------
class Accumulated(NamedTuple):
    """The accumulator pass of one tensor: new state, the clipped gradient and, for rank ≥ 2, the
    Adafactor row/column factors (what the per-element features read)."""

    state: TensorState  # new m, v and r/c or vd
    grad: torch.Tensor  # clipped to ±1000, shape S
    row_factor: torch.Tensor | None
    col_factor: torch.Tensor | None


def update_accumulators(
    param: torch.Tensor, grad: torch.Tensor, state: Mapping[str, torch.Tensor], cfg: VeLOConfig
) -> Accumulated:
    """Momenta, rms and Adafactor statistics updated with the clipped ``grad`` (rank ≥ 1).

    These are small_fc_lopt's accumulators (:mod:`lopt.core`), with VeLO's fixed decays.
    """
    bm, bv, bf = (
        torch.tensor(d, dtype=param.dtype, device=param.device)
        for d in (cfg.momentum_decays, cfg.rms_decays, cfg.adafactor_decays)
    )
    g = grad.clamp(-GRAD_CLIP, GRAD_CLIP)
    g3 = g.unsqueeze(-1)
    m, v = sfc.moments(g3, state["m"], state["v"], bm, bv)
    gs = sfc.squared_grad(g3)
    fd = factored_dims(param.shape, cfg.tie_break)
    if fd is None:
        vd = sfc.ema(bf, state["vd"], gs)
        return Accumulated({"m": m, "v": v, "vd": vd}, g, None, None)
    d1, d0 = fd
    r = sfc.ema(bf, state["r"], gs.mean(d0))
    c = sfc.ema(bf, state["c"], gs.mean(d1))
    row_factor, col_factor = sfc.row_col_factors(r, c, d1, d0)
    return Accumulated({"m": m, "v": v, "r": r, "c": c}, g, row_factor, col_factor)


def element_features(
    param: torch.Tensor, acc: Accumulated, fd: tuple[int, int] | None
) -> torch.Tensor:
    """The 30 raw per-element features, S+(30,), from the updated accumulators.

    28 channels are small_fc_lopt's (:func:`lopt.core.element_features`); VeLO inserts
    ``clip(g, ±0.1)`` as channel 1 and ``g·rsqrt(v + 1e-6)`` as channel 14, and for rank ≤ 1
    uses ``m·vd^(−1/2)`` without an epsilon in channels 27–29.
    """
    st = acc.state
    if fd is None:
        inputs = sfc.unfactored_inputs(st["vd"])._replace(m_mult=st["vd"].rsqrt())
    else:
        d1, d0 = fd
        full = (*param.shape, 3)
        inputs = sfc.factored_inputs(st["r"], st["c"], acc.row_factor, acc.col_factor, d1, d0, full)
    g3 = acc.grad.unsqueeze(-1)
    base = sfc.element_features(g3, param.unsqueeze(-1), st["m"], st["v"], inputs)
    # base channels: 0 g | 1 p | 2-4 m | 5 v | 6-8 m·rv | 9 rv | 10-12 fac_g | 13-27 row/col/...
    g_rv = base[..., 0:1] * base[..., 9:10]
    clipped = g3.clamp(-GRAD_FEATURE_CLIP, GRAD_FEATURE_CLIP)
    return torch.cat([base[..., :1], clipped, base[..., 1:13], g_rv, base[..., 13:]], dim=-1)


def element_mlp(
    features: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """The per-element MLP of one tensor on normalised-by-folding features; returns S+(3,).

    ``layers[0]``'s weight already carries the per-channel normaliser (see :func:`tensor_step`).
    """
    h = features
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = torch.relu(h)
    return h


def step_from_outputs(
    outputs: torch.Tensor,
    lr_mult: torch.Tensor | float,
    param: torch.Tensor,
    step_mult: float,
    exp_mult: float,
) -> torch.Tensor:
    """``lr_mult · rms(p) · d · exp(exp_mult · m) · step_mult``, with ``rms(p)`` before the step."""
    param_scale = torch.sqrt(param.square().mean() + _EPS_PARAM_RMS)
    direction, magnitude = outputs[..., 0], outputs[..., 1]
    return lr_mult * param_scale * direction * torch.exp(exp_mult * magnitude) * step_mult


def tensor_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    layers: list[tuple[torch.Tensor, torch.Tensor]],
    lr_mult: torch.Tensor,
    cfg: VeLOConfig,
) -> tuple[torch.Tensor, TensorState]:
    """The step of one tensor (rank ≥ 1) given its MLP ``layers`` ``[(W (in, out), b), ...]``.

    Returns ``(step, new accumulators)`` with ``p_new = p − step``. The per-channel feature
    normaliser is folded into the first layer's rows (exact up to rounding).
    """
    acc = update_accumulators(param, grad, state, cfg)
    features = element_features(param, acc, factored_dims(param.shape, cfg.tie_break))
    return mlp_step(param, features, layers, lr_mult, cfg.step_mult, cfg.exp_mult), acc.state


def mlp_step(
    param: torch.Tensor,
    features: torch.Tensor,
    layers: list[tuple[torch.Tensor, torch.Tensor]],
    lr_mult: torch.Tensor | float,
    step_mult: float,
    exp_mult: float,
) -> torch.Tensor:
    """Normalise ``features`` per channel (folded into the first layer), run the MLP, scale."""
    (w0, b0), rest = layers[0], layers[1:]
    w0 = w0 * sfc.feature_scale(features).unsqueeze(-1)
    outputs = element_mlp(features, [(w0, b0), *rest])
    return step_from_outputs(outputs, lr_mult, param, step_mult, exp_mult)


class Plan(NamedTuple):
    """The per-tensor half of a step: which tensors step, their MLPs and step scales.

    ``layers[l]`` is ``(W (T, in, out), b (T, out))`` for MLP layer l, row i belonging to
    ``active[i]``; ``h``/``c`` are the new LSTM rows; ``state`` the new ``t`` and loss buffer.
    """

    active: list[str]
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    lr_mult: torch.Tensor
    h: torch.Tensor
    c: torch.Tensor
    state: dict


def plan_steps(
    theta: Mapping[str, torch.Tensor],
    state: Mapping,
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor | None],
    cfg: VeLOConfig,
    *,
    loss: torch.Tensor | float | None,
    num_steps: int | None,
) -> Plan:
    """Loss buffer, LSTM and hypernetwork for every tensor with a gradient (see compute_steps)."""
    num_steps = check_num_steps(num_steps)
    if loss is None:
        raise MissingInputError(
            "VeLO needs the current training loss every step (its LSTM is fed loss features): "
            "pass loss=<0-d tensor or float> to update(), or call optimizer.step(closure) / "
            "optimizer.step(loss=loss)."
        )
    t = state["t"]
    loss = torch.as_tensor(loss, dtype=t.dtype, device=t.device).reshape(())
    loss_state, loss_feats = update_loss_state(state["loss"], loss, loss_decays(num_steps, t))
    new_global = {"t": t + 1, "loss": loss_state}
    active = [name for name in params if grads.get(name) is not None]
    if not active:
        return Plan([], [], t.new_zeros(0), t.new_zeros(0), t.new_zeros(0), new_global)
    progress = progress_features(t, num_steps, loss_feats)
    rows, h_rows, c_rows = [], [], []
    for name in active:
        ts = state["tensors"][name]
        p = params[name].reshape(_shape(params[name]))
        rows.append(tensor_inputs(p, ts["m"], ts["v"], progress, loss_feats))
        fresh = ts["updates"] == 0
        h_rows.append(torch.where(fresh, theta["lstm_init_h"], ts["lstm_h"]))
        c_rows.append(torch.where(fresh, theta["lstm_init_c"], ts["lstm_c"]))
    ctl = lstm_controls(theta, torch.stack(rows), torch.stack(h_rows), torch.stack(c_rows))
    layers = mix_banks(theta, ctl.mixture, cfg)
    return Plan(active, layers, ctl.lr_mult, ctl.h, ctl.c, new_global)


def advance_tensor_state(
    plan: Plan, i: int, old: Mapping[str, torch.Tensor], accumulators: TensorState
) -> TensorState:
    """Tensor ``plan.active[i]``'s new state: accumulators, LSTM row and update count."""
    return {
        **accumulators,
        "lstm_h": plan.h[i],
        "lstm_c": plan.c[i],
        "updates": old["updates"] + 1,
    }


def compute_steps(
    theta: Mapping[str, torch.Tensor],
    state: Mapping,
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor | None],
    cfg: VeLOConfig,
    *,
    loss: torch.Tensor | float | None,
    num_steps: int | None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The learned steps (``p_new = p − lr·step``) of the tensors with a gradient; the new state.

    Tensors whose gradient is ``None`` or absent are skipped: no step, state unchanged, and they
    take no part in the LSTM's max-pool. The loss buffer and ``t`` advance once per call.
    """
    plan = plan_steps(theta, state, params, grads, cfg, loss=loss, num_steps=num_steps)
    new_tensors = dict(state["tensors"])
    steps: dict[str, torch.Tensor] = {}
    for i, name in enumerate(plan.active):
        shape = _shape(params[name])
        p, g = params[name].reshape(shape), grads[name].reshape(shape)
        ts = state["tensors"][name]
        mine = [(w[i], b[i]) for w, b in plan.layers]
        step, accumulators = tensor_step(p, g, ts, mine, plan.lr_mult[i], cfg)
        steps[name] = step.reshape(params[name].shape)
        new_tensors[name] = advance_tensor_state(plan, i, ts, accumulators)
    return steps, {**plan.state, "tensors": new_tensors}


def update(
    theta: Mapping[str, torch.Tensor],
    state: Mapping,
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor | None],
    cfg: VeLOConfig,
    *,
    lr: float | torch.Tensor = 1.0,
    weight_decay: float = 0.0,
    loss: torch.Tensor | float | None = None,
    num_steps: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """One VeLO step over a dict of parameters: ``p ← p·(1 − lr·wd) − lr·step``.

    ``loss`` (the current training loss) and ``num_steps`` (the planned total) are required.
    ``lr = 1`` reproduces VeLO; weight decay is decoupled (docs/design/velo.md compares this with
    PyLO's two conventions). Parameters without a gradient are returned unchanged.
    """
    steps, new_state = compute_steps(
        theta, state, params, grads, cfg, loss=loss, num_steps=num_steps
    )
    new_params = {}
    for name, p in params.items():
        if name not in steps:
            new_params[name] = p
            continue
        new_params[name] = apply_decoupled_step(p, steps[name], lr, weight_decay)
    return new_params, new_state
