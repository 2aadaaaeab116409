"""small_fc_lopt steps of many lanes (each with its own θ) with the fused op, for meta-training.

The meta-trainer keeps 2N lanes of inner problems stacked on a leading axis and, on the reference
path, ``torch.func.vmap``s :func:`lopt.core.update` over them. That pure-torch step materialises
28 features per parameter element and pays vmap's per-op overhead, so on realistic tasks it costs
10-30× the inner forward/backward. :func:`update_lanes` computes the same update by calling the
fused ``lozoo::small_fc_step_`` op once per (lane, tensor) on contiguous lane slices. It is not
differentiable (ES/PES never backpropagate through the unroll) and is tested for parity against
the vmapped core.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import core
from ..config import SmallFCConfig
from ..theta import unflatten_theta
from . import ops


@torch.no_grad()
def update_lanes(
    theta_lanes: torch.Tensor,
    state: Mapping,
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    cfg: SmallFCConfig,
) -> tuple[dict[str, torch.Tensor], dict]:
    """``vmap(lopt.update)`` over lanes, computed with the fused CPU op.

    ``theta_lanes`` is ``[L, P]``; ``params``/``grads`` map names to ``[L, *S]``; ``state`` is a
    lane-stacked :func:`lopt.init_state` tree. Returns new ``(params, state)``; the inputs are
    not modified.
    """
    result = ops.load_cpp()
    if not result.ok:
        raise RuntimeError(
            f"the fused CPU kernel is unavailable ({result.error}); run `python -m lopt.kernels "
            "build`, or meta-train with --lopt-backend torch"
        )
    op = ops.step_op()
    decays, stacked = ops.theta_args(unflatten_theta(theta_lanes, cfg), cfg)  # [L, 7], [L, ...]
    layers = [[w[lane] for w in stacked] for lane in range(len(decays))]
    new_params = {k: v.detach().clone().contiguous() for k, v in params.items()}
    tensors = {
        name: {k: v.clone().contiguous() for k, v in st.items()}
        for name, st in state["tensors"].items()
    }
    ts = state["t"].tolist()
    for name, p in new_params.items():
        shape = p.shape[1:]
        d1, d0 = core.factored_dims(shape, cfg.tie_break) or (-1, -1)
        g = grads[name].contiguous()
        st = tensors[name]
        for lane in range(p.shape[0]):
            op(
                p[lane], g[lane], st["m"][lane], st["v"][lane],
                st["r"][lane] if "r" in st else None,
                st["c"][lane] if "c" in st else None,
                st["vd"][lane] if "vd" in st else None,
                decays[lane], layers[lane], d1, d0, float(ts[lane]), 1.0, 0.0,
                cfg.step_mult, cfg.exp_mult, False,
            )  # fmt: skip
    return new_params, {"t": state["t"] + 1, "tensors": tensors}
