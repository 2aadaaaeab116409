"""Typed configuration of small_fc_lopt (design: docs/design/small_fc_lopt.md §2, §9).

A :class:`SmallFCConfig` fixes everything about the optimizer that is *not* meta-learned: MLP
shape, output scales, base decays and the factored-dims tie rule. θ (the meta-parameters) is a
plain ``dict[str, Tensor]`` whose keys and shapes :meth:`SmallFCConfig.theta_shapes` describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from .architecture import ConfigMixin

TieBreak = Literal["first", "last"]

NUM_FEATURES = 39
"""Input channels of the MLP: 28 normalised per-element features + 11 time features."""
NUM_ELEMENT_FEATURES = 28
NUM_TIME_FEATURES = 11
TIME_SCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)
DECAY_KEYS = ("momentum_decays", "rms_decays", "adafactor_decays")


def check_finite_floats(config: Any, names: tuple[str, ...]) -> None:
    """Each field in ``names`` of ``config`` is a finite int or float (else a ValueError)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite float, got {value!r}")


def normalise_decays(config: Any, spec: tuple[tuple[str, int], ...]) -> None:
    """Each ``(field, n)`` of a frozen ``config`` becomes a tuple of n floats in [0, 1).

    The accumulator decays of small_fc_lopt, ELO and VeLO (momentum ×3, RMS ×1, Adafactor ×3).
    """
    for name, n in spec:
        decays = tuple(float(d) for d in getattr(config, name))
        if len(decays) != n or not all(0.0 <= d < 1.0 for d in decays):
            raise ValueError(f"{name} must be {n} decays in [0, 1), got {decays!r}")
        object.__setattr__(config, name, decays)


DECAYS_SPEC = (("momentum_decays", 3), ("rms_decays", 1), ("adafactor_decays", 3))
"""The decay fields of ELO and VeLO configs with their lengths (for :func:`normalise_decays`)."""


@dataclass(frozen=True)
class SmallFCConfig(ConfigMixin):
    """Architecture of a small_fc_lopt optimizer.

    ``hidden_layers`` counts hidden layers the way the reference does (``[h] * hidden_layers +
    [2]``), so the default 2 means three weight matrices ``w0, w1, w2`` (39→h→h→2). PyLO's
    ``MetaMLP(39, h, 1)`` is the same network.

    ``tie_break`` selects which axis wins when the two largest dims of a tensor tie
    (design §10): ``"first"`` reproduces the JAX reference on PyTorch ``(out, in)``
    tensors, ``"last"`` is the rule applied to the tensor as stored (PyLO-compatible).
    """

    hidden_size: int = 4
    hidden_layers: int = 2
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    initial_momentum_decays: tuple[float, float, float] = (0.9, 0.99, 0.999)
    initial_rms_decays: tuple[float] = (0.999,)
    initial_adafactor_decays: tuple[float, float, float] = (0.9, 0.99, 0.999)
    tie_break: TieBreak = "first"
    architecture: ClassVar[str] = "small_fc_lopt"
    # Decay offsets used by init_theta. The reference meta-learns them from 0; µLO fixes them.
    init_decay_offsets: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.hidden_size, int) or self.hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {self.hidden_size!r}")
        if not isinstance(self.hidden_layers, int) or self.hidden_layers < 1:
            raise ValueError(
                "hidden_layers must be an int >= 1 (reference counting), "
                f"got {self.hidden_layers!r}"
            )
        check_finite_floats(self, ("step_mult", "exp_mult"))
        normalise_decays(
            self,
            (
                ("initial_momentum_decays", 3),
                ("initial_rms_decays", 1),
                ("initial_adafactor_decays", 3),
            ),
        )
        if self.tie_break not in ("first", "last"):
            raise ValueError(f"tie_break must be 'first' or 'last', got {self.tie_break!r}")
        offsets = {k: tuple(float(x) for x in v) for k, v in dict(self.init_decay_offsets).items()}
        for key, values in offsets.items():
            if key not in DECAY_KEYS:
                raise ValueError(f"init_decay_offsets has unknown key {key!r}; valid: {DECAY_KEYS}")
            expected = self.theta_shapes()[key][0]
            if len(values) != expected:
                raise ValueError(f"init_decay_offsets[{key!r}] needs {expected} values")
        object.__setattr__(self, "init_decay_offsets", offsets)

    # -- shapes ---------------------------------------------------------------------------------
    def layer_sizes(self) -> list[tuple[int, int]]:
        """(fan_in, fan_out) of each weight matrix, in order w0, w1, ..."""
        dims = [NUM_FEATURES] + [self.hidden_size] * self.hidden_layers + [2]
        return list(zip(dims[:-1], dims[1:]))

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        """Keys and shapes of θ. Weights are (in, out), as in the reference."""
        shapes: dict[str, tuple[int, ...]] = {
            "momentum_decays": (3,),
            "rms_decays": (1,),
            "adafactor_decays": (3,),
        }
        for k, (fan_in, fan_out) in enumerate(self.layer_sizes()):
            shapes[f"w{k}"] = (fan_in, fan_out)
            shapes[f"b{k}"] = (fan_out,)
        return shapes

    @property
    def num_params(self) -> int:
        """Size of θ: 197 for h = 4 and 2,409 for h = 32 (design §3)."""
        return sum(math.prod(s) for s in self.theta_shapes().values())


ORIGINAL = SmallFCConfig()
"""The learned_optimization defaults: hidden 4, step_mult 1e-3, decay offsets start at 0 (197 θ)."""

MULO = SmallFCConfig(
    hidden_size=32,
    step_mult=1e-2,
    exp_mult=1e-3,
    init_decay_offsets={
        "momentum_decays": (0.15216392, 0.14245212, 0.06812963),
        "rms_decays": (0.01079706,),
        "adafactor_decays": (0.18621896, -0.10864615, -0.06185547),
    },
)
"""The µLO / PyLO configuration: hidden 32, step_mult 1e-2, µLO's fixed decay offsets (2,409 θ)."""

PRESETS: dict[str, SmallFCConfig] = {"original": ORIGINAL, "mulo": MULO}


def preset(name: str) -> SmallFCConfig:
    """Look up a preset by name (``"original"`` or ``"mulo"``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown small_fc_lopt preset {name!r}; valid presets: {sorted(PRESETS)}"
        ) from None
