"""Small pieces of update math shared by every architecture's functional core.

Each architecture computes its own per-element ``step``; how that step and the decoupled weight
decay are applied to a parameter is the same everywhere, so it lives here once.
"""

from __future__ import annotations

import torch


def apply_decoupled_step(
    param: torch.Tensor,
    step: torch.Tensor,
    lr: float | torch.Tensor,
    weight_decay: float | torch.Tensor,
    *,
    step_size: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``param·(1 − lr·weight_decay) − step_size·step``; ``step_size`` defaults to ``lr``.

    Decoupled weight decay (AdamW's convention): the decay is scaled by ``lr`` but not by the
    learned step. A weight decay that is the Python number 0 skips the multiply (a tensor one
    never does, so the function stays ``vmap``-able over it); both forms give the same values.
    ``step_size`` lets an architecture fold a constant into the step's scale (``lr·step_mult``)
    without changing the rounding of its update.
    """
    step_size = lr if step_size is None else step_size
    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
        return param - step_size * step
    return param * (1 - lr * weight_decay) - step_size * step
