"""The optimizers a suite evaluates: hand-designed baselines by name, learned ones by reference.

Every optimizer is built as a ``torch.optim`` optimizer over the problem's parameter tensors, so
the suite trains exactly as a user would:

* ``adamw``: ``torch.optim.AdamW`` (betas 0.9/0.999, eps 1e-8); lr grid centre 3e-3.
* ``muon``: ``torch.optim.Muon`` (momentum 0.95, Nesterov, 5 Newton–Schulz steps) on the hidden
  weight matrices (conv kernels flattened to ``(out, in·kh·kw)``), ``torch.optim.AdamW`` on
  everything else (embeddings, output head, biases, LayerNorm gains). Muon's step is rescaled to
  AdamW's RMS (``adjust_lr_fn="match_rms_adamw"``), so one lr drives both; centre 3e-3.
* ``sgd``: ``torch.optim.SGD`` with momentum 0.9 (its weight decay is torch's L2 term); centre
  0.03.
* a learned optimizer (zoo reference, run dir or ``.safetensors`` file) of any architecture in
  ``lopt``'s registry: that architecture's ``torch.optim`` shell with the meta-weights; "lr"
  multiplies the learned step (centre 1.0) and weight decay is decoupled, ``p·(1 − lr·wd)``.
  Where the architecture treats input and output matrices apart
  (:attr:`lopt.LearnedOptimizer.io_group_options`; Celo2's Adam branch), it gets Muon's split:
  the matrices Muon leaves to AdamW form a group with those options.

Schedules set every param group's ``lr`` before each step (the runner), which is what
``LambdaLR`` does, for any object with ``param_groups``. The identity of an
optimizer (:attr:`OptimizerSpec.key`) is part of the result-cache key: the baseline's name and
fixed hyper-parameters, or the learned optimizer's meta-weights hash, config and group options.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .config import RunConfig

__all__ = ["BASELINES", "OptimizerSpec", "resolve_spec"]

ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8}
MUON = {"momentum": 0.95, "nesterov": True, "ns_steps": 5, "adjust_lr_fn": "match_rms_adamw"}
SGD = {"momentum": 0.9}


class MuonWithAdamW:
    """Muon on the hidden matrices and AdamW on the rest, stepped as one optimizer.

    ``step(closure)`` evaluates the closure once and steps both; ``param_groups`` lists Muon's
    groups then AdamW's, so a schedule that sets every group's ``lr`` drives both.
    """

    def __init__(self, matrices: Sequence[Tensor], others: Sequence[Tensor], lr: float, wd: float):
        self._parts: list[torch.optim.Optimizer] = []
        if matrices:
            self._parts.append(torch.optim.Muon(list(matrices), lr=lr, weight_decay=wd, **MUON))
        if others:
            self._parts.append(torch.optim.AdamW(list(others), lr=lr, weight_decay=wd, **ADAMW))
        self.param_groups = [g for part in self._parts for g in part.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self._parts:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self._parts:
            part.zero_grad(set_to_none=set_to_none)


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one optimizer for a run, its lr grid centre and its cache identity."""

    name: str
    kind: str  # "baseline" or "learned"
    lr_centre: float
    identity: dict[str, Any]
    source: Any = field(default=None, repr=False)  # the LearnedSource of a learned optimizer

    @property
    def key(self) -> str:
        text = json.dumps(self.identity, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def matrix_view(self) -> bool:
        """True if hidden conv kernels must be handed over as 2-D matrices (Muon)."""
        return self.name == "muon"

    def build(
        self,
        named: Mapping[str, Tensor],
        hidden: Sequence[str],
        cfg: RunConfig,
        steps: int,
    ) -> Any:
        """The optimizer over ``named`` at ``cfg``'s lr and weight decay (schedule: the runner)."""
        params = list(named.values())
        if self.name == "adamw":
            opt: Any = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **ADAMW)
        elif self.name == "sgd":
            opt = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **SGD)
        elif self.name == "muon":
            matrices = [t for n, t in named.items() if n in hidden]
            others = [t for n, t in named.items() if n not in hidden]
            opt = MuonWithAdamW(matrices, others, cfg.lr, cfg.weight_decay)
        else:
            opt = _learned(self.source, _learned_groups(self.source, named, hidden), cfg, steps)
        return opt


def _io_group_options(source: Any) -> dict[str, Any]:
    import lopt

    return dict(lopt.architecture_of(source.config).optimizer.io_group_options)


def _learned_groups(
    source: Any, named: Mapping[str, Tensor], hidden: Sequence[str]
) -> list[dict[str, Any]]:
    """The learned optimizer's param groups: the split Muon gets, where the architecture has one.

    Matrices outside ``hidden`` (embeddings, output heads) form a group with the architecture's
    :attr:`lopt.LearnedOptimizer.io_group_options` (Celo2: its Adam branch, as the paper deploys
    it); an architecture without such options gets every tensor in one group.
    """
    options = _io_group_options(source)
    if not options:
        return [{"params": list(named.values())}]
    io = [t for n, t in named.items() if n not in hidden and t.dim() >= 2]
    rest = [t for n, t in named.items() if n in hidden or t.dim() < 2]
    return [{"params": rest}] + ([{"params": io, **options}] if io else [])


def _learned(source: Any, params: list[dict[str, Any]], cfg: RunConfig, steps: int) -> Any:
    """The learned optimizer through lozoo's public ``lopt`` API: its architecture's shell.

    Any registered architecture works (small_fc_lopt, mlp_lopt, VeLO, Celo-style ...): the
    shell gets the run's planned steps (for architectures that use training progress) and,
    through ``step(closure)``, the loss.
    """
    import lopt

    arch = lopt.architecture_of(source.config)
    return arch.optimizer(
        params,
        source.theta,
        source.config,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        num_steps=steps,
    )


BASELINES: Mapping[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("adamw", "baseline", 3e-3, {"optimizer": "torch.optim.AdamW", **ADAMW}),
    "muon": OptimizerSpec(
        "muon",
        "baseline",
        3e-3,
        {"optimizer": "torch.optim.Muon+AdamW", "muon": MUON, "adamw": ADAMW},
    ),
    "sgd": OptimizerSpec("sgd", "baseline", 0.03, {"optimizer": "torch.optim.SGD", **SGD}),
}


def resolve_spec(ref: str) -> OptimizerSpec:
    """A baseline name (``adamw``, ``muon``, ``sgd``) or a learned optimizer's reference."""
    if ref in BASELINES:
        return BASELINES[ref]
    from metatrain.evaluation.source import resolve_optimizer

    try:
        source = resolve_optimizer(ref)
    except ValueError as err:
        raise ValueError(f"{err} (baselines: {', '.join(BASELINES)})") from None
    import lopt

    identity = {
        "optimizer": "lopt",
        "architecture": lopt.architecture_of(source.config).name,
        "theta_sha256": source.sha256,
        "config": source.config.to_dict(),
    }
    io_options = _io_group_options(source)
    if io_options:  # results under another routing are other results (the cache key)
        identity["io_group"] = io_options
    return OptimizerSpec(source.resolved, "learned", 1.0, identity, source)
