"""``torch.optim`` shells of the Celo2 family and ELO, on :class:`lopt.LearnedOptimizer`.

The base class owns weights resolution, param groups, schedulers, ``maximize``, ``state_dict``
resume and the meta-weights record; these shells add the compiled backends and, for the Celo2
family, the Adam branch and a per-group routing option.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from .. import kernels as small_fc_kernels
from ..architecture import Theta
from ..core import factored_dims
from ..shell import LearnedOptimizer, TensorWork
from ..weights import WeightsSpec
from . import core, fused, multi_tensor
from .config import Celo2Config

BACKENDS = ("auto", "torch", "cpp", "cuda")
_MAX_CAPTURED = 64  # CUDA graphs one optimizer keeps (one per bucket of tensors stepping together)


def _check_backend(cls: type, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r} for {cls.__name__}; valid backends: "
            + ", ".join(repr(b) for b in BACKENDS)
        )
    return backend


def _check_foreach(foreach: Any) -> None:
    if foreach is not None and not isinstance(foreach, bool):
        raise ValueError(
            f"foreach must be None (on for CUDA tensors), True or False, got {foreach!r}"
        )


def _columns(
    items: list[tuple[TensorWork, torch.Tensor]],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[dict]]:
    """``(params, grads, states)`` of a bucket."""
    return [w.param for w, _ in items], [g for _, g in items], [w.state for w, _ in items]


class Celo2(LearnedOptimizer):
    r"""Celo2 (Moudgil, Knyazev, Belilovsky, ICLR 2026): a learned per-element rule whose matrix
    updates are Newton–Schulz orthogonalised and rescaled to unit RMS (docs/design/celo2.md)::

        learned tensors:       p ← p·(1 − lr·wd) − lr·step_mult·u          (RMS of u = 1)
        Adam-branch tensors:   the same with lr·adam_lr_mult for lr

    With the default ``step_mult = 1e-3``, ``lr = 1`` is the meta-training step size; ``lr`` is a
    multiplier every ``lr_scheduler`` can drive (PyLO's ``lr = x`` is ``lr = x / 1e-3`` here).

    Tensors of rank <= 1 and parameters whose group sets ``adam=True`` take the Adam branch (as
    the config routes them); ``adam=False`` in a group forces the learned rule. Embeddings are
    recognised by name (the config's ``adam_name_pattern``, ``"embed"``) when the optimizer is
    built from ``model.named_parameters()``; with bare tensors it sees no names, so put them, and
    an untied output head, in a group with ``adam=True``::

        Celo2(model.named_parameters(), theta)
        Celo2([{"params": body}, {"params": model.embed.parameters(), "adam": True}], theta)

    Args: as :class:`lopt.LearnedOptimizer`; ``backend`` is ``"auto"`` (the compiled kernel of
    each parameter's device when it is available, else the torch path with one warning),
    ``"torch"``, ``"cpp"`` or ``"cuda"``. ``foreach`` (also a param-group option) steps the
    Adam branch with multi-tensor ops and stacks same-shape tensors through the kernel
    (:mod:`lopt.celo2.multi_tensor`); ``None`` means on for CUDA tensors, as in ``torch.optim``.
    It changes launches, not results. ``cuda_graphs=True`` goes further on CUDA: each bucket's
    direction (accumulators, the op, Newton–Schulz, the rescale) is recorded once in a CUDA graph
    and replayed, for a bucket's buffers and graph memory kept between steps (about the size of
    the bucket's parameters and state again); the learning rate stays outside the graph, so
    schedulers work.
    """

    architecture: ClassVar[str] = "celo2"
    io_group_options: ClassVar[Mapping[str, Any]] = MappingProxyType({"adam": True})
    """Embeddings and the output head take the Adam branch: the paper's "distinct rules for
    input-output and hidden weights" at deployment (docs/design/celo2.md, "Using the
    optimizers")."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        weights: WeightsSpec = None,
        config: Any = None,
        *,
        foreach: bool | None = None,
        cuda_graphs: bool = False,
        **kwargs: Any,
    ) -> None:
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
        _check_foreach(foreach)
        super().__init__(params, weights, config, **kwargs)  # checks each group's own foreach
        self.cuda_graphs = cuda_graphs
        self.defaults["foreach"] = foreach  # groups added later inherit it, as in torch.optim
        for group in self.param_groups:
            group.setdefault("foreach", foreach)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _check_foreach(param_group.get("foreach"))
        super().add_param_group(param_group)

    @classmethod
    def check_backend(cls, backend: str) -> str:
        backend = _check_backend(cls, backend)
        if backend in ("cpp", "cuda"):
            device = "cpu" if backend == "cpp" else "cuda"
            if not fused.op_is_available(device):
                raise RuntimeError(
                    f"backend={backend!r} is unavailable: {fused.unavailable_reason(device)}; "
                    "run `python -m lopt.kernels build` to see the build log, or use "
                    "backend='torch'"
                )
        return backend

    def _register_hooks(self) -> None:
        super()._register_hooks()
        # Before the base class's checks, which consume the meta-weights record.
        self.register_load_state_dict_pre_hook(Celo2._check_state_frame, prepend=True)

    @staticmethod
    def _check_state_frame(opt: Celo2, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Refuse learned state saved under another frame of the rule (``layout``/``conv_mode``).

        The learned state lives in the rule's frame. Under another frame its shapes differ (conv
        kernels), or match with the axes swapped (square matrices under another layout), and the
        base class's shape check would blame "other parameters"; this names the field instead.
        Tensors whose frame the change leaves alone (matrices under another ``conv_mode``, the
        Adam branch) do not count, so switching ``conv_mode`` on a model without convs resumes.
        """
        record = state_dict.get("meta_weights")
        if not isinstance(record, dict) or record.get("architecture") != type(opt).architecture:
            return state_dict  # the base class refuses it with the reason
        saved = record.get("config") if isinstance(record.get("config"), dict) else {}
        # records written before a field existed carry its default
        frame = {f: saved.get(f, getattr(Celo2Config, f)) for f in core.FRAME_FIELDS}
        changed = [f for f in core.FRAME_FIELDS if frame[f] != getattr(opt.config, f)]
        if not changed:
            return state_dict
        try:
            saved_cfg = dataclasses.replace(opt.config, **frame)
        except ValueError:
            saved_cfg = None  # an invalid saved frame: nothing carries over
        saved_ids = [i for g in state_dict.get("param_groups", []) for i in g.get("params", [])]
        params = [p for g in opt.param_groups for p in g["params"]]
        for index, (pid, p) in enumerate(zip(saved_ids, params)):
            state = state_dict.get("state", {}).get(pid)
            if not state or core.is_adam_state(state):
                continue
            if saved_cfg is None or not core.same_frame(p.shape, opt.config, saved_cfg):
                name = type(opt).__name__
                was = ", ".join(f"{f}={frame[f]!r}" for f in changed)
                now = ", ".join(f"{f}={getattr(opt.config, f)!r}" for f in changed)
                raise ValueError(
                    f"{name}.load_state_dict: the state dict was saved with {was}, this "
                    f"optimizer has {now}; the learned state of parameter {index} (shape "
                    f"{tuple(p.shape)}) lives in the rule's frame, which that changes, so it "
                    f"cannot carry over; build {name} with {was} to resume, or start fresh "
                    "(skip load_state_dict)"
                )
        return state_dict

    def _collect(self, group: dict[str, Any]) -> list[TensorWork]:
        if "adam" in group:
            if not isinstance(group["adam"], bool):
                raise ValueError(
                    f"param group option 'adam' must be True or False, got {group['adam']!r}"
                )
            branches = [group["adam"]] * len(group["params"])
        elif "param_names" in group:  # built from named_parameters(): route as the config says
            branches = [
                core.routes_to_adam(name, p.shape, self.config)
                for name, p in zip(group["param_names"], group["params"])
            ]
        else:
            branches = [None] * len(group["params"])  # by rank (the base class's default)
        for p, adam in zip(group["params"], branches):
            if adam is not None and p.grad is not None and len(self.state[p]) == 0:
                state = self.state[p]
                state["step"] = torch.zeros((), dtype=torch.float32)
                state.update(core.init_tensor_state(p, self.config, adam=adam))
        return super()._collect(group)

    def _args_on(self, device: torch.device) -> list[torch.Tensor]:
        cache = self.__dict__.setdefault("_args_by_device", {})
        if device not in cache:
            cache[device] = fused.theta_args(self._theta_on(device))
        return cache[device]

    def _captured(
        self, device: torch.device, ref_shape: tuple[int, ...], params: list[torch.Tensor]
    ) -> multi_tensor.CapturedStack | None:
        """The CUDA graph of one bucket, recorded the first time these tensors step together;
        ``None`` (with one warning, and graphs off from then on) if recording fails."""
        cache = self.__dict__.setdefault("_captured_stacks", {})
        key = (device, ref_shape, tuple(id(p) for p in params))
        if key not in cache:
            if len(cache) >= _MAX_CAPTURED:  # buckets keep changing: drop the old graphs
                cache.clear()
            stack = multi_tensor.Stack(self._args_on(device), ref_shape, len(params),
                                       self.config, device)  # fmt: skip
            try:
                cache[key] = multi_tensor.CapturedStack(stack)
            except RuntimeError as err:  # e.g. called inside another capture
                self.cuda_graphs = False
                cache.clear()
                warnings.warn(
                    f"{type(self).__name__}(cuda_graphs=True): recording a CUDA graph failed "
                    f"({err}); stepping without graphs from now on (same results, more "
                    "launches). Pass cuda_graphs=False to skip the attempt",
                    RuntimeWarning,
                    stacklevel=5,  # _captured, _update_group, step, no_grad's wrapper, caller
                )
                return None
        return cache[key]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_args_by_device", None)
        state.pop("_captured_stacks", None)  # graphs are recorded again on the first step
        state["cuda_graphs"] = self.cuda_graphs
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("cuda_graphs", False)

    def _update_group(
        self, group: dict[str, Any], work: list[TensorWork], *, loss: Any = None
    ) -> None:
        cfg = self.config
        lr, wd = group["lr"], group["weight_decay"]
        grads = [-w.grad if group["maximize"] else w.grad for w in work]
        if cfg.global_clip_norm is not None:  # over this group's gradients
            scale = core.global_clip_scale(dict(enumerate(grads)), cfg.global_clip_norm)
            grads = [g.float() * scale.to(g.device) for g in grads]
        # The multi-tensor path takes float32 tensors by bucket; a bucket of one, and every
        # other tensor, steps alone. Buckets: Adam by (device, step count); learned by (device,
        # reference shape), on the kernel only.
        foreach = group.get("foreach")  # absent in state dicts saved before the option existed
        adam_buckets: dict[tuple, list[tuple[TensorWork, torch.Tensor]]] = {}
        learned_buckets: dict[tuple, list[tuple[TensorWork, torch.Tensor]]] = {}
        alone: list[tuple[TensorWork, torch.Tensor, bool]] = []
        for w, grad in zip(work, grads):
            device = w.param.device
            graphs = multi_tensor.graphs_apply(self.cuda_graphs, device)
            many = multi_tensor.wants_foreach(foreach, device) or graphs
            use_kernel = False  # the Adam branch has no kernel: no backend to resolve for it
            if core.is_adam_state(w.state):
                if many and w.param.dtype == torch.float32:
                    key = (device, float(w.state["step"]))
                    adam_buckets.setdefault(key, []).append((w, grad))
                    continue
            else:
                use_kernel = fused.resolve_backend(self.backend, device) == "kernel"
                ref_shape = multi_tensor.stack_key(w.param, cfg) if many and use_kernel else None
                if ref_shape is not None:
                    learned_buckets.setdefault((device, ref_shape), []).append((w, grad))
                    continue
            alone.append((w, grad, use_kernel))
        for (device, ref_shape), items in learned_buckets.items():
            if multi_tensor.graphs_apply(self.cuda_graphs, device):
                captured = self._captured(device, ref_shape, [w.param for w, _ in items])
                if captured is not None:
                    captured.step(*_columns(items), lr=lr, weight_decay=wd)
                    continue
            if len(items) == 1:
                alone.append((*items[0], True))
                continue
            multi_tensor.step_learned_stacked_(
                self._args_on(device), *_columns(items), cfg, lr=lr, weight_decay=wd
            )
        for items in adam_buckets.values():
            t = items[0][0].state["step"] + 1  # on the host: a device copy would wait for the GPU
            multi_tensor.step_adam_foreach_(*_columns(items), t, cfg, lr=lr, weight_decay=wd)
        for w, grad, use_kernel in alone:
            if core.is_adam_state(w.state):
                t = w.state["step"] + 1
                fused.step_adam_(w.param, grad, w.state, t, cfg, lr=lr, weight_decay=wd)
            else:
                theta = self._theta_on(w.param.device)
                args = self._args_on(w.param.device) if use_kernel else None
                fused.step_learned_(theta, args, w.param, grad, w.state, cfg, lr=lr,
                                    weight_decay=wd, use_kernel=use_kernel)  # fmt: skip
        torch._foreach_add_([w.state["step"] for w in work], 1)


class Celo2Base(Celo2):
    """Celo2-base: the learned rule on every tensor, no orthogonalisation (see :class:`Celo2`)."""

    architecture: ClassVar[str] = "celo2_base"
    io_group_options: ClassVar[Mapping[str, Any]] = MappingProxyType({})  # no Adam branch


class PyloCelo2(Celo2):
    """PyLO's CELO2 (bias-corrected AdamW branch, ±1000 clip everywhere); see :class:`Celo2`."""

    architecture: ClassVar[str] = "pylo_celo2"


class EloCelo2(Celo2):
    """PyLO's ELO_CELO2 (PyLO's CELO2 with global-norm clipping at 1.0 per param group)."""

    architecture: ClassVar[str] = "elo_celo2"


class Elo(LearnedOptimizer):
    r"""PyLO's ELO: small_fc_lopt's per-element rule with a 32-unit MLP and fixed decays::

        p ← p·(1 − lr·wd) − lr·step_mult·d·exp(exp_mult·m)

    ``lr = 1`` is PyLO's peak ``step_mult = 1e-3``; PyLO's built-in warm-up is not part of the
    rule (drive ``lr`` with a scheduler). The compiled backends are small_fc_lopt's kernels.
    """

    architecture: ClassVar[str] = "elo"

    @classmethod
    def check_backend(cls, backend: str) -> str:
        _check_backend(cls, backend)
        return small_fc_kernels.check_backend(backend)

    def _update_group(
        self, group: dict[str, Any], work: list[TensorWork], *, loss: Any = None
    ) -> None:
        cfg = self.config
        sfc = cfg.small_fc_config()
        prepared: dict[torch.device, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        for p, grad, state in work:
            if p.device not in prepared:
                theta: Theta = self._theta_on(p.device)
                decays = torch.cat(cfg.decays(p)).contiguous()
                layers = [theta[k].contiguous() for k in ("w0", "b0", "w1", "b1", "w2", "b2")]
                prepared[p.device] = decays, layers
            decays, layers = prepared[p.device]
            d1, d0 = factored_dims(p.shape, sfc.tie_break) or (-1, -1)
            step_fn = small_fc_kernels.step_function(self.backend, p.device)
            target = p if p.is_contiguous() else p.contiguous()
            step_fn(
                target, grad, state["m"], state["v"], state.get("r"), state.get("c"),
                state.get("vd"), decays, layers, d1, d0, float(state["step"]), group["lr"],
                group["weight_decay"], cfg.step_mult, cfg.exp_mult, group["maximize"],
            )  # fmt: skip
            if target is not p:
                p.copy_(target)
            state["step"] += 1
