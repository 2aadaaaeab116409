"""VeLO (Metz et al. 2022): per-tensor LSTM + hypernetwork over per-element MLP banks.

Functional core in :mod:`lopt.velo.core`, ``torch.optim`` shell :class:`VeLO`. Design notes,
the exact step and the lr / weight-decay conventions: docs/design/velo.md.
"""

from ..architecture import Architecture, register_architecture
from .config import VELO, VeLOConfig
from .core import (
    MissingInputError,
    compute_steps,
    factored_dims,
    init_state,
    init_tensor_state,
    update,
)
from .optimizer import VeLO
from .theta import init_theta, validate_theta


def summary(cfg: VeLOConfig) -> str:
    mlp = "→".join(str(i) for i, _ in cfg.mlp_layer_sizes()) + "→3"
    return (
        f"VeLO: per-tensor LSTM ({cfg.lstm_hidden_size}) mixing {cfg.param_inits} weight banks "
        f"into a per-element MLP {mlp}; {cfg.num_params:,} meta-parameters."
    )


VELO_ARCHITECTURE = register_architecture(
    Architecture(
        name="velo",
        config_class=VeLOConfig,
        init_theta=init_theta,
        init_state=init_state,
        init_tensor_state=init_tensor_state,
        update=update,
        optimizer=VeLO,
        presets={"velo": VELO, "velo_pylo_ties": VeLOConfig(tie_break="pylo")},
        default_preset="velo",
        summary=summary,
        description="Metz et al. 2022: per-tensor LSTM hypernetwork over per-element MLPs",
    )
)

__all__ = [
    "VELO_ARCHITECTURE",
    "VELO",
    "MissingInputError",
    "VeLO",
    "VeLOConfig",
    "compute_steps",
    "factored_dims",
    "init_state",
    "init_tensor_state",
    "init_theta",
    "update",
    "validate_theta",
]
