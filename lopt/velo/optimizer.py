"""``lopt.velo.VeLO``: VeLO as a ``torch.optim.Optimizer`` (design: docs/design/velo.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from ..optimizer import _check_hyper
from . import core, kernels
from .config import VELO, VeLOConfig
from .theta import Theta, validate_theta

GLOBAL_STATE_KEY = "velo"  # optimizer.state[...] entry for t and the loss buffer


class VeLO(Optimizer):
    r"""VeLO (Metz et al. 2022, arXiv 2211.09760) with lozoo's conventions.

    Every step feeds the training loss and the fraction of ``num_steps`` done to a per-tensor
    LSTM; it mixes weight banks into one small MLP per tensor, which maps 30 per-element
    features to the step::

        p ← p·(1 − lr·weight_decay) − lr · lr_mult · rms(p) · d · exp(exp_mult·m) · step_mult

    Args:
        params: iterable of tensors or of param-group dicts.
        weights: meta-weights θ as a dict of tensors (see :meth:`VeLOConfig.theta_shapes`).
        config: the :class:`VeLOConfig` θ belongs to (default: the published architecture).
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

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        weights: Mapping[str, torch.Tensor] | None = None,
        config: VeLOConfig | None = None,
        *,
        num_steps: int | None = None,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        maximize: bool = False,
        backend: str = "auto",
    ) -> None:
        self.num_steps: int = core.check_num_steps(num_steps)
        self.backend: str = kernels.check_backend(backend)
        lr = _check_hyper("lr", lr)
        weight_decay = _check_hyper("weight_decay", weight_decay)
        if weights is None:
            raise ValueError(
                "VeLO needs meta-weights: import PyLO's checkpoint with 'python -m zoo "
                "import-pylo VeLO_RNN_DIR VeLO_MLP_DIR --name velo/pylo' and pass the loaded "
                "entry's theta, or pass a θ dict (lopt.velo.init_theta gives a random one)"
            )
        self.config: VeLOConfig = config or VELO
        self._theta_cpu: Theta = validate_theta(weights, self.config)
        self._theta_by_device: dict[torch.device, Theta] = {}
        defaults = {"lr": lr, "weight_decay": weight_decay, "maximize": bool(maximize)}
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_hyper("lr", group["lr"])
            _check_hyper("weight_decay", group["weight_decay"])

    @property
    def theta(self) -> Theta:
        return self._theta_cpu

    def _theta_on(self, device: torch.device) -> Theta:
        if device not in self._theta_by_device:
            self._theta_by_device[device] = {k: v.to(device) for k, v in self._theta_cpu.items()}
        return self._theta_by_device[device]

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
        work = self._collect()
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
                new = params[i] * (1 - lr * wd) - lr * steps[i] if wd else params[i] - lr * steps[i]
                p.copy_(new)
                state.update(new_state["tensors"][i])
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
        return plan.state

    def _collect(self) -> list[tuple[torch.Tensor, torch.Tensor, dict, dict]]:
        work = []
        maximize = None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("VeLO does not support sparse gradients")
                if torch.is_complex(p):
                    raise RuntimeError(
                        "VeLO does not support complex parameters; optimise "
                        "torch.view_as_real(param) instead"
                    )
                if maximize is not None and group["maximize"] != maximize:
                    raise ValueError(
                        "VeLO feeds one training loss to all parameters, so maximize must be the "
                        "same in every param group"
                    )
                maximize = group["maximize"]
                state = self.state[p]
                if len(state) == 0:
                    state.update(core.init_tensor_state(p, self.config))
                work.append((p, p.grad, group, state))
        devices = {p.device for p, *_ in work}
        if len(devices) > 1:
            raise RuntimeError(
                f"VeLO's LSTM couples all tensors through a max-pool, so every parameter must be "
                f"on one device; got {sorted(str(d) for d in devices)}"
            )
        return work
