"""Multi-tensor Celo2 steps: the shell's ``foreach`` path (on by default for CUDA tensors).

On a GPU the per-tensor step is bound by the host: each tensor costs a few dozen small kernel
launches, whatever its size. This path launches per *group* instead:

* the Adam branch steps every float32 tensor of a param group with ``torch._foreach_*`` ops;
* the learned branch stacks the float32 tensors that share a reference shape (the blocks of a
  transformer, a ResNet stage's kernels) into one ``(k, *shape)`` tensor, runs the fused
  direction op, Newton–Schulz and the unit-RMS rescale once over the stack, and copies
  parameters and state back.

Both compute exactly what the per-tensor path (:mod:`lopt.celo2.fused`) computes, element for
element (the stacked GEMMs may round differently), and read and write the same state, so the
path can change between steps and checkpoints do not record it. The learned rule has no step
count, so tensors at different steps stack together; the Adam branch's bias correction has one,
so it steps tensors in buckets of one step count.

With the shell's ``cuda_graphs=True`` a bucket keeps its stack (:class:`Stack`) and replays its
direction from a CUDA graph (:class:`CapturedStack`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import core, fused
from .config import Celo2Config


def wants_foreach(foreach: bool | None, device: torch.device) -> bool:
    """The group option ``foreach``; ``None`` (the default) means on for CUDA tensors only, as
    in ``torch.optim`` (on the CPU the stacking copies cost more than the launches they save)."""
    return device.type == "cuda" if foreach is None else foreach


def graphs_apply(cuda_graphs: bool, device: torch.device) -> bool:
    """Whether the ``cuda_graphs`` option records graphs for tensors on ``device``."""
    return cuda_graphs and device.type == "cuda"


def stack_key(param: torch.Tensor, cfg: Celo2Config) -> tuple[int, ...] | None:
    """The reference shape a learned tensor stacks under, or ``None`` if it steps alone.

    Stacked: float32 tensors of rank >= 2 in the rule's frame whose factored axes the kernel
    handles (then they stay the last two axes of the stack).
    """
    if param.dtype != torch.float32 or param.dim() < 2:
        return None
    ref_shape = core.reference_shape(param.shape, cfg)
    return ref_shape if fused.kernel_handles(ref_shape) else None


class Stack:
    """Buffers for a bucket of ``k`` learned tensors of one reference shape, and their step.

    :meth:`load` copies parameters, gradients and state in, :meth:`direction` computes the
    stacked direction and its unit-RMS scale from the buffers alone (no host value enters it:
    it is what :class:`CapturedStack` records in a CUDA graph), :meth:`store` applies the step
    with the learning rate and copies parameters and state back.
    """

    def __init__(self, args: list[torch.Tensor], ref_shape: tuple[int, ...], k: int,
                 cfg: Celo2Config, device: torch.device) -> None:  # fmt: skip
        self.args, self.cfg = args, cfg
        b, a = core.factored_axes(ref_shape)
        self.axes = (b + 1, a + 1)  # each tensor's own factored axes, past the stacking axis
        # load() fills every buffer before each direction(): no need to clear them here
        self.p = torch.empty((k, *ref_shape), device=device)
        self.g = torch.empty_like(self.p)
        shapes = core.learned_state_shapes(ref_shape)
        self.state = {key: torch.empty((k, *shape), device=device) for key, shape in shapes.items()}

    def load(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
             states: Sequence[dict]) -> None:  # fmt: skip
        torch.stack([core.to_reference(x, self.cfg) for x in params], out=self.p)
        torch.stack([core.to_reference(x.float(), self.cfg) for x in grads], out=self.g)
        for key, buffer in self.state.items():
            torch.stack([s[key] for s in states], out=buffer)

    def direction(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d, scale)``: ``u = d·scale``; advances the state buffers in place."""
        d = fused.kernel_direction_(self.args, self.p, self.g, self.state, self.cfg.orthogonalize,
                                    axes=self.axes)  # fmt: skip
        return d, fused.unit_rms_scale(d)

    def store(self, d: torch.Tensor, scale: torch.Tensor, params: Sequence[torch.Tensor],
              states: Sequence[dict], *, lr: float, weight_decay: float) -> None:  # fmt: skip
        # The per-tensor path's arithmetic, in the same order, over the stack.
        if weight_decay:
            self.p.mul_(1 - lr * weight_decay)
        self.p.addcmul_(d, scale, value=-lr * self.cfg.step_mult)
        news = [core.from_reference(x, self.cfg, q.shape) for x, q in zip(self.p.unbind(0), params)]
        torch._foreach_copy_(list(params), news)
        for key, buffer in self.state.items():
            torch._foreach_copy_([s[key] for s in states], list(buffer.unbind(0)))


