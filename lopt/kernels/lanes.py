"""Learned-optimizer updates of many lanes at once, in place, for meta-training.

The meta-trainer keeps 2N inner problems ("lanes") stacked on a leading axis, each with its own
θ. The reference step ``torch.func.vmap``s the architecture's pure ``update`` over the lanes; it
pays vmap's per-op overhead on small tensors and allocates every new parameter and state tensor.
A :class:`LaneUpdate` is the fast replacement an architecture plugs into the seam as
``lopt.Architecture.lanes_update``: it updates the lane-stacked parameters and state **in place**,
for small_fc_lopt with one kernel call per parameter tensor. See docs/design/lanes.md.

- :data:`SMALL_FC_LANES`: small_fc_lopt's, on the ``lozoo::small_fc_lanes_step_`` op
  (:data:`SMALL_FC_LANES_TORCH`: the same on the op's pure-torch twin).
- :func:`vmapped_lane_update`: a :class:`LaneUpdate` from any architecture's pure ``update`` (the
  vmapped functional core, written back in place), for architectures without a batched kernel.
- :func:`as_lane_update`: what the unroll calls on ``Architecture.lanes_update``; it also accepts
  the older pure form ``(theta_lanes, state, params, grads, cfg) -> (params, state)``.

None of this is differentiable: ES and PES never backpropagate through the unroll.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import core
from ..config import SmallFCConfig
from ..theta import unflatten_theta
from . import ops, torch_backend


@dataclass(frozen=True)
class LaneUpdate:
    """An architecture's learned-optimizer step over lane-stacked tensors.

    - ``prepare(theta_lanes [L, P], cfg)`` turns the flat lane θs into whatever ``apply_`` needs
      (done once per θ: it is fixed while the lanes advance for an outer step).
    - ``apply_(prepared, state, params, grads, cfg, loss=None)`` steps every lane in place:
      ``params`` and ``grads`` map names to ``[L, *S]``, ``state`` is the lane-stacked
      ``init_state`` tree (``{"t": [L], "tensors": {...}}``) and ``loss`` the lanes' training
      losses ``[L]`` before the step (for architectures that read it). ``params``,
      ``state["tensors"]`` and ``state["t"]`` (+1) are updated in place, so they must be
      contiguous tensors the caller owns.
    """

    prepare: Callable[[torch.Tensor, Any], Any]
    apply_: Callable[..., None]


def _flat_theta(theta_lanes: torch.Tensor, cfg: Any) -> torch.Tensor:
    return theta_lanes.detach()


def vmapped_lane_update(
    update: Callable[..., tuple[dict, dict]],
    unflatten: Callable[[torch.Tensor, Any], Mapping[str, torch.Tensor]],
) -> LaneUpdate:
    """A :class:`LaneUpdate` from a pure ``update(θ, state, params, grads, cfg, *, loss=None)``.

    The fallback for architectures without a batched kernel: the vmapped functional core (the
    meta-trainer's reference math), its results copied into the lane tensors.
    """

    def apply_(theta_lanes, state, params, grads, cfg, loss=None) -> None:
        def lane(flat, st, p, g, lane_loss):
            return update(unflatten(flat, cfg), st, p, g, cfg, loss=lane_loss)

        losses = torch.zeros(theta_lanes.shape[0]) if loss is None else loss.detach()
        with torch.no_grad():
            new_params, new_state = torch.func.vmap(lane, randomness="error")(
                theta_lanes, state, params, grads, losses
            )
        _copy_tree_(params, new_params)
        _copy_tree_(state, new_state)

    return LaneUpdate(_flat_theta, apply_)


def as_lane_update(lanes_update: Any) -> LaneUpdate:
    """``Architecture.lanes_update`` as a :class:`LaneUpdate`.

    A :class:`LaneUpdate` is returned as is; a pure function ``(theta_lanes, state, params,
    grads, cfg) -> (params, state)`` is wrapped so that its results are written back in place.
    """
    if isinstance(lanes_update, LaneUpdate):
        return lanes_update
    if not callable(lanes_update):
        raise TypeError(
            "Architecture.lanes_update must be a lopt.kernels.lanes.LaneUpdate or a function "
            f"(theta_lanes, state, params, grads, cfg) -> (params, state), got "
            f"{type(lanes_update).__name__}"
        )

    def apply_(theta_lanes, state, params, grads, cfg, loss=None) -> None:
        new_params, new_state = lanes_update(theta_lanes, state, params, grads, cfg)
        _copy_tree_(params, new_params)
        _copy_tree_(state, new_state)

    return LaneUpdate(_flat_theta, apply_)


def guarded_apply_(
    update: LaneUpdate,
    prepared: Any,
    state: dict,
    params: dict,
    grads: Mapping[str, torch.Tensor],
    cfg: Any,
    *,
    loss: torch.Tensor | None = None,
) -> torch.Tensor:
    """``update.apply_`` with the non-finite-gradient skip policy of :mod:`lopt.nonfinite`.

    A lane's tensor whose gradient holds NaN or ±inf is stepped with a zero gradient (so nothing
    non-finite enters the kernel) and then restored: its parameter and state stay exactly as
    they were. Returns the number of skipped tensors per lane ``[L]``. The finiteness check is
    one reduction per tensor; copies are made only for the lanes that are skipped.
    """
    lanes = state["t"].shape[0]
    skipped = torch.zeros(lanes, dtype=torch.int64)
    # A cheap screen first: a tensor's sum is finite whenever all its elements are, unless it
    # overflows (a false alarm, which the exact per-lane check below then clears).
    sums = [g.sum() for g in grads.values()]
    if not sums or bool(torch.isfinite(torch.stack(sums)).all()):
        update.apply_(prepared, state, params, grads, cfg, loss=loss)
        return skipped
    safe, saved = dict(grads), {}
    for name, g in grads.items():
        ok = torch.isfinite(g).reshape(lanes, -1).all(-1)
        if bool(ok.all()):
            continue
        bad = (~ok).nonzero().squeeze(1)
        skipped[bad] += 1
        safe[name] = torch.where(ok.view(-1, *[1] * (g.dim() - 1)), g, torch.zeros_like(g))
        tensors = state["tensors"][name]
        saved[name] = (bad, params[name][bad], {k: v[bad] for k, v in tensors.items()})
    update.apply_(prepared, state, params, safe, cfg, loss=loss)
    for name, (bad, param, tensors) in saved.items():
        params[name][bad] = param
        for key, value in tensors.items():
            state["tensors"][name][key][bad] = value
    return skipped


def _copy_tree_(dst: Any, src: Any) -> None:
    if isinstance(dst, dict):
        for key in dst:
            _copy_tree_(dst[key], src[key])
    else:
        dst.copy_(src)


# -- small_fc_lopt ---------------------------------------------------------------------------------
def _small_fc_prepare(theta_lanes: torch.Tensor, cfg: SmallFCConfig):
    return ops.theta_args(unflatten_theta(theta_lanes.detach(), cfg), cfg)  # [L, 7], [L, ...]


def _small_fc_apply(step: Callable[..., None]):
    @torch.no_grad()
    def apply_(prepared, state, params, grads, cfg: SmallFCConfig, loss=None) -> None:
        decays, layers = prepared
        t = state["t"]
        for name, p in params.items():
            d1, d0 = core.factored_dims(p.shape[1:], cfg.tie_break) or (-1, -1)
            st = state["tensors"][name]
            step(
                p, grads[name], st["m"], st["v"], st.get("r"), st.get("c"), st.get("vd"),
                decays, layers, d1, d0, t, 1.0, 0.0, cfg.step_mult, cfg.exp_mult, False,
            )  # fmt: skip
        t.add_(1)

    return apply_


def _cpp_lanes_step(*args) -> None:
    result = ops.load_cpp()
    if not result.ok:
        raise RuntimeError(
            f"the fused CPU kernel is unavailable ({result.error}); run `python -m lopt.kernels "
            "build`, or meta-train with --lopt-backend torch"
        )
    ops.lanes_step_op()(*args)


SMALL_FC_LANES = LaneUpdate(_small_fc_prepare, _small_fc_apply(_cpp_lanes_step))
"""small_fc_lopt on ``lozoo::small_fc_lanes_step_``: one op call per parameter tensor."""
SMALL_FC_LANES_TORCH = LaneUpdate(
    _small_fc_prepare, _small_fc_apply(torch_backend.small_fc_lanes_step_)
)
"""The same through the op's pure-torch twin (a per-lane loop; for tests and portability)."""


def update_lanes(
    theta_lanes: torch.Tensor,
    state: Mapping,
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    cfg: SmallFCConfig,
) -> tuple[dict[str, torch.Tensor], dict]:
    """``vmap(lopt.update)`` over lanes on the fused CPU op, without touching the inputs.

    ``theta_lanes`` is ``[L, P]``; ``params``/``grads`` map names to ``[L, *S]``; ``state`` is a
    lane-stacked :func:`lopt.init_state` tree. Returns new ``(params, state)``; the in-place
    :data:`SMALL_FC_LANES` is what the meta-trainer uses.
    """
    contiguous = torch.contiguous_format
    new_params = {k: v.detach().clone(memory_format=contiguous) for k, v in params.items()}
    new_state = {
        "t": state["t"].detach().to(torch.float32).clone(),
        "tensors": {
            name: {k: v.clone(memory_format=contiguous) for k, v in st.items()}
            for name, st in state["tensors"].items()
        },
    }
    SMALL_FC_LANES.apply_(
        SMALL_FC_LANES.prepare(theta_lanes, cfg), new_state, new_params, grads, cfg
    )
    return new_params, new_state
