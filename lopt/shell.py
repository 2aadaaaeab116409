"""``lopt.LearnedOptimizer``: the one ``torch.optim.Optimizer`` base of every architecture's shell.

Shaped like torch's ``adamw.py``: a validating constructor, lazy float32 per-parameter state,
``step(closure=None)`` and a per-group update routine. An architecture's shell is a subclass that
names its registry entry::

    class MLPLOpt(LearnedOptimizer):
        architecture = "mlp_lopt"

and, optionally, overrides :meth:`LearnedOptimizer._update_group` (small_fc_lopt does, to run
its fused kernels) and :meth:`LearnedOptimizer.check_backend`. The base class owns everything
else: weights resolution (dict, file, zoo reference), hyper-parameter checks, param groups and
``lr_scheduler`` support (``lr`` multiplies the learned step), decoupled weight decay,
``maximize``, the planned ``num_steps``, the closure's loss, and ``state_dict`` resume with a
record of the meta-weights and the architecture they belong to.

Where cross-architecture policies go (so they are written once):

* per-gradient checks belong in :meth:`LearnedOptimizer._collect`, which sees every
  ``(param, grad, state)`` of a group before any architecture math runs; the non-finite
  gradient policy (:mod:`lopt.nonfinite`) is applied there, so every shell and backend has it;
* checks of a loaded ``state_dict``'s origin belong in
  :meth:`LearnedOptimizer._check_weights_record`, which sees the saved meta-weights record first.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple

import torch
from torch.optim import Optimizer

from .architecture import (
    LEGACY_ARCHITECTURE,
    Architecture,
    Theta,
    get_architecture,
    theta_sha256,
)
from .nonfinite import NonFiniteGuard
from .weights import WeightsSpec, resolve_weights

SHELL_BACKENDS = ("auto", "torch")
"""Backends of a shell without compiled kernels: both run the architecture's pure ``update``."""


class TensorWork(NamedTuple):
    """One parameter to step: the tensor, its gradient and its (float32) optimizer state."""

    param: torch.Tensor
    grad: torch.Tensor
    state: dict[str, Any]


