"""``lozoo::small_fc_step_``: the compiled op, its fake kernel and the availability probes.

The op is defined in C++ with ``TORCH_LIBRARY`` (``csrc/small_fc_checks.h`` holds the schema)::

    lozoo::small_fc_step_(Tensor(a!) param, Tensor grad, Tensor(b!) m, Tensor(c!) v,
        Tensor(d!)? r, Tensor(e!)? c, Tensor(f!)? vd, Tensor decays, Tensor[] layers,
        int d1, int d0, float t, float lr, float weight_decay, float step_mult,
        float exp_mult, bool maximize) -> ()

One call performs one small_fc_lopt step of one parameter tensor **in place**, exactly like
``core.tensor_step`` followed by ``SmallFCLOpt``'s update ``p ← p·(1 − lr·wd) − lr·step``:

- ``param`` (mutated): contiguous, float32 / bfloat16 / float16, any rank (a 0-d tensor is one
  element); math is float32. ``grad``: same dtype and shape, any strides.
- ``m`` S+(3,), ``v`` S+(1,) (mutated): float32 state, decay axis trailing, S = (1,) for a scalar.
  ``r`` (S∖d0)+(3,) and ``c`` (S∖d1)+(3,) for rank ≥ 2, else ``vd`` S+(3,); the others are None.
- ``decays``: float32 (7,) = ``torch.cat(core.effective_decays(θ, cfg))``.
- ``layers``: ``[w0 (39,h), b0, w1 (h,h), b1, ..., wL (h,2), bL]``, float32, (in, out) layout.
- ``d1, d0``: ``core.factored_dims(shape, cfg.tie_break)``, or ``-1, -1`` below rank 2.
- ``t``: the pre-increment step counter; ``lr``, ``weight_decay``: as in ``SmallFCLOpt``;
  ``step_mult``, ``exp_mult``: from the config; ``maximize``: step along ``-grad``.

The caller increments its step counter. :func:`lopt.kernels.torch_backend.small_fc_step_` is the
pure-torch twin with the same signature; both validate arguments with the same messages.

The lane-batched form steps many independent copies ("lanes") of one tensor, each with its own θ
and step counter, in one call (the meta-trainer's 2N inner problems; docs/design/lanes.md)::

    lozoo::small_fc_lanes_step_(Tensor(a!) param, Tensor grad, Tensor(b!) m, Tensor(c!) v,
        Tensor(d!)? r, Tensor(e!)? c, Tensor(f!)? vd, Tensor decays, Tensor[] layers,
        int d1, int d0, Tensor t, float lr, float weight_decay, float step_mult,
        float exp_mult, bool maximize) -> ()

Every tensor argument gains a leading lane axis L (``param`` ``[L, *S]``, ``decays`` ``[L, 7]``,
each layer ``[L, ...]``; all contiguous except ``grad``), ``d1, d0`` are axes of S, and the
pre-increment counters are a float32 tensor ``t`` of shape ``(L,)``. Lane i's result is
bit-identical to ``small_fc_step_`` on the lane-i slices;
:func:`lopt.kernels.torch_backend.small_fc_lanes_step_` is its pure-torch twin.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import core
from ..config import SmallFCConfig
from . import build
from .validate import check_lanes_step_args, check_step_args

OP_NAME = "lozoo::small_fc_step_"
SCHEMA = (
    "lozoo::small_fc_step_(Tensor(a!) param, Tensor grad, Tensor(b!) m, Tensor(c!) v, "
    "Tensor(d!)? r, Tensor(e!)? c, Tensor(f!)? vd, Tensor decays, Tensor[] layers, "
    "int d1, int d0, float t, float lr, float weight_decay, float step_mult, float exp_mult, "
    "bool maximize) -> ()"
)

LANES_OP_NAME = "lozoo::small_fc_lanes_step_"
LANES_SCHEMA = (
    "lozoo::small_fc_lanes_step_(Tensor(a!) param, Tensor grad, Tensor(b!) m, Tensor(c!) v, "
    "Tensor(d!)? r, Tensor(e!)? c, Tensor(f!)? vd, Tensor decays, Tensor[] layers, "
    "int d1, int d0, Tensor t, float lr, float weight_decay, float step_mult, float exp_mult, "
    "bool maximize) -> ()"
)

_fake_registered = False


def _fake_step(
    param, grad, m, v, r, c, vd, decays, layers, d1, d0, t, lr, weight_decay, step_mult,
    exp_mult, maximize,
) -> None:  # fmt: skip
    # In-place op with no outputs: the fake kernel only has to reject what the real one rejects.
    check_step_args(param, grad, m, v, r, c, vd, decays, layers, d1, d0)


def _fake_lanes_step(
    param, grad, m, v, r, c, vd, decays, layers, d1, d0, t, lr, weight_decay, step_mult,
    exp_mult, maximize,
) -> None:  # fmt: skip
    check_lanes_step_args(param, grad, m, v, r, c, vd, decays, layers, d1, d0, t)


def load_cpp(build_if_needed: bool = True) -> build.BuildResult:
    """Load (building once if needed) the CPU library and register the op's fake kernel."""
    global _fake_registered
    result = build.load(build.CPU_LIB, build=build_if_needed)
    if result.ok and not _fake_registered:
        torch.library.register_fake(OP_NAME)(_fake_step)
        torch.library.register_fake(LANES_OP_NAME)(_fake_lanes_step)
        _fake_registered = True
    return result


def cpp_is_available(build_if_needed: bool = True) -> bool:
    """Whether the compiled CPU kernel can run in this process (builds it once if allowed)."""
    return load_cpp(build_if_needed).ok


def cuda_unavailable_reason(build_if_needed: bool = True) -> str | None:
    """``None`` when the CUDA kernel can run here, else why not (in words for an error)."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    cpu = load_cpp(build_if_needed)
    if not cpu.ok:
        return f"the CPU library that defines the op is unavailable ({cpu.error})"
    result = build.load(build.CUDA_LIB, build=build_if_needed)
    return None if result.ok else f"the CUDA library failed to load or build ({result.error})"


def cuda_is_available(build_if_needed: bool = True) -> bool:
    """Whether the compiled CUDA kernel can run in this process (builds it once if allowed)."""
    return cuda_unavailable_reason(build_if_needed) is None


def theta_args(
    theta: Mapping[str, torch.Tensor], cfg: SmallFCConfig
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The op's θ-derived arguments ``(decays, layers)``, contiguous.

    θ may also be lane-stacked (every tensor with a leading lane axis): then ``decays`` is
    ``[L, 7]`` and each layer ``[L, ...]``, and ``decays[i]``, ``[w[i] for w in layers]`` are
    lane i's arguments.
    """
    decays = torch.cat(core.effective_decays(theta, cfg), dim=-1).contiguous()
    names = [f"{kind}{k}" for k in range(len(cfg.layer_sizes())) for kind in "wb"]
    return decays, [theta[name].contiguous() for name in names]


def step_op() -> torch._ops.OpOverload:
    """The loaded op (``torch.ops.lozoo.small_fc_step_.default``); load a library first."""
    return torch.ops.lozoo.small_fc_step_.default


def lanes_step_op() -> torch._ops.OpOverload:
    """The loaded lane-batched op (``torch.ops.lozoo.small_fc_lanes_step_.default``)."""
    return torch.ops.lozoo.small_fc_lanes_step_.default