class CapturedStack:
    """A :class:`Stack` on CUDA whose :meth:`Stack.direction` is recorded once in a CUDA graph and
    replayed each step: about 60 launches become one. The buffers are the graph's fixed inputs
    and outputs, so a bucket keeps them (and the graph's memory pool) between steps."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        # Lazy initialisation (cuBLAS handles, workspaces) must not happen under capture: run it
        # once on a side stream first, on zeroed buffers (they are empty until the first load).
        # It only advances the buffers, which load() overwrites.
        for buffer in (stack.p, stack.g, *stack.state.values()):
            buffer.zero_()
        side = torch.cuda.Stream(stack.p.device)
        side.wait_stream(torch.cuda.current_stream(stack.p.device))
        with torch.cuda.stream(side):
            stack.direction()
        torch.cuda.current_stream(stack.p.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = stack.direction()

    def step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
             states: Sequence[dict], *, lr: float, weight_decay: float) -> None:  # fmt: skip
        self.stack.load(params, grads, states)
        self.graph.replay()
        self.stack.store(*self.out, params, states, lr=lr, weight_decay=weight_decay)


@torch.no_grad()
def step_learned_stacked_(
    args: list[torch.Tensor],
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict],
    cfg: Celo2Config,
    *,
    lr: float,
    weight_decay: float,
) -> None:
    """One learned-branch step of float32 ``params`` that share a :func:`stack_key`, in place."""
    ref_shape = core.reference_shape(params[0].shape, cfg)
    stack = Stack(args, ref_shape, len(params), cfg, params[0].device)
    stack.load(params, grads, states)
    stack.store(*stack.direction(), params, states, lr=lr, weight_decay=weight_decay)


@torch.no_grad()
def step_adam_foreach_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict],
    t: torch.Tensor,
    cfg: Celo2Config,
    *,
    lr: float,
    weight_decay: float,
) -> None:
    """One Adam-branch step of float32 ``params`` in place; ``t`` (a CPU scalar tensor) counts
    steps from 1 and is the same for all of them. The arithmetic of
    :func:`lopt.celo2.core.adam_direction` and the decoupled step, op for op."""
    params = list(params)
    g = [x.float() for x in grads]
    if cfg.clip_adam_grads:
        g = torch._foreach_clamp_max(torch._foreach_clamp_min(g, -core.GRAD_CLIP), core.GRAD_CLIP)
    beta1, beta2 = cfg.adam_betas
    m = [s["exp_avg"] for s in states]
    v = [s["exp_avg_sq"] for s in states]
    torch._foreach_mul_(m, beta1)
    torch._foreach_add_(m, torch._foreach_mul(g, 1 - beta1))
    g_sq = torch._foreach_mul(g, g)
    torch._foreach_mul_(g_sq, 1 - beta2)
    torch._foreach_mul_(v, beta2)
    torch._foreach_add_(v, g_sq)
    if cfg.adam_form == "meta":
        denom = torch._foreach_sqrt(torch._foreach_add(v, cfg.adam_eps))
        direction = torch._foreach_div(m, denom)
    else:
        # bias corrections in float32 on the host, as the per-tensor path computes them
        m_hat = torch._foreach_div(m, (1 - beta1**t).item())
        denom = torch._foreach_sqrt(torch._foreach_div(v, (1 - beta2**t).item()))
        torch._foreach_add_(denom, cfg.adam_eps)
        direction = torch._foreach_div(m_hat, denom)
    eta = lr * cfg.adam_lr_mult
    if weight_decay:
        torch._foreach_mul_(params, 1 - eta * weight_decay)
    torch._foreach_add_(params, direction, alpha=-eta * cfg.step_mult)
