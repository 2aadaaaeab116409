"""Typed configuration of the Celo2 family (design: docs/design/celo2.md).

One :class:`Celo2Config` describes every member of the family: lozoo's ``celo2`` and
``celo2_base`` (the JAX meta-training forms) and the PyLO inference variants ``pylo_celo2`` and
``elo_celo2``. They share the learned rule (features, the 347-parameter MLP, Newton–Schulz,
output normalisation) and differ only in routing, in the Adam branch and in gradient clipping,
which are the fields below. θ is a plain ``dict[str, Tensor]`` with the keys and shapes of
:meth:`Celo2Config.theta_shapes`; the same θ layout serves every variant.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from ..architecture import ConfigMixin

Layout = Literal["torch", "as_stored"]
ConvMode = Literal["slices", "matrix"]
CONV_MODES = ("slices", "matrix")
AdamForm = Literal["meta", "adamw"]

# Feature groups in channel order: the row blocks of θ["w0"] (the reference's w0__0 … w0__13).
GROUP_WIDTHS = (1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3)
NUM_CHANNELS = sum(GROUP_WIDTHS)  # 30
NUM_CHANNELS_1D = sum(GROUP_WIDTHS[:9])  # 15: tensors of rank <= 1 have no row/col groups
HIDDEN_SIZE = 8
NUM_OUTPUTS = 3  # direction, magnitude (dead: exp_mult = 0), unused


@dataclass(frozen=True)
class Celo2Config(ConfigMixin):
    """Everything about a Celo2-family optimizer that is not meta-learned.

    Fields:
        orthogonalize: Newton–Schulz-orthogonalise the direction of every learned tensor of
            rank >= 2 (``celo2``); off for ``celo2_base``.
        adam_for_1d: send tensors of rank <= 1 (biases, norm scales, scalars) to the Adam branch.
            Off means the learned rule runs on every tensor (``celo2_base``).
        adam_name_pattern: a regex; parameters whose name matches it (``re.search``) also go to
            the Adam branch, e.g. embeddings (``"embed"``). ``None``: no name routing.
        adam_form: ``"meta"``: the meta-training Adam of the reference (no bias correction, eps
            inside the square root); ``"adamw"``: bias-corrected AdamW with eps outside the root
            (the deployment harness and PyLO).
        adam_betas, adam_eps: the Adam branch's decays and epsilon.
        adam_lr_mult: the Adam branch steps with ``adam_lr_mult × lr`` (20 in meta-training).
        clip_adam_grads: also clip the Adam branch's gradients to ±1000 (PyLO clips every
            parameter; the reference only the learned branch).
        global_clip_norm: clip all gradients together to this global L2 norm before anything
            else (``elo_celo2``); ``None``: off.
        layout: ``"torch"`` reads every tensor of rank >= 2 as PyTorch's ``(out, in, *spatial)``
            and applies the rule to it permuted to the reference's ``(*spatial, in, out)``;
            ``"as_stored"`` applies the rule to the tensor as stored (PyLO's behaviour).
        conv_mode: how ``layout="torch"`` frames a tensor of rank >= 3 ``(out, in, *spatial)``.
            ``"slices"`` (default, the reference): the rule runs on ``(*spatial, in, out)``, one
            ``(in, out)`` matrix per spatial position (normalisation, factored statistics,
            Newton–Schulz and the unit-RMS output all per slice). ``"matrix"`` (Muon's
            treatment of convolutions): the rule runs on the one ``(in·∏spatial, out)`` matrix,
            exactly what an ``nn.Linear`` weight of shape ``(out, in·∏spatial)`` gets. Rank <= 2
            tensors are the same under both. Needs ``layout="torch"``.
        step_mult: the learned direction has unit RMS per matrix; the step is
            ``lr · step_mult · u`` so that ``lr = 1`` is the meta-training step size (1e-3).
    """

    architecture: ClassVar[str] = "celo2"
    config_label: ClassVar[str] = "Celo2"

    orthogonalize: bool = True
    adam_for_1d: bool = True
    adam_name_pattern: str | None = "embed"
    adam_form: AdamForm = "meta"
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    adam_lr_mult: float = 20.0
    clip_adam_grads: bool = False
    global_clip_norm: float | None = None
    layout: Layout = "torch"
    conv_mode: ConvMode = "slices"
    step_mult: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("orthogonalize", "adam_for_1d", "clip_adam_grads"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.adam_name_pattern is not None:
            if not isinstance(self.adam_name_pattern, str):
                raise ValueError(
                    f"adam_name_pattern must be a regex string or None, "
                    f"got {self.adam_name_pattern!r}"
                )
            try:
                re.compile(self.adam_name_pattern)
            except re.error as err:
                raise ValueError(
                    f"adam_name_pattern {self.adam_name_pattern!r} is not a valid regex: {err}"
                ) from None
        if self.adam_form not in ("meta", "adamw"):
            raise ValueError(f"adam_form must be 'meta' or 'adamw', got {self.adam_form!r}")
        if self.layout not in ("torch", "as_stored"):
            raise ValueError(f"layout must be 'torch' or 'as_stored', got {self.layout!r}")
        if self.conv_mode not in CONV_MODES:
            raise ValueError(
                f"conv_mode must be one of {', '.join(repr(m) for m in CONV_MODES)}, "
                f"got {self.conv_mode!r}"
            )
        if self.conv_mode == "matrix" and self.layout != "torch":
            # "as_stored" has no (out, in, *spatial) reading to flatten the kernel by.
            raise ValueError(
                f"conv_mode='matrix' needs layout='torch' (it reads rank >= 3 tensors as "
                f"(out, in, *spatial)), got layout={self.layout!r}; set layout='torch' or "
                "conv_mode='slices'"
            )
        betas = tuple(float(b) for b in self.adam_betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"adam_betas must be two decays in [0, 1), got {self.adam_betas!r}")
        object.__setattr__(self, "adam_betas", betas)
        for name in ("adam_eps", "adam_lr_mult", "step_mult"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.global_clip_norm is not None:
            value = self.global_clip_norm
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"global_clip_norm must be a float > 0 or None, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"global_clip_norm must be a float > 0 or None, got {value!r}")
            object.__setattr__(self, "global_clip_norm", float(value))

    # -- θ ----------------------------------------------------------------------------------
    @staticmethod
    def theta_shapes() -> dict[str, tuple[int, ...]]:
        """Keys and shapes of θ in flatten order; weights are (in, out).

        ``w0`` stacks the reference's 14 first-layer groups ``w0__0 … w0__13`` row-wise (30
        rows in channel order), so the flat θ equals the reference's concatenation order.
        """
        return {
            "w0": (NUM_CHANNELS, HIDDEN_SIZE),
            "b0": (HIDDEN_SIZE,),
            "w1": (HIDDEN_SIZE, HIDDEN_SIZE),
            "b1": (HIDDEN_SIZE,),
            "w2": (HIDDEN_SIZE, NUM_OUTPUTS),
            "b2": (NUM_OUTPUTS,),
        }

    @property
    def num_params(self) -> int:
        """Size of θ: 347."""
        return sum(math.prod(s) for s in self.theta_shapes().values())


@dataclass(frozen=True)
class Celo2BaseConfig(Celo2Config):
    """Celo2-base: the learned rule on every tensor, no orthogonalisation, no Adam branch."""

    architecture: ClassVar[str] = "celo2_base"

    orthogonalize: bool = False
    adam_for_1d: bool = False
    adam_name_pattern: str | None = None
    adam_lr_mult: float = 1.0


@dataclass(frozen=True)
class PyloCelo2Config(Celo2Config):
    """PyLO's CELO2: bias-corrected AdamW (β 0.9/0.95, lr × 1) for rank <= 1 tensors and
    embeddings, ±1000 clip on every gradient."""

    architecture: ClassVar[str] = "pylo_celo2"

    adam_form: AdamForm = "adamw"
    adam_lr_mult: float = 1.0
    clip_adam_grads: bool = True


@dataclass(frozen=True)
class EloCelo2Config(PyloCelo2Config):
    """PyLO's ELO_CELO2: PyLO's CELO2 with global-norm gradient clipping at 1.0."""

    architecture: ClassVar[str] = "elo_celo2"

    global_clip_norm: float | None = 1.0


CELO2 = Celo2Config()
"""lozoo's Celo2: NS on, rank <= 1 and embeddings to the reference's meta-training Adam (×20)."""
CELO2_BASE = Celo2BaseConfig()
PYLO_CELO2 = PyloCelo2Config()
ELO_CELO2 = EloCelo2Config()

VARIANTS: dict[str, Celo2Config] = {
    "celo2": CELO2,
    "celo2_base": CELO2_BASE,
    "pylo_celo2": PYLO_CELO2,
    "elo_celo2": ELO_CELO2,
}
"""The default config of each Celo2-family architecture, by registry name."""
