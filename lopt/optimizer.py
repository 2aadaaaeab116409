"""``lopt.SmallFCLOpt``: small_fc_lopt as a drop-in ``torch.optim.Optimizer``.

A thin stateful shell over :mod:`lopt.core`, shaped like torch's ``adamw.py``: a validating
constructor, lazy per-parameter state, ``step(closure=None)`` and a functional routine below it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from . import core, kernels, shadowing
from .config import SmallFCConfig, preset
from .theta import Theta, load_theta, theta_sha256, validate_theta

WeightsSpec = Mapping[str, torch.Tensor] | str | os.PathLike | None
DEFAULT_ZOO_REF = "small_fc_lopt/mlp_mnist"


def _check_hyper(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (expected a non-negative finite float)")
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"Invalid {name}: {value} (expected a non-negative finite float)")
    return float(value)


def resolve_weights(
    weights: WeightsSpec, config: SmallFCConfig | str | None
) -> tuple[Theta, SmallFCConfig, dict[str, str]]:
    """Turn any accepted meta-weights spec into ``(θ, config, source info)``.

    Accepted: a θ dict, a path to a ``.safetensors`` file, or a zoo reference such as
    ``"small_fc_lopt/mlp_mnist"`` / ``"name:1.2.0"``. ``None`` means the default zoo entry.
    """
    cfg = preset(config) if isinstance(config, str) else config
    default = weights is None
    if default:
        weights = DEFAULT_ZOO_REF
    if isinstance(weights, Mapping):
        cfg = cfg or _infer_config(weights)
        theta = validate_theta(weights, cfg)
        return theta, cfg, {"source": "dict"}
    if isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        if os.path.isfile(path) or not _is_zoo_ref(path):
            theta, file_cfg = load_theta(path, cfg)
            return theta, file_cfg, {"source": f"file:{os.path.abspath(path)}"}
        zoo = shadowing.import_sibling("zoo")  # resolves names, versions; verifies hashes

        try:
            entry = zoo.load(path)
        except (zoo.EntryNotFoundError, zoo.InvalidRefError) as err:
            if default:
                raise type(err)(
                    f"SmallFCLOpt(weights=None) loads the default zoo entry {DEFAULT_ZOO_REF!r}, "
                    f"which is not installed: {err}"
                ) from None
            if ":" in path:
                raise
            raise type(err)(f"{err} (no file named {path!r} exists either)") from None
        if cfg is not None and cfg != entry.config:
            raise ValueError(
                f"zoo entry {entry.ref} was trained with config {entry.config}, "
                f"which differs from the config passed ({cfg}); drop config=..."
            )
        return entry.theta, entry.config, {"source": f"zoo:{entry.ref}"}
    raise TypeError(
        "weights must be a dict of tensors, a path to a .safetensors file or a zoo reference, "
        f"got {type(weights).__name__}"
    )


def _is_zoo_ref(text: str) -> bool:
    # "family/name" or "family/name:version": one "/", not path-like, no weights-file suffix.
    # Zoo names may contain "." (e.g. "small_fc_lopt/mlp.v2"); the zoo validates the name fully
    # and says precisely what is wrong, which beats a misleading "file not found".
    suffixes = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".json")
    name = text.split(":", 1)[0]
    return (
        name.count("/") == 1
        and not name.startswith((".", "/", "~"))
        and not name.lower().endswith(suffixes)
    )


def _infer_config(theta: Mapping[str, torch.Tensor]) -> SmallFCConfig:
    from .config import PRESETS

    shapes = {k: tuple(v.shape) for k, v in theta.items() if isinstance(v, torch.Tensor)}
    for cfg in PRESETS.values():
        if shapes == cfg.theta_shapes():
            return cfg
    raise ValueError(
        "meta-weights match no preset architecture; pass config=SmallFCConfig(hidden_size=..., "
        f"hidden_layers=..., step_mult=...) (got shapes {shapes})"
    )


class SmallFCLOpt(Optimizer):
    r"""The small_fc_lopt learned optimizer (Metz et al. 2022, arXiv 2203.11860).

    Each parameter tensor is updated by a tiny per-element MLP fed with momentum, RMS and
    Adafactor features (spec: ``shared/spec/small_fc_lopt.md``)::

        p ← p·(1 − lr·weight_decay) − lr · step_mult · d · exp(exp_mult · m)

    Args:
        params: iterable of tensors or of param-group dicts.
        weights: meta-weights θ: a dict of tensors, a ``.safetensors`` path, or a zoo reference
            (``"small_fc_lopt/mlp_mnist"``, ``"name:1.0.0"``). ``None`` loads the default zoo
            entry :data:`DEFAULT_ZOO_REF`.
        config: the :class:`SmallFCConfig` (or preset name) θ was trained with. Files and zoo
            entries carry their own config; for a dict it defaults to the preset whose shapes
            match.
        lr: multiplier of the learned step (default 1.0), so every ``lr_scheduler`` works.
        weight_decay: decoupled (AdamW-style) weight decay, applied as ``p·(1 − lr·wd)``.
        maximize: maximise the objective instead of minimising it.
        backend: ``"auto"`` (default: the compiled kernel of each parameter's device when it is
            available, else the pure-torch backend with a one-time warning), ``"torch"``,
            ``"cpp"`` (compiled CPU kernel) or ``"cuda"`` (compiled CUDA kernel); see
            :mod:`lopt.kernels.dispatch`. It is not part of the state: a checkpoint saved with
            one backend resumes with any other.

    Meta-weights are shared by all parameters and are not optimizer state: ``state_dict()``
    records their sha256 and source, not the tensors.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        weights: WeightsSpec = None,
        config: SmallFCConfig | str | None = None,
        *,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        maximize: bool = False,
        backend: str = "auto",
    ) -> None:
        lr = _check_hyper("lr", lr)
        self.backend: str = kernels.check_backend(backend)
        weight_decay = _check_hyper("weight_decay", weight_decay)
        theta, cfg, source = resolve_weights(weights, config)
        self.config: SmallFCConfig = cfg
        self._theta_cpu: Theta = theta
        self._theta_by_device: dict[torch.device, Theta] = {}
        self.meta_weights_info: dict[str, str] = {"sha256": theta_sha256(theta), **source}
        defaults = {"lr": lr, "weight_decay": weight_decay, "maximize": bool(maximize)}
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_hyper("lr", group["lr"])
            _check_hyper("weight_decay", group["weight_decay"])
        self._register_hooks()

    def _register_hooks(self) -> None:
        self.register_state_dict_post_hook(SmallFCLOpt._add_weights_record)
        self.register_load_state_dict_pre_hook(SmallFCLOpt._check_weights_record)
        self.register_load_state_dict_post_hook(SmallFCLOpt._restore_fp32_state)

    @classmethod
    def from_zoo(cls, ref: str, params, **kwargs: Any) -> SmallFCLOpt:
        """Build the optimizer from a zoo entry.

        Example: ``SmallFCLOpt.from_zoo("small_fc_lopt/mlp_mnist", model.parameters())``.
        """
        return cls(params, weights=ref, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(
            config=self.config,
            _theta_cpu=self._theta_cpu,
            meta_weights_info=self.meta_weights_info,
            backend=self.backend,
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from_pickle = "_optimizer_state_dict_post_hooks" not in state
        super().__setstate__(state)
        self.__dict__.setdefault("_theta_by_device", {})
        self.__dict__.setdefault("backend", "auto")
        for group in self.param_groups:
            group.setdefault("weight_decay", 0.0)
            group.setdefault("maximize", False)
        if from_pickle:  # hooks are not pickled by torch.optim.Optimizer
            self._register_hooks()

    @property
    def theta(self) -> Theta:
        """The meta-weights (float32, on the CPU)."""
        return self._theta_cpu

    def _theta_on(self, device: torch.device) -> Theta:
        if device not in self._theta_by_device:
            self._theta_by_device[device] = {k: v.to(device) for k, v in self._theta_cpu.items()}
        return self._theta_by_device[device]

    def _init_group(self, group: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
        work = []
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            if grad.is_sparse:
                raise RuntimeError(
                    "SmallFCLOpt does not support sparse gradients; use dense gradients "
                    "(e.g. nn.Embedding(..., sparse=False))"
                )
            if torch.is_complex(p) or torch.is_complex(grad):
                raise RuntimeError(
                    "SmallFCLOpt does not support complex parameters or gradients; optimise "
                    "torch.view_as_real(param) instead"
                )
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state.update(core.init_tensor_state(p, self.config))
            work.append((p, grad, state))
        return work

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimisation step; ``closure`` (optional) re-evaluates the model and its loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            work = self._init_group(group)
            if work:
                small_fc_step(
                    work,
                    self._theta_on,
                    self.config,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    maximize=group["maximize"],
                    backend=self.backend,
                )
        return loss

    # -- state_dict hooks: record which meta-weights the state belongs to ------------------------
    @staticmethod
    def _add_weights_record(opt: SmallFCLOpt, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict["meta_weights"] = dict(opt.meta_weights_info, config=opt.config.to_dict())
        return state_dict

    @staticmethod
    def _check_weights_record(opt: SmallFCLOpt, state_dict: dict[str, Any]) -> dict[str, Any]:
        record = state_dict.pop("meta_weights", None)
        if record is not None and record.get("sha256") != opt.meta_weights_info["sha256"]:
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
    def _restore_fp32_state(opt: SmallFCLOpt) -> None:
        saved_state = opt.__dict__.pop("_loaded_state", {})
        saved_groups = opt.__dict__.pop("_loaded_groups", [])
        saved_ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in opt.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for key, value in saved_state.get(pid, {}).items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    device = p.device if key != "step" else torch.device("cpu")
                    opt.state[p][key] = value.to(device=device, dtype=torch.float32).clone()


def small_fc_step(
    work: list[tuple[torch.Tensor, torch.Tensor, dict]],
    theta_on: Callable[[torch.device], Theta],
    cfg: SmallFCConfig,
    *,
    lr: float,
    weight_decay: float,
    maximize: bool,
    backend: str = "auto",
) -> None:
    """Functional routine behind :meth:`SmallFCLOpt.step`: updates params and state in place.

    Each tensor is stepped by the ``lozoo::small_fc_step_`` op of the chosen backend (see
    :mod:`lopt.kernels`): float32 math and state whatever the parameter dtype, the state tensors
    updated in place, then ``p ← p·(1 − lr·wd) − lr·step`` written back in the parameter's dtype.
    """
    prepared: dict[torch.device, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    for p, grad, state in work:
        if p.device not in prepared:
            prepared[p.device] = kernels.theta_args(theta_on(p.device), cfg)
        decays, layers = prepared[p.device]
        d1, d0 = core.factored_dims(p.shape, cfg.tie_break) or (-1, -1)
        step_fn = kernels.step_function(backend, p.device)
        # The op updates a contiguous tensor in place; e.g. a channels_last conv weight is
        # stepped in a contiguous copy and copied back.
        target = p if p.is_contiguous() else p.contiguous()
        step_fn(
            target, grad, state["m"], state["v"], state.get("r"), state.get("c"), state.get("vd"),
            decays, layers, d1, d0, float(state["step"]), lr, weight_decay, cfg.step_mult,
            cfg.exp_mult, maximize,
        )  # fmt: skip
        if target is not p:
            p.copy_(target)
        state["step"] += 1
