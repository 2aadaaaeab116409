"""small_fc_lopt's entry in the architecture registry (the first architecture of lozoo).

The math is in :mod:`lopt.core` (docs/design/small_fc_lopt.md), the config in
:mod:`lopt.config`, θ's initialisation in :mod:`lopt.theta` and the ``torch.optim`` shell in
:mod:`lopt.optimizer`; this module only ties them to the name ``"small_fc_lopt"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .architecture import Architecture, Theta, register_architecture, validate_theta
from .config import MULO, NUM_FEATURES, PRESETS, SmallFCConfig, TieBreak
from .core import init_state, init_tensor_state, update
from .kernels.lanes import SMALL_FC_LANES
from .optimizer import SmallFCLOpt
from .theta import init_theta


def summary(cfg: SmallFCConfig) -> str:
    widths = "→".join(str(n) for n in (NUM_FEATURES, *[cfg.hidden_size] * cfg.hidden_layers, 2))
    return (
        f"A small_fc_lopt learned optimizer: MLP {widths}, step_mult {cfg.step_mult:g}, "
        f"{cfg.num_params:,} meta-parameters."
    )


SMALL_FC_LOPT = register_architecture(
    Architecture(
        name="small_fc_lopt",
        config_class=SmallFCConfig,
        init_theta=init_theta,
        init_state=init_state,
        init_tensor_state=init_tensor_state,
        update=update,
        optimizer=SmallFCLOpt,
        presets=PRESETS,
        default_preset="original",
        summary=summary,
        lanes_update=SMALL_FC_LANES,
        description="Metz et al. 2022: per-element MLP on momentum, RMS and Adafactor features",
    )
)


# -- PyLO / µLO checkpoints ------------------------------------------------------------------------
METAMLP_INPUT_SIZE = NUM_FEATURES
"""Input width of PyLO's ``MetaMLP`` for small_fc_lopt (AdafacLO / µLO): the 39 features."""


def from_metamlp(
    linears: Sequence[tuple[torch.Tensor, torch.Tensor]], tie_break: TieBreak = "first"
) -> tuple[Theta, SmallFCConfig]:
    """θ and config from the Linear layers of a PyLO ``MetaMLP`` (in network order).

    Each layer is ``(weight (out, in), bias (out,))``; θ stores weights ``(in, out)`` as the
    reference does, so they are transposed. The artefact holds only the MLP: the decay offsets,
    ``step_mult`` and ``exp_mult`` are µLO's (the :data:`lopt.MULO` preset), as PyLO supplies them.
    """
    theta: Theta = {
        k: torch.tensor(v, dtype=torch.float32) for k, v in MULO.init_decay_offsets.items()
    }
    for k, (weight, bias) in enumerate(linears):
        theta[f"w{k}"] = weight.to(torch.float32).t().contiguous()
        theta[f"b{k}"] = bias.to(torch.float32).clone()
    hidden = int(linears[0][0].shape[0])
    config = dataclasses.replace(
        MULO, hidden_size=hidden, hidden_layers=len(linears) - 1, tie_break=tie_break
    )
    return validate_theta(theta, config), config
