"""Typed configuration of VeLO (design notes: docs/design/velo.md).

A :class:`VeLOConfig` fixes everything about VeLO that is not meta-learned: the sizes of the
per-tensor LSTM, of the weight banks and of the per-element MLP, the output scales, the fixed
accumulator decays and the factored-dims tie rule. θ is a plain ``dict[str, Tensor]`` whose keys
and shapes :meth:`VeLOConfig.theta_shapes` lists (weights in ``(in, out)`` layout, banks
``(param_inits, in, out)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..architecture import ConfigMixin
from ..config import DECAYS_SPEC, check_finite_floats, normalise_decays

VeLOTieBreak = Literal["first", "pylo"]

NUM_ELEMENT_FEATURES = 30
"""Per-element MLP inputs (channel order in docs/design/velo.md)."""
NUM_TENSOR_FEATURES = 30
"""Per-tensor LSTM inputs: 9 training-progress, 9 loss, 1 mean rms, 5 rank, 3 + 3 variances."""
NUM_LOSS_FEATURES = 9
NUM_LOSS_DECAYS = NUM_LOSS_FEATURES + 1
NUM_RANK_FEATURES = 5
PROGRESS_POINTS = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)
"""Fractions of ``num_steps`` where the progress features ``tanh(10·(t/N − τ))`` flip."""
MLP_OUTPUTS = 3  # direction, log-magnitude, one unused head


@dataclass(frozen=True)
class VeLOConfig(ConfigMixin):
    """Architecture of a VeLO optimizer (Metz et al. 2022, arXiv 2211.09760).

    ``mlp_hidden_layers`` counts hidden layers (widths ``[mlp_hidden_size] * mlp_hidden_layers
    + [3]``), as the JAX original and :class:`lopt.SmallFCConfig` do; PyLO's ``VeLOMLP`` config
    counts hidden→hidden matrices instead, one fewer. ``tie_break`` picks the factored axes when
    the two largest dims of a tensor tie: ``"first"`` (default) is the reference rule on PyTorch
    ``(out, in, ...)`` tensors, ``"pylo"`` reproduces PyLO's port exactly (it differs from the
    reference on 4-D tensors tied on their first two axes and on 3-way ties).
    """

    architecture: ClassVar[str] = "velo"
    config_label: ClassVar[str] = "VeLO"

    lstm_hidden_size: int = 512
    param_inits: int = 256
    mlp_hidden_size: int = 4
    mlp_hidden_layers: int = 2
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    momentum_decays: tuple[float, float, float] = (0.9, 0.99, 0.999)
    rms_decays: tuple[float] = (0.999,)
    adafactor_decays: tuple[float, float, float] = (0.9, 0.99, 0.999)
    tie_break: VeLOTieBreak = "first"

    def __post_init__(self) -> None:
        for name in ("lstm_hidden_size", "param_inits", "mlp_hidden_size", "mlp_hidden_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_finite_floats(self, ("step_mult", "exp_mult"))
        normalise_decays(self, DECAYS_SPEC)
        if self.tie_break not in ("first", "pylo"):
            raise ValueError(f"tie_break must be 'first' or 'pylo', got {self.tie_break!r}")

    # -- shapes ---------------------------------------------------------------------------------
    def mlp_layer_sizes(self) -> list[tuple[int, int]]:
        """(fan_in, fan_out) of each per-element MLP layer: 30→4→4→3 by default."""
        dims = [NUM_ELEMENT_FEATURES] + [self.mlp_hidden_size] * self.mlp_hidden_layers
        return list(zip(dims, dims[1:] + [MLP_OUTPUTS]))

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        """Keys and shapes of θ in flatten order (weights ``(in, out)``)."""
        h, k = self.lstm_hidden_size, self.param_inits
        shapes: dict[str, tuple[int, ...]] = {
            "lstm_init_h": (h,),
            "lstm_init_c": (h,),
            "mix_w": (NUM_TENSOR_FEATURES, h),
            "mix_b": (h,),
            "final_mix_w": (NUM_TENSOR_FEATURES, h),
            "final_mix_b": (h,),
            "lstm_w": (2 * h, 4 * h),
            "lstm_b": (4 * h,),
            "controls_w": (h, k),
            "controls_b": (k,),
            "step_size_w": (h, 1),
            "step_size_b": (1,),
        }
        for i, (fan_in, fan_out) in enumerate(self.mlp_layer_sizes()):
            shapes[f"bank_w{i}"] = (k, fan_in, fan_out)
            shapes[f"bank_b{i}"] = (k, fan_out)
        return shapes

    # -- serialisation --------------------------------------------------------------------------


VELO = VeLOConfig()
"""The published VeLO architecture (LSTM 512, 256 banks, MLP 30→4→4→3)."""
