"""The functional core of the Celo2 family (design: docs/design/celo2.md).

Pure functions of tensors: nothing is mutated and new state is returned. The same code is the
optimizer's torch backend, what the meta-trainer differentiates and ``torch.func.vmap``s over
lanes and perturbed θ, and the reference the fused kernels are tested against.

One learned step of a tensor P with gradient G, in the reference frame (see ``layout`` below):

1. ĝ = clip(G, ±1000); update the accumulators (3 momenta, one second moment, 3 factored or
   3 diagonal second moments); all features read the updated values.
2. Build 30 channels (15 below rank 2), normalise each by its RMS over the last two axes
   (per leading index), run the 30→8→8→3 ReLU MLP per element and keep output 0.
3. Rank >= 2 with ``orthogonalize``: Newton–Schulz over the last two axes (batched GEMMs).
4. Normalise the result to unit RMS over the last two axes: ``u``.

Then ``p ← p·(1 − lr·wd) − lr·step_mult·u``. Tensors routed to the Adam branch step with
``lr·adam_lr_mult`` instead of ``lr`` (weight decay too).

Layout. ``cfg.layout == "torch"`` reads a rank >= 2 tensor as ``(out, in, *spatial)`` and runs
the rule on ``(*spatial, in, out)``, the layout the reference (and its weights) assume, or, with
``cfg.conv_mode == "matrix"``, on the one ``(in·∏spatial, out)`` matrix of a rank >= 3 tensor;
its state lives in that frame. ``"as_stored"`` runs the rule on the tensor as given.

State of one tensor: learned branch ``m`` S+(3,), ``v`` S+(1,) and either ``v_row`` (S without
axis a)+(3,) and ``v_col`` (S without axis b)+(3,) (rank >= 2) or ``v_diag`` S+(3,) (rank <= 1),
S in the reference frame, a scalar as (1,); Adam branch ``exp_avg``, ``exp_avg_sq`` with the
parameter's shape. Which branch a tensor takes is fixed when its state is created.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from ..functional import apply_decoupled_step
from .config import Celo2Config

TensorState = dict[str, torch.Tensor]

MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
SECOND_MOMENT_DECAY = 0.95
FACTORED_DECAYS = (0.9, 0.99, 0.999)
GRAD_CLIP = 1000.0
FEATURE_GRAD_CLIP = 0.1
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5

# Epsilons, each where the reference puts it; they are not negligible (design doc, "eps").
EPS_GSQ = 1e-30  # added to ĝ² before the factored / diagonal accumulators
EPS_SAFE = 1e-9  # floor of safe_rsqrt, row-mean guard, diagonal fac_g, both RMS normalisers
EPS_RSQRT = 1e-8  # rsqrt(v + eps), rsqrt(row/col + eps)
EPS_NS = 1e-8  # Frobenius normalisation before Newton–Schulz


# -- routing and layout ---------------------------------------------------------------------
def routes_to_adam(name: str, shape: tuple[int, ...] | torch.Size, cfg: Celo2Config) -> bool:
    """Whether parameter ``name`` of ``shape`` takes the Adam branch under ``cfg``."""
    if cfg.adam_for_1d and len(shape) <= 1:
        return True
    return cfg.adam_name_pattern is not None and re.search(cfg.adam_name_pattern, name) is not None


FRAME_FIELDS = ("layout", "conv_mode")
"""Config fields that choose the rule's frame, and so the shape and meaning of the state."""


def _to_reference_perm(ndim: int) -> tuple[int, ...]:
    # (out, in, *spatial) -> (*spatial, in, out): nn.Linear / nn.ConvNd to Haiku's layout.
    return (*range(2, ndim), 1, 0)


def _matrix_frame(ndim: int, cfg: Celo2Config) -> bool:
    # conv_mode="matrix": a kernel (out, in, *spatial) is the (in·∏spatial, out) matrix that an
    # nn.Linear weight (out, in·∏spatial) is in its frame (design doc, "conv_mode").
    return cfg.conv_mode == "matrix" and ndim >= 3


def to_reference(x: torch.Tensor, cfg: Celo2Config) -> torch.Tensor:
    """View ``x`` (a parameter or gradient) in the frame the rule is defined in."""
    if cfg.layout == "as_stored" or x.dim() < 2:
        return x
    if _matrix_frame(x.dim(), cfg):
        return x.reshape(x.shape[0], -1).mT
    return x.permute(_to_reference_perm(x.dim()))


