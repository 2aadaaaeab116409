"""Registry entries of the Celo2 family and ELO (names and θ layouts: docs/design/celo2.md)."""

from __future__ import annotations

from ..architecture import Architecture, register_architecture
from . import core, elo
from .config import NUM_CHANNELS, VARIANTS, Celo2Config
from .optimizer import Celo2, Celo2Base, Elo, EloCelo2, PyloCelo2
from .theta import init_mlp_theta


def init_theta(cfg, generator=None):
    """Fresh Celo2 θ: weights std·z (z normal truncated to ±2, std 1/sqrt(fan_in), fan-in 30 for
    all of ``w0``), biases zero."""
    return init_mlp_theta(cfg, NUM_CHANNELS, generator)


def init_elo_theta(cfg, generator=None):
    """Fresh ELO θ, initialised like small_fc_lopt's MLP."""
    return init_mlp_theta(cfg, cfg.theta_shapes()["w0"][0], generator)


def _summary(cfg: Celo2Config) -> str:
    ns = "Newton–Schulz orthogonalised, " if cfg.orthogonalize else ""
    if cfg.conv_mode == "matrix":
        ns += "conv kernels as one (in·k, out) matrix, "
    names = f" and names matching {cfg.adam_name_pattern!r}" if cfg.adam_name_pattern else ""
    kind = "AdamW" if cfg.adam_form == "adamw" else "Adam"
    adam = (
        f"rank <= 1{names} to {kind} (lr × {cfg.adam_lr_mult:g})"
        if cfg.adam_for_1d or cfg.adam_name_pattern
        else "the rule on every tensor"
    )
    return (
        f"A {type(cfg).architecture} learned optimizer: MLP 30→8→8→3 per element, {ns}unit-RMS "
        f"steps of lr·{cfg.step_mult:g}; {adam}; {cfg.num_params} meta-parameters."
    )


def _elo_summary(cfg: elo.EloConfig) -> str:
    h = cfg.hidden_size
    return (
        f"An ELO learned optimizer: small_fc_lopt's MLP 39→{h}→{h}→2 with fixed decays, "
        f"step lr·{cfg.step_mult:g}·d·exp({cfg.exp_mult:g}·m); {cfg.num_params:,} meta-parameters."
    )


SHELLS = {"celo2": Celo2, "celo2_base": Celo2Base, "pylo_celo2": PyloCelo2, "elo_celo2": EloCelo2}
DESCRIPTIONS = {
    "celo2": "Moudgil et al. 2026: per-element MLP, Newton–Schulz, unit-RMS steps, Adam for 1-D",
    "celo2_base": "Celo2's rule on every tensor, no orthogonalisation",
    "pylo_celo2": "PyLO's CELO2 inference variant (bias-corrected AdamW branch)",
    "elo_celo2": "PyLO's ELO_CELO2 inference variant (CELO2 with global-norm clipping)",
}

ARCHITECTURES = {
    name: register_architecture(
        Architecture(
            name=name,
            config_class=type(cfg),
            init_theta=init_theta,
            init_state=core.init_state,
            init_tensor_state=core.init_tensor_state,
            update=core.update,
            optimizer=SHELLS[name],
            presets={"default": cfg},
            default_preset="default",
            summary=_summary,
            description=DESCRIPTIONS[name],
        )
    )
    for name, cfg in VARIANTS.items()
}
ARCHITECTURES["elo"] = register_architecture(
    Architecture(
        name="elo",
        config_class=elo.EloConfig,
        init_theta=init_elo_theta,
        init_state=elo.init_state,
        init_tensor_state=elo.init_tensor_state,
        update=elo.update,
        optimizer=Elo,
        presets={"default": elo.ELO},
        default_preset="default",
        summary=_elo_summary,
        description="PyLO's ELO: small_fc_lopt's rule, 32 hidden units, fixed decays",
    )
)
