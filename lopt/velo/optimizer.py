"""``lopt.velo.VeLO``: VeLO as a ``torch.optim.Optimizer`` (design: docs/design/velo.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from ..functional import apply_decoupled_step
from ..shell import LearnedOptimizer
from ..weights import WeightsSpec
from . import core, kernels
from .config import VeLOConfig

GLOBAL_STATE_KEY = "velo"  # optimizer.state[...] entry for t and the loss buffer


class VeLO(LearnedOptimizer):
    r"""VeLO (Metz et al. 2022, arXiv 2211.09760) with lozoo's conventions.

    Every step feeds the training loss and the fraction of ``num_steps`` done to a per-tensor
    LSTM; it mixes weight banks into one small MLP per tensor, which maps 30 per-element
    features to the step::

        p ← p·(1 − lr·weight_decay) − lr · lr_mult · rms(p) · d · exp(exp_mult·m) · step_mult

    Args:
        params: iterable of tensors or of param-group dicts.
        weights: meta-weights θ: a zoo reference (``"velo/pylo"`` after ``python -m zoo
            import-pylo``), a ``.safetensors`` file or a dict of tensors
            (:meth:`VeLOConfig.theta_shapes`).
        config: the :class:`VeLOConfig` of a θ dict (default: the published architecture).
        num_steps: the planned total number of steps (required: VeLO's inputs depend on it).
        lr: multiplier of the learned step. The default 1.0 is VeLO itself (PyLO defaults to
            1e-3, which makes every step 1000× smaller than the original's).
        weight_decay: decoupled weight decay, ``p·(1 − lr·wd)`` (default 0).
        maximize: maximise the objective (the loss fed to VeLO is negated to match).
        backend: ``"auto"`` (default: the compiled kernel of each parameter's device when it is
            available, else the pure-torch path with a one-time warning), ``"torch"`` (the pure
            functional core), ``"cpp"`` or ``"cuda"`` (the compiled per-element kernel,
            :mod:`lopt.velo.kernels`). Not part of the state.

    ``step(closure)`` takes the loss from the closure; ``step(loss=loss)`` takes it directly.
    Parameters whose ``.grad`` is None are skipped (they take no part in the LSTM's max-pool).
    """

    architecture: ClassVar[str] = "velo"

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        weights: WeightsSpec = None,
        config: VeLOConfig | str | None = None,
        *,
        num_steps: int | None = None,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        maximize: bool = False,
        backend: str = "auto",
        nonfinite: str = "skip",
    ) -> None:
        num_steps = core.check_num_steps(num_steps)
        if weights is None:
            raise ValueError(
                "VeLO needs meta-weights: import PyLO's checkpoint with 'python -m zoo "
                "import-pylo VeLO_RNN_DIR VeLO_MLP_DIR --name velo/pylo' and pass "
                "weights='velo/pylo', or pass a θ dict (lopt.velo.init_theta gives a random one)"
            )
        super().__init__(
            params,
            weights,
            config,
            lr=lr,
            weight_decay=weight_decay,
            maximize=maximize,
            backend=backend,
            num_steps=num_steps,
            nonfinite=nonfinite,
        )
        self.num_steps: int = num_steps

    @classmethod
    def check_backend(cls, backend: str) -> str:
        return kernels.check_backend(backend)

    def _global_state(self, device: torch.device) -> dict[str, Any]:
        if GLOBAL_STATE_KEY not in self.state:
            self.state[GLOBAL_STATE_KEY] = {
                "t": torch.zeros((), dtype=torch.float32),
                "loss": core.init_loss_state(),
            }
        glob = self.state[GLOBAL_STATE_KEY]
        return {
            "t": glob["t"].to(device),
            "loss": {k: v.to(device) for k, v in glob["loss"].items()},
        }

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        loss: torch.Tensor | float | None = None,
    ) -> Any:
        """One step. The training loss comes from ``closure()`` or from ``loss``."""
        closure_loss = None
        if closure is not None:
            if loss is not None:
                raise ValueError("pass either a closure or loss=..., not both")
            with torch.enable_grad():
                closure_loss = closure()
            loss = closure_loss
        if loss is None:
            raise core.MissingInputError(
                "VeLO needs the training loss every step: call optimizer.step(closure) with a "
                "closure that returns the loss, or optimizer.step(loss=loss)"
            )
        work = self._collect_all()
        if not work:
            return closure_loss
        device = work[0][0].device
        loss_t = torch.as_tensor(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        loss_t = loss_t.to(device=device, dtype=torch.float32).reshape(())
        if not torch.isfinite(loss_t):
            raise ValueError(f"VeLO got a non-finite training loss ({loss_t.item()})")
        params, grads, tensor_states = {}, {}, {}
        for i, (p, grad, group, state) in enumerate(work):
            params[i] = p.detach().to(torch.float32)
            grads[i] = -grad.float() if group["maximize"] else grad.float()
            tensor_states[i] = state
        maximize = work[0][2]["maximize"]
        glob = self._global_state(device)
        state_in = {**glob, "tensors": tensor_states}
        loss_in = -loss_t if maximize else loss_t
        theta = self._theta_on(device)
        if self.backend == "torch":
            steps, new_state = core.compute_steps(
                theta, state_in, params, grads, self.config, loss=loss_in,
                num_steps=self.num_steps,
            )  # fmt: skip
            for i, (p, _, group, state) in enumerate(work):
                lr, wd = group["lr"], group["weight_decay"]
                p.copy_(apply_decoupled_step(params[i], steps[i], lr, wd))
                state.update(new_state["tensors"][i])
                state["step"] += 1
        else:
            new_state = self._fused_step(work, theta, state_in, params, grads, loss_in)
        self.state[GLOBAL_STATE_KEY] = {
            "t": new_state["t"].cpu(),
            "loss": {k: v.cpu() for k, v in new_state["loss"].items()},
        }
        return closure_loss

    def _fused_step(self, work, theta, state_in, params, grads, loss) -> dict:
        """LSTM and hypernetwork in torch, then the per-element kernel on each tensor."""
        cfg = self.config
        plan = core.plan_steps(
            theta, state_in, params, grads, cfg, loss=loss, num_steps=self.num_steps
        )
        step_fn = kernels.step_function(self.backend, work[0][0].device)
        for i, (p, _, group, state) in enumerate(work):
            shape = tuple(p.shape) or (1,)
            # float32, contiguous and of rank >= 1; a float32 contiguous p is stepped in place
            target = params[i].reshape(shape)
            if not target.is_contiguous() or target.data_ptr() != p.data_ptr():
                target = target.contiguous().clone()
            acc = core.update_accumulators(target, grads[i].reshape(shape), state, cfg)
            d1, d0 = core.factored_dims(shape, cfg.tie_break) or (-1, -1)
            layers = [t[i].contiguous() for pair in plan.layers for t in pair]
            step_fn(
                target, acc.grad.contiguous(), acc.state["m"], acc.state["v"],
                acc.state.get("r"), acc.state.get("c"), acc.row_factor, acc.col_factor,
                acc.state.get("vd"), layers, d1, d0, float(plan.lr_mult[i]), group["lr"],
                group["weight_decay"], cfg.step_mult, cfg.exp_mult,
            )  # fmt: skip
            if target.data_ptr() != p.data_ptr():
                p.copy_(target.reshape(p.shape))
            state.update(core.advance_tensor_state(plan, i, state, acc.state))
            state["step"] += 1
        return plan.state

    def _collect_all(self) -> list[tuple[torch.Tensor, torch.Tensor, dict, dict]]:
        """Every parameter with a gradient, across groups: VeLO's LSTM sees all of them at once."""
        work = []
        maximize = None
        for group in self.param_groups:
            items = self._collect(group)  # the base class's checks and lazy state
            if items and maximize is not None and group["maximize"] != maximize:
                raise ValueError(
                    "VeLO feeds one training loss to all parameters, so maximize must be the "
                    "same in every param group"
                )
            if items:
                maximize = group["maximize"]
            work += [(item.param, item.grad, group, item.state) for item in items]
        devices = {p.device for p, *_ in work}
        if len(devices) > 1:
            raise RuntimeError(
                f"VeLO's LSTM couples all tensors through a max-pool, so every parameter must be "
                f"on one device; got {sorted(str(d) for d in devices)}"
            )
        return work
