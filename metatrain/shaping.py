"""Loss shaping for antithetic estimators (docs/design/meta_training.md §4.4), as plain functions.

Every function maps per-slot loss differences to shaped differences with the same ``[T, N]``
shape: ``shape(delta, mask, loss_pos, loss_neg) -> delta'``. ``none`` keeps the per-slot values
(the only choice that leaves ĝ an unbiased gradient estimate); the others replace each pair's
differences by one per-pair value broadcast over slots, as the reference's sign mode does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Shaping = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over slots (dim 0) of the masked-in entries; 0 where a column has no entries."""
    count = mask.sum(0)
    return torch.where(count > 0, (x * mask).sum(0) / count.clamp_min(1), torch.zeros_like(count))


def none(delta, mask, loss_pos, loss_neg) -> torch.Tensor:
    """No shaping: the raw per-slot differences."""
    return delta


def sign(delta, mask, loss_pos, loss_neg) -> torch.Tensor:
    """``sign(masked-mean Δ)`` per pair, broadcast over slots."""
    per_pair = torch.sign(masked_mean(delta, mask))
    return per_pair.expand_as(delta)


def centered_rank(delta, mask, loss_pos, loss_neg) -> torch.Tensor:
    """Rank all 2N per-pair losses jointly, map ranks to [−0.5, 0.5], use rank⁺ − rank⁻."""
    f = torch.cat([masked_mean(loss_pos, mask), masked_mean(loss_neg, mask)])
    ranks = torch.empty_like(f)
    ranks[torch.argsort(f, stable=True)] = torch.arange(f.numel(), dtype=f.dtype)
    ranks = ranks / max(f.numel() - 1, 1) - 0.5
    n = delta.shape[1]
    return (ranks[:n] - ranks[n:]).expand_as(delta)


SHAPINGS: dict[str, Shaping] = {"none": none, "sign": sign, "centered_rank": centered_rank}


def get_shaping(name: str) -> Shaping:
    try:
        return SHAPINGS[name]
    except KeyError:
        raise ValueError(f"unknown loss shaping {name!r}; valid: {sorted(SHAPINGS)}") from None
