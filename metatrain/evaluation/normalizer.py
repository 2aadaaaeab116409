"""Curve smoothing, LR selection and the speedup-over-Adam normaliser.

Design: docs/design/meta_training.md §10.

"Speedup over Adam" answers: how many steps would the best Adam of the grid need to reach the
loss the learned optimizer reaches at step k? The normaliser is built per task from *this*
evaluation's Adam grid at the same horizon:

1. per LR, the seed-mean train-loss curve, smoothed with an EMA (α = 0.95, initialised at the
   first point);
2. the lower envelope over LRs at each step (NaN-ignoring);
3. linear resampling onto 512 evenly spaced steps over [0, last step], then a running minimum,
   giving a monotone non-increasing curve y(x);
4. ``f(loss)`` = the first x with y(x) = loss, by linear interpolation; losses below the envelope
   map to the last step, losses at or above its start to 0, non-finite results to 0.

Curve index k is the training loss on step k's batch before its update, i.e. after k updates, so
x counts Adam updates and runs over [0, K − 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import EMA_ALPHA, NORMALIZER_POINTS

__all__ = ["SpeedupNormalizer", "best_index", "ema", "lower_envelope"]


def ema(curves: np.ndarray, alpha: float = EMA_ALPHA) -> np.ndarray:
    """EMA along the last axis, ``s₀ = y₀``, ``sₖ = α·sₖ₋₁ + (1 − α)·yₖ``; NaN propagates."""
    y = np.asarray(curves, dtype=np.float64)
    out = np.empty_like(y)
    if y.shape[-1] == 0:
        return out
    out[..., 0] = y[..., 0]
    for k in range(1, y.shape[-1]):
        out[..., k] = alpha * out[..., k - 1] + (1 - alpha) * y[..., k]
    return out


def lower_envelope(curves: np.ndarray) -> np.ndarray:
    """Elementwise minimum over the first axis, ignoring NaN and inf (all bad → +inf)."""
    y = np.asarray(curves, dtype=np.float64)
    return np.where(np.isfinite(y), y, np.inf).min(axis=0)


def best_index(final_smoothed: np.ndarray) -> int:
    """Index of the lowest seed-mean final smoothed loss; non-finite entries never win.

    ``final_smoothed`` is ``[L, S]`` (LR × seed). If every LR diverged the smallest LR is
    returned, which is the most conservative choice.
    """
    scores = np.asarray(final_smoothed, dtype=np.float64).mean(axis=-1)
    scores = np.where(np.isfinite(scores), scores, np.inf)
    return int(np.argmin(scores)) if np.isfinite(scores).any() else 0


@dataclass(frozen=True)
class SpeedupNormalizer:
    """The monotone Adam envelope ``y(x)`` on ``num_points`` evenly spaced steps ``x``."""

    x: np.ndarray
    y: np.ndarray

    @classmethod
    def from_curves(
        cls,
        mean_curves: np.ndarray,
        alpha: float = EMA_ALPHA,
        num_points: int = NORMALIZER_POINTS,
    ) -> SpeedupNormalizer:
        """Build from per-LR seed-mean train-loss curves ``[L, K]`` (one value per step)."""
        curves = np.atleast_2d(np.asarray(mean_curves, dtype=np.float64))
        steps = curves.shape[-1]
        if steps < 2:
            raise ValueError(f"the speedup normaliser needs curves of >= 2 steps, got {steps}")
        envelope = lower_envelope(ema(curves, alpha))
        x = np.linspace(0.0, steps - 1, num_points)
        finite = np.isfinite(envelope)
        if finite.any():
            y = np.interp(x, np.arange(steps)[finite], envelope[finite])
            y[x < np.flatnonzero(finite)[0]] = np.inf  # no Adam run had a loss yet
        else:
            y = np.full(num_points, np.inf)
        return cls(x=x, y=np.minimum.accumulate(y))

    def adam_steps(self, loss: np.ndarray | float) -> np.ndarray:
        """``f(loss)``: Adam steps needed to reach ``loss`` (elementwise, see module doc)."""
        loss = np.asarray(loss, dtype=np.float64)
        # y is non-increasing, so -y is sorted; j = first index with y[j] <= loss.
        j = np.searchsorted(-self.y, -loss, side="left")
        last = len(self.y) - 1
        jc = np.clip(j, 1, last)
        y0, y1 = self.y[jc - 1], self.y[jc]
        x0, x1 = self.x[jc - 1], self.x[jc]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(y0 > y1, (y0 - loss) / (y0 - y1), 1.0)
            out = x0 + frac * (x1 - x0)
        out = np.where(j == 0, 0.0, out)  # at or above the start of the envelope
        out = np.where(j > last, self.x[-1], out)  # below everything Adam reached
        return np.where(np.isfinite(out) & np.isfinite(loss), out, 0.0)

    def speedup(self, loss: float, step: int) -> float:
        """``f(loss) / step``: > 1 means the learned optimizer is ahead of the best Adam."""
        if step <= 0:
            raise ValueError(f"speedup needs a positive step, got {step}")
        return float(self.adam_steps(loss)) / step