def from_reference(
    x: torch.Tensor, cfg: Celo2Config, shape: tuple[int, ...] | torch.Size
) -> torch.Tensor:
    """Inverse of :func:`to_reference` for a parameter of ``shape``: ``x`` has shape
    ``reference_shape(shape, cfg)`` (it may be an expanded view; the result is then a view)."""
    ndim = len(shape)
    if cfg.layout == "as_stored" or ndim < 2:
        return x
    if _matrix_frame(ndim, cfg):
        return x.mT.reshape(shape)  # splits one axis: a view, never a copy
    perm = _to_reference_perm(ndim)
    inverse = [0] * len(perm)
    for i, axis in enumerate(perm):
        inverse[axis] = i
    return x.permute(inverse)


def reference_shape(shape: tuple[int, ...] | torch.Size, cfg: Celo2Config) -> tuple[int, ...]:
    """Shape of a parameter in the rule's frame (a scalar counts as (1,))."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        return (1,)
    if cfg.layout == "as_stored" or len(shape) < 2:
        return shape
    if _matrix_frame(len(shape), cfg):
        return (math.prod(shape[1:]), shape[0])
    return tuple(shape[a] for a in _to_reference_perm(len(shape)))


def same_frame(shape: tuple[int, ...] | torch.Size, a: Celo2Config, b: Celo2Config) -> bool:
    """Whether ``a`` and ``b`` view a tensor of ``shape`` in the same frame, element for element
    (then its learned state means the same under both)."""
    x = torch.empty(tuple(shape), device="meta")
    in_a, in_b = to_reference(x, a), to_reference(x, b)
    return in_a.shape == in_b.shape and in_a.stride() == in_b.stride()


def factored_axes(shape: tuple[int, ...] | torch.Size) -> tuple[int, int] | None:
    """``(b, a)``: the second-largest and the largest axis, ``None`` below rank 2.

    Axes are sorted by size, ascending, stably (ties keep their order), so among equal sizes the
    later axis counts as larger: for a square matrix b = 0, a = 1.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda axis: (shape[axis], axis))
    return order[-2], order[-1]