def check_hyper(name: str, value: Any) -> float:
    """A non-negative finite float (a 1-element tensor is accepted), else a ``ValueError``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (expected a non-negative finite float)")
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"Invalid {name}: {value} (expected a non-negative finite float)")
    return float(value)


def check_num_steps(num_steps: Any) -> int | None:
    if num_steps is None:
        return None
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(
            f"Invalid num_steps: {num_steps!r} (expected the planned number of optimizer steps, "
            "a positive int, or None when unknown)"
        )
    return num_steps


class LearnedOptimizer(Optimizer):
    r"""Base class of the learned optimizers' ``torch.optim`` shells.

    Args:
        params: iterable of tensors, of ``(name, tensor)`` pairs (``model.named_parameters()``;
            architectures that route by name use them) or of param-group dicts.
        weights: meta-weights θ: a dict of tensors, a ``.safetensors`` path, or a zoo reference
            (``"family/name"``, ``"family/name:1.0.0"``). ``None`` loads the shell's
            :attr:`default_weights` (an error for shells that have none).
        config: the architecture config (or preset name) θ was trained with. Files and zoo
            entries carry their own config; for a dict it defaults to the preset whose shapes
            match.
        lr: multiplier of the learned step (default 1.0), so every ``lr_scheduler`` works.
        weight_decay: decoupled (AdamW-style) weight decay, applied as ``p·(1 − lr·wd)``.
        maximize: maximise the objective instead of minimising it.
        backend: how the step is computed; ``"auto"`` and ``"torch"`` everywhere, and whatever
            compiled kernels an architecture adds. Not part of the state: a checkpoint saved with
            one backend resumes with any other.
        num_steps: the planned total number of ``step()`` calls, for architectures whose update
            depends on training progress (ignored by the others).
        nonfinite: what a gradient holding NaN or ±inf does: ``"skip"`` (default) leaves that
            tensor's parameter, state and step count unchanged for the step, counts it in
            :attr:`nonfinite_skips` and warns once; ``"raise"`` raises
            :class:`lopt.NonFiniteGradientError` before anything is updated
            (:mod:`lopt.nonfinite`).

    Meta-weights are shared by all parameters and are not optimizer state: ``state_dict()``
    records their sha256, source and architecture, not the tensors.
    """

    architecture: ClassVar[str] = ""
    """Registry name of the architecture this shell runs (set by every subclass)."""
    default_weights: ClassVar[str | None] = None
    """Zoo reference loaded for ``weights=None`` (``None``: weights are required)."""
    io_group_options: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    """Param-group options for a model's input and output matrices (embeddings, output heads).

    A harness that knows which matrices are hidden (as Muon setups do, handing the rest to AdamW)
    puts the others in a group with these options. Empty (the default): the architecture has
    no distinct treatment for them and they take the learned rule like every other tensor.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        weights: WeightsSpec = None,
        config: Any = None,
        *,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        maximize: bool = False,
        backend: str = "auto",
        num_steps: int | None = None,
        nonfinite: str = "skip",
    ) -> None:
        if not type(self).architecture:
            raise TypeError(
                f"{type(self).__name__} must set the class attribute 'architecture' to a "
                "registered architecture name"
            )
        lr = check_hyper("lr", lr)
        self.backend: str = self.check_backend(backend)
        weight_decay = check_hyper("weight_decay", weight_decay)
        self.num_steps: int | None = check_num_steps(num_steps)
        self._nonfinite = NonFiniteGuard(nonfinite, type(self).__name__)
        found = resolve_weights(
            weights,
            config,
            architecture=type(self).architecture,
            default_ref=type(self).default_weights,
            owner=type(self).__name__,
        )
        self.config = found.config
        self._theta_cpu: Theta = found.theta
        self._theta_by_device: dict[torch.device, Theta] = {}
        self.meta_weights_info: dict[str, str] = {"sha256": theta_sha256(found.theta), **found.info}
        defaults = {"lr": lr, "weight_decay": weight_decay, "maximize": bool(maximize)}
        super().__init__(params, defaults)
        for group in self.param_groups:
            check_hyper("lr", group["lr"])
            check_hyper("weight_decay", group["weight_decay"])
        self._register_hooks()

    # -- construction helpers --------------------------------------------------------------------
    @classmethod
    def check_backend(cls, backend: str) -> str:
        """Validate ``backend`` (and, for compiled kernels, that they can run here)."""
        if backend not in SHELL_BACKENDS:
            raise ValueError(
                f"unknown backend {backend!r} for {cls.__name__}; valid backends: "
                + ", ".join(repr(b) for b in SHELL_BACKENDS)
            )
        return backend

    @classmethod
    def from_zoo(cls, ref: str, params, **kwargs: Any) -> LearnedOptimizer:
        """Build the optimizer from a zoo entry, e.g. ``cls.from_zoo("family/name", params)``."""
        return cls(params, weights=ref, **kwargs)

    @property
    def arch(self) -> Architecture:
        """The registry record of this shell's architecture."""
        return get_architecture(type(self).architecture)

    @property
    def nonfinite_skips(self) -> int:
        """Tensor updates skipped so far because their gradient held NaN or ±inf."""
        return self._nonfinite.skips

    @property
    def theta(self) -> Theta:
        """The meta-weights (float32, on the CPU)."""
        return self._theta_cpu

    def _theta_on(self, device: torch.device) -> Theta:
        if device not in self._theta_by_device:
            self._theta_by_device[device] = {k: v.to(device) for k, v in self._theta_cpu.items()}
        return self._theta_by_device[device]

    def _register_hooks(self) -> None:
        self.register_state_dict_post_hook(LearnedOptimizer._add_weights_record)
        self.register_load_state_dict_pre_hook(LearnedOptimizer._check_weights_record)
        self.register_load_state_dict_post_hook(LearnedOptimizer._restore_fp32_state)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(
            config=self.config,
            _theta_cpu=self._theta_cpu,
            meta_weights_info=self.meta_weights_info,
            backend=self.backend,
            num_steps=self.num_steps,
            _nonfinite=self._nonfinite,
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from_pickle = "_optimizer_state_dict_post_hooks" not in state
        super().__setstate__(state)
        self.__dict__.setdefault("_theta_by_device", {})
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("num_steps", None)
        self.__dict__.setdefault("_nonfinite", NonFiniteGuard("skip", type(self).__name__))
        for group in self.param_groups:
            group.setdefault("weight_decay", 0.0)
            group.setdefault("maximize", False)
        if from_pickle:  # hooks are not pickled by torch.optim.Optimizer
            self._register_hooks()

    # -- stepping ---------------------------------------------------------------------------------
    def _collect(self, group: dict[str, Any]) -> list[TensorWork]:
        """The parameters of ``group`` that have a gradient, with lazily created fp32 state.

        This is the one place every gradient passes before any architecture's math: checks and
        policies on gradients that hold for all architectures go here. A tensor whose gradient
        holds NaN or ±inf is left out (or raises), per the ``nonfinite`` policy.
        """
        found = []
        name = type(self).__name__
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            if grad.is_sparse:
                raise RuntimeError(
                    f"{name} does not support sparse gradients; use dense gradients "
                    "(e.g. nn.Embedding(..., sparse=False))"
                )
            if torch.is_complex(p) or torch.is_complex(grad):
                raise RuntimeError(
                    f"{name} does not support complex parameters or gradients; optimise "
                    "torch.view_as_real(param) instead"
                )
            found.append((p, grad))
        work = []
        for p, grad in self._nonfinite.filter(found, self._describe_param):
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state.update(self.arch.init_tensor_state(p, self.config))
            work.append(TensorWork(p, grad, state))
        return work

    def _describe_param(self, item: tuple[torch.Tensor, torch.Tensor]) -> str:
        params = [p for g in self.param_groups for p in g["params"]]
        index = next(i for i, p in enumerate(params) if p is item[0])
        return f"parameter {index} (shape {tuple(item[0].shape)})"

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step; ``closure`` (optional) re-evaluates the model and its loss.

        The closure's loss is returned and passed to the architecture's update as ``loss``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # every group is collected (and checked) before any is updated: a raise changes nothing
        collected = [(group, self._collect(group)) for group in self.param_groups]
        for group, work in collected:
            if work:
                self._update_group(group, work, loss=loss)
        return loss

    def _update_group(
        self, group: dict[str, Any], work: list[TensorWork], *, loss: Any = None
    ) -> None:
        """Step the tensors of one param group in place.

        The default runs the architecture's pure ``update`` in float32 on the tensors that share
        a device and a step count (normally all of them), then writes parameters (in their own
        dtype) and state back. Architectures with compiled kernels override this.
        """
        buckets: dict[tuple[torch.device, float], list[TensorWork]] = {}
        for item in work:
            buckets.setdefault((item.param.device, float(item.state["step"])), []).append(item)
        for (device, t), items in buckets.items():
            params = {str(i): w.param.detach().to(torch.float32) for i, w in enumerate(items)}
            grads = {}
            for i, w in enumerate(items):
                g = w.grad.detach().to(torch.float32)
                grads[str(i)] = -g if group["maximize"] else g
            state = {
                "t": torch.tensor(t, dtype=torch.float32, device=device),
                "tensors": {
                    str(i): {k: v for k, v in w.state.items() if k != "step"}
                    for i, w in enumerate(items)
                },
            }
            new_params, new_state = self.arch.update(
                self._theta_on(device),
                state,
                params,
                grads,
                self.config,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                loss=_loss_tensor(loss, device),
                num_steps=self.num_steps,
            )
            for i, w in enumerate(items):
                w.param.copy_(new_params[str(i)])
                for key, value in new_state["tensors"][str(i)].items():
                    w.state[key] = value
                w.state["step"] += 1

    # -- state_dict hooks: record which meta-weights the state belongs to ------------------------
    @staticmethod
    def _add_weights_record(opt: LearnedOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict["meta_weights"] = dict(
            opt.meta_weights_info,
            architecture=type(opt).architecture,
            config=opt.config.to_dict(),
        )
        return state_dict

    @staticmethod
    def _check_weights_record(opt: LearnedOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Check where a state dict comes from before torch adopts any of it.

        Refused (``ValueError``): a state dict without a meta-weights record (another kind of
        optimizer's, e.g. AdamW's, whose ``lr``/``weight_decay`` would otherwise be adopted
        silently), one saved by another architecture, and per-parameter state whose keys or
        shapes are not what this architecture keeps for that parameter. Different meta-weights
        of the same architecture only warn: the state is valid, the trajectory just changes.
        """
        record = state_dict.pop("meta_weights", None)
        check_state_origin(opt, state_dict, record)
        if record.get("sha256") != opt.meta_weights_info["sha256"]:
            warnings.warn(
                "loading optimizer state saved with different meta-weights "
                f"(saved sha256 {record.get('sha256', '?')[:12]} from {record.get('source')}, "
                f"current {opt.meta_weights_info['sha256'][:12]} from "
                f"{opt.meta_weights_info['source']}); training will not resume identically",
                stacklevel=3,
            )
        # torch casts floating state to the parameter dtype on load; keep our fp32 copies.
        opt._loaded_state = state_dict["state"]
        opt._loaded_groups = state_dict["param_groups"]
        return state_dict

    @staticmethod
    def _restore_fp32_state(opt: LearnedOptimizer) -> None:
        saved_state = opt.__dict__.pop("_loaded_state", {})
        saved_groups = opt.__dict__.pop("_loaded_groups", [])
        saved_ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in opt.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for key, value in saved_state.get(pid, {}).items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    device = p.device if key != "step" else torch.device("cpu")
                    opt.state[p][key] = value.to(device=device, dtype=torch.float32).clone()


def check_state_origin(
    opt: LearnedOptimizer, state_dict: dict[str, Any], record: dict[str, Any] | None
) -> None:
    """The origin checks of :meth:`LearnedOptimizer._check_weights_record` (see there)."""
    name, arch = type(opt).__name__, type(opt).architecture
    fix = f"load a state dict saved by {name}, or start {name} fresh (skip load_state_dict)"
    if not isinstance(record, dict):
        groups = state_dict.get("param_groups") or [{}]
        hyper = sorted(k for k in groups[0] if k != "params")
        raise ValueError(
            f"{name}.load_state_dict: this state dict has no 'meta_weights' record, so no lozoo "
            f"learned optimizer saved it (its param groups hold {', '.join(hyper) or 'nothing'}"
            f"; another optimizer's state, e.g. AdamW's, cannot seed a learned optimizer); {fix}"
        )
    saved_arch = record.get("architecture", LEGACY_ARCHITECTURE)  # records before the seam
    if saved_arch != arch:
        raise ValueError(
            f"{name}.load_state_dict: the state dict was saved by a {saved_arch!r} optimizer, "
            f"this one is {arch!r}; their per-parameter states differ; {fix}"
        )
    saved_ids = [i for g in state_dict.get("param_groups", []) for i in g.get("params", [])]
    params = [p for g in opt.param_groups for p in g["params"]]
    saved_state = state_dict.get("state", {})
    for index, (pid, p) in enumerate(zip(saved_ids, params)):
        saved = saved_state.get(pid)
        if not saved:
            continue  # that parameter had not stepped yet
        template = opt.arch.init_tensor_state(p.detach().to("meta"), opt.config)
        expected = {"step": (), **{k: tuple(v.shape) for k, v in template.items()}}
        where = f"{name}.load_state_dict: parameter {index} (shape {tuple(p.shape)})"
        if set(saved) != set(expected):
            missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
            raise ValueError(
                f"{where}: saved state has keys {sorted(saved)}, {arch} keeps "
                f"{sorted(expected)} (missing {missing}, unexpected {extra}); the state dict "
                f"belongs to another optimizer or to other parameters; {fix}"
            )
        for key, shape in expected.items():
            got = tuple(torch.as_tensor(saved[key]).shape)
            if got != shape and not (key == "step" and got in ((), (1,))):
                raise ValueError(
                    f"{where}: saved state {key!r} has shape {got}, {arch} keeps {shape} for "
                    "this parameter; the state dict belongs to other parameters (a different "
                    f"model, or parameters in another order); {fix}"
                )


def _loss_tensor(loss: Any, device: torch.device) -> torch.Tensor | None:
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        return loss.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(loss), dtype=torch.float32, device=device)


def make_optimizer(params, weights: WeightsSpec, config: Any = None, **kwargs: Any):
    """The shell of whatever architecture ``weights`` holds, e.g.
    ``lopt.make_optimizer(model.parameters(), "mlp_lopt/quick")``."""
    found = resolve_weights(weights, config, owner="make_optimizer")
    cls = get_architecture(type(found.config).architecture).optimizer
    return cls(params, weights=found, **kwargs)
