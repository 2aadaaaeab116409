"""The outer learner: Adam on θ after an elementwise clip of ĝ (docs/design/meta_training.md §6).

Reference: learned_optimization's ``GradientClipOptimizer(Adam, grad_clip=3.0)``; optax Adam's
``eps_root`` has no torch counterpart and is dropped (a negligible difference).
"""

from __future__ import annotations

from typing import Any

import torch


class OuterLearner:
    """Adam on θ (AdamW when ``weight_decay > 0``) after an elementwise clip (``grad_clip > 0``)."""

    def __init__(
        self, theta: torch.Tensor, lr: float, grad_clip: float = 3.0, weight_decay: float = 0.0
    ) -> None:
        self.theta = theta.detach().clone().float()
        self.grad_clip = float(grad_clip)
        if weight_decay > 0:  # the Celo2 recipe: optax AdamW, decay multiplied by the lr
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                [self.theta], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay
            )
        else:
            self.optimizer = torch.optim.Adam([self.theta], lr=lr, betas=(0.9, 0.999), eps=1e-8)
        self.best_loss = float("inf")

    def apply(self, grads: list[torch.Tensor], meta_loss: float | None = None) -> dict[str, float]:
        """Average ``grads``, zero non-finite entries, clip each coordinate, take one Adam step."""
        grad = torch.stack(grads).mean(0)
        nonfinite = int((~torch.isfinite(grad)).sum())
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        if self.grad_clip > 0:
            clipped = int((grad.abs() > self.grad_clip).sum())
            grad = grad.clamp(-self.grad_clip, self.grad_clip)
        else:
            clipped = 0
        self.theta.grad = grad
        self.optimizer.step()
        self.theta.grad = None
        if meta_loss is not None:
            self.best_loss = min(self.best_loss, meta_loss)
        return {
            "grad_norm": float(grad.norm()),
            "grad_abs_mean": float(grad.abs().mean()),
            "theta_norm": float(self.theta.norm()),
            "grad_nonfinite": float(nonfinite),
            "grad_clipped": float(clipped),
            "best_meta_loss": self.best_loss,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "theta": self.theta.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "best_loss": self.best_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.theta.copy_(state["theta"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.best_loss = state["best_loss"]