# -- state ------------------------------------------------------------------------------------
def learned_state_shapes(ref_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Shapes of the learned branch's state for a parameter whose reference shape is given."""
    out = {"m": ref_shape + (3,), "v": ref_shape + (1,)}
    axes = factored_axes(ref_shape)
    if axes is None:
        out["v_diag"] = ref_shape + (3,)
    else:
        b, a = axes
        out["v_row"] = tuple(s for i, s in enumerate(ref_shape) if i != a) + (3,)
        out["v_col"] = tuple(s for i, s in enumerate(ref_shape) if i != b) + (3,)
    return out


def init_tensor_state(
    param: torch.Tensor, cfg: Celo2Config, *, adam: bool | None = None
) -> TensorState:
    """Zero float32 state for one tensor; ``adam`` picks the branch (default: by rank alone)."""
    if adam is None:
        adam = routes_to_adam("", param.shape, cfg)
    if adam:
        shapes = {"exp_avg": tuple(param.shape), "exp_avg_sq": tuple(param.shape)}
    else:
        shapes = learned_state_shapes(reference_shape(param.shape, cfg))
    return {k: torch.zeros(s, dtype=torch.float32, device=param.device) for k, s in shapes.items()}


def init_state(params: Mapping[str, torch.Tensor], cfg: Celo2Config) -> dict:
    """``{"t": 0-d float32, "tensors": {name: state}}``, routing each tensor by name and rank."""
    device = next(iter(params.values())).device if params else None
    return {
        "t": torch.zeros((), dtype=torch.float32, device=device),
        "tensors": {
            name: init_tensor_state(p, cfg, adam=routes_to_adam(name, p.shape, cfg))
            for name, p in params.items()
        },
    }


def is_adam_state(state: Mapping[str, torch.Tensor]) -> bool:
    return "exp_avg" in state


# -- the learned rule -------------------------------------------------------------------------
def _safe_rsqrt(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_min(EPS_SAFE).rsqrt()


def _decays(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def normalized_axes(ndim: int) -> tuple[int, ...]:
    """Axes of an S+(C,) tensor over which a channel is normalised: the last two of S."""
    return (-3, -2) if ndim >= 2 else (-2,)


def raw_features(
    param: torch.Tensor, grad: torch.Tensor, state: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, TensorState]:
    """Accumulator update and the un-normalised channels, S+(30,) (S+(15,) below rank 2).

    ``param`` and ``grad`` are float32, in the reference frame, rank >= 1.
    """
    g = grad.clamp(-GRAD_CLIP, GRAD_CLIP)
    g3 = g.unsqueeze(-1)
    bm = _decays(MOMENTUM_DECAYS, g)
    bf = _decays(FACTORED_DECAYS, g)
    m = bm * state["m"] + (1 - bm) * g3
    v = SECOND_MOMENT_DECAY * state["v"] + (1 - SECOND_MOMENT_DECAY) * (g3 * g3)
    q = g3 * g3 + EPS_GSQ
    r = (v + EPS_RSQRT).rsqrt()
    channels = [g3, g3.clamp(-FEATURE_GRAD_CLIP, FEATURE_GRAD_CLIP), param.unsqueeze(-1)]
    channels += [m, v, m * r, r]
    axes = factored_axes(param.shape)
    if axes is None:
        v_diag = bf * state["v_diag"] + (1 - bf) * q
        channels += [g3 * _safe_rsqrt(v_diag + EPS_SAFE), g3 * r]
        return torch.cat(channels, dim=-1), {"m": m, "v": v, "v_diag": v_diag}
    b, a = axes
    v_row = bf * state["v_row"] + (1 - bf) * q.mean(a)
    v_col = bf * state["v_col"] + (1 - bf) * q.mean(b)
    b_in_row = b - int(b > a)  # where axis b sits once axis a is reduced away
    rho = _safe_rsqrt(v_row / (v_row.mean(b_in_row, keepdim=True) + EPS_SAFE))
    kappa = _safe_rsqrt(v_col)
    both = rho.unsqueeze(a) * kappa.unsqueeze(b)
    full = m.shape
    row = v_row.unsqueeze(a).expand(full)
    col = v_col.unsqueeze(b).expand(full)
    channels += [g3 * both, g3 * r, row, col]
    channels += [(row + EPS_RSQRT).rsqrt(), (col + EPS_RSQRT).rsqrt(), m * both]
    new_state = {"m": m, "v": v, "v_row": v_row, "v_col": v_col}
    return torch.cat(channels, dim=-1), new_state


def channel_scale(features: torch.Tensor, ndim: int) -> torch.Tensor:
    """``rsqrt(1e-9 + mean(x²))`` per channel over the last two axes of S (keepdim)."""
    mean_square = features.square().mean(dim=normalized_axes(ndim), keepdim=True)
    return (mean_square + EPS_SAFE).rsqrt()


def mlp_direction(
    theta: Mapping[str, torch.Tensor], features: torch.Tensor, scale: torch.Tensor, ndim: int
) -> torch.Tensor:
    """Output 0 of the MLP on the normalised features, shape S (rank >= 1).

    The per-channel scale is folded into the first layer (one small weight per leading index),
    which is exact up to rounding and skips a pass over S+(C,). Outputs 1 and 2 are never read
    (the magnitude head is multiplied by exp_mult = 0), so they are not computed.
    """
    channels = features.shape[-1]
    shape = features.shape[:-1]
    lead = shape[:-2] if ndim >= 2 else ()
    w0 = scale.reshape(*lead, channels, 1) * theta["w0"][:channels]
    x = features.reshape(*lead, -1, channels)
    h = torch.relu(x @ w0 + theta["b0"])
    h = torch.relu(h @ theta["w1"] + theta["b1"])
    return (h @ theta["w2"][:, 0] + theta["b2"][0]).reshape(shape)


def newton_schulz(x: torch.Tensor) -> torch.Tensor:
    """Quintic Newton–Schulz orthogonalisation over the last two axes, batched over the rest.

    Works in the wide orientation (transposing tall matrices), normalises each matrix by its
    Frobenius norm + 1e-8 and runs 5 iterations of ``X ← aX + (bA + cA²)X`` with ``A = XXᵀ``, as
    batched GEMMs whose scale-and-add is fused into the GEMM (``baddbmm``).
    """
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    shape = x.shape
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + EPS_NS)
    x = x.reshape(-1, shape[-2], shape[-1])
    a, b, c = NS_COEFFS
    for _ in range(NS_STEPS):
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    x = x.reshape(shape)
    return x.mT if tall else x


def rms_normalize(u: torch.Tensor) -> torch.Tensor:
    """``u / sqrt(1e-9 + mean(u²))`` over the last two axes (the last one for rank 1)."""
    dims = (-2, -1) if u.dim() >= 2 else (-1,)
    return u * (u.square().mean(dim=dims, keepdim=True) + EPS_SAFE).rsqrt()


def reference_direction(
    theta: Mapping[str, torch.Tensor],
    param: torch.Tensor,
    grad: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    orthogonalize: bool,
) -> tuple[torch.Tensor, TensorState]:
    """The unit-RMS direction ``u`` of a float32 tensor in the reference frame, rank >= 1."""
    features, new_state = raw_features(param, grad, state)
    ndim = param.dim()
    d = mlp_direction(theta, features, channel_scale(features, ndim), ndim)
    if orthogonalize and ndim >= 2:
        d = newton_schulz(d)
    return rms_normalize(d), new_state


def learned_direction(
    theta: Mapping[str, torch.Tensor],
    param: torch.Tensor,
    grad: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    cfg: Celo2Config,
) -> tuple[torch.Tensor, TensorState]:
    """``u`` for one parameter as stored (any rank, any float dtype), float32, and new state."""
    p = to_reference(param.float(), cfg)
    g = to_reference(grad.float(), cfg)
    scalar = p.dim() == 0
    if scalar:  # a scalar is a rank-1 tensor of one element (its u is ±1)
        p, g = p.reshape(1), g.reshape(1)
    u, new_state = reference_direction(theta, p, g, state, cfg.orthogonalize)
    u = u.reshape(()) if scalar else from_reference(u, cfg, param.shape)
    return u, new_state


# -- the Adam branch --------------------------------------------------------------------------
def adam_direction(
    grad: torch.Tensor, state: Mapping[str, torch.Tensor], t: torch.Tensor, cfg: Celo2Config
) -> tuple[torch.Tensor, TensorState]:
    """The Adam branch's step direction (float32) and new moments; ``t`` counts from 1."""
    g = grad.float()
    if cfg.clip_adam_grads:
        g = g.clamp(-GRAD_CLIP, GRAD_CLIP)
    beta1, beta2 = cfg.adam_betas
    m = beta1 * state["exp_avg"] + (1 - beta1) * g
    v = beta2 * state["exp_avg_sq"] + (1 - beta2) * (g * g)
    if cfg.adam_form == "meta":  # the reference's meta-training form
        direction = m / (v + cfg.adam_eps).sqrt()
    else:
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        direction = m_hat / (v_hat.sqrt() + cfg.adam_eps)
    return direction, {"exp_avg": m, "exp_avg_sq": v}


def global_clip_scale(grads: Mapping[str, torch.Tensor], max_norm: float) -> torch.Tensor:
    """``max_norm / max(‖g‖₂, max_norm)`` over all gradients together (1 when under the norm)."""
    total = sum(g.float().square().sum() for g in grads.values())
    norm = torch.as_tensor(total).sqrt()
    return max_norm / norm.clamp_min(max_norm)


def update(
    theta: Mapping[str, torch.Tensor],
    state: Mapping,
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    cfg: Celo2Config,
    *,
    lr: float | torch.Tensor = 1.0,
    weight_decay: float | torch.Tensor = 0.0,
    loss: torch.Tensor | None = None,
    num_steps: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """One step over a dict of parameters; returns ``(new_params, new_state)``.

    Learned tensors: ``p·(1 − lr·wd) − lr·step_mult·u``; Adam-branch tensors the same with
    ``lr·adam_lr_mult`` for ``lr``. ``loss`` and ``num_steps`` are accepted for the shared
    interface and unused: the Celo2 rule has no loss or progress inputs. New parameters keep each
    parameter's dtype; the state stays float32.
    """
    del loss, num_steps
    t = state["t"] + 1
    if cfg.global_clip_norm is not None and grads:
        scale = global_clip_scale(grads, cfg.global_clip_norm)
        grads = {name: g.float() * scale for name, g in grads.items()}
    new_params: dict[str, torch.Tensor] = {}
    new_tensors: dict[str, TensorState] = {}
    for name, p in params.items():
        tensor_state = state["tensors"][name]
        if is_adam_state(tensor_state):
            direction, new_tensors[name] = adam_direction(grads[name], tensor_state, t, cfg)
            eta = lr * cfg.adam_lr_mult
        else:
            direction, new_tensors[name] = learned_direction(
                theta, p, grads[name], tensor_state, cfg
            )
            eta = lr
        new = apply_decoupled_step(
            p.float(), direction, eta, weight_decay, step_size=eta * cfg.step_mult
        )
        new_params[name] = new.to(p.dtype)
    return new_params, {"t": t, "tensors": new_tensors}
