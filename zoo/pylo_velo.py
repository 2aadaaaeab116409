"""PyLO's VeLO checkpoints (``VeLO_RNN`` + ``VeLO_MLP``) → lozoo VeLO θ.

PyLO serves VeLO from two Hugging Face repositories, each ``config.json`` + ``model.safetensors``
in nn.Linear ``(out, in)`` layout. lozoo's θ (:meth:`lopt.velo.VeLOConfig.theta_shapes`) stores
weights ``(in, out)`` and banks ``(param_inits, in, out)``; this module maps one onto the other::

    VeLO_RNN  lstm_init_state.0 / .1   (1, H)       -> lstm_init_h / lstm_init_c  (H,)
              mix_layer2.{weight,bias}              -> mix_w (30, H) / mix_b
              final_mix_layer.{weight,bias}         -> final_mix_w / final_mix_b
              lstm.linear.{weight,bias} (4H, 2H)    -> lstm_w (2H, 4H) / lstm_b
              rnn_to_controls.{weight,bias}         -> controls_w (H, K) / controls_b
              step_size.{weight,bias} (1, H)        -> step_size_w (H, 1) / step_size_b
              mix_layer1.{weight,bias}              -> dropped (computed but unused by VeLO)
    VeLO_MLP  input_weights_ (K, h, 30)             -> bank_w0 (K, 30, h),  input_bias_ -> bank_b0
              hidden_weights_.{i} (K, h, h)         -> bank_w{i+1},         hidden_bias_.{i}
              output_weights_ (K, 3, h)             -> bank_w{L} (K, h, 3), output_bias_
              input_weights, hidden_weights.{i}, … -> dropped (scratch copies PyLO overwrites)
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lopt.velo.config import MLP_OUTPUTS, NUM_ELEMENT_FEATURES, NUM_TENSOR_FEATURES, VeLOConfig

RNN_KEYS = (
    "mix_layer1.weight",
    "mix_layer1.bias",
    "mix_layer2.weight",
    "mix_layer2.bias",
    "final_mix_layer.weight",
    "final_mix_layer.bias",
    "lstm.linear.weight",
    "lstm.linear.bias",
    "rnn_to_controls.weight",
    "rnn_to_controls.bias",
    "step_size.weight",
    "step_size.bias",
    "lstm_init_state.0",
    "lstm_init_state.1",
)
RNN_UNUSED = ("mix_layer1.weight", "mix_layer1.bias")
MLP_BANK_KEYS = ("input_weights_", "input_bias_", "output_weights_", "output_bias_")
_HIDDEN_BANK = re.compile(r"hidden_(weights|bias)_\.(\d+)")
_SCRATCH = re.compile(r"(input|output)_(weights|bias)|hidden_(weights|bias)\.\d+")


class LayoutError(ValueError):
    """The tensors do not form the expected PyLO layout (the message names the problem)."""


def is_velo_rnn(keys: set[str]) -> bool:
    return "lstm.linear.weight" in keys and "rnn_to_controls.weight" in keys


def is_velo_mlp(keys: set[str]) -> bool:
    return "input_weights_" in keys


def _hidden_indices(keys: set[str]) -> list[int]:
    found = sorted({int(m.group(2)) for k in keys if (m := _HIDDEN_BANK.fullmatch(k))})
    if found != list(range(len(found))):
        raise LayoutError(f"VeLO_MLP hidden_weights_.* indices {found} are not 0..L-1")
    return found


def _check(name: str, tensor: torch.Tensor, shape: tuple[int, ...], where: str) -> torch.Tensor:
    if tuple(tensor.shape) != shape:
        raise LayoutError(f"{where} {name} has shape {tuple(tensor.shape)}, expected {shape}")
    if not tensor.is_floating_point():
        raise LayoutError(f"{where} {name} is {tensor.dtype}, not floating point")
    return tensor.to(torch.float32)


def velo_config(rnn: dict[str, torch.Tensor], mlp: dict[str, torch.Tensor]) -> VeLOConfig:
    """The architecture the tensors imply (shapes are authoritative; config.json is advisory)."""
    keys = set(rnn)
    missing = sorted(set(RNN_KEYS) - keys)
    extra = sorted(keys - set(RNN_KEYS))
    if missing or extra:
        raise LayoutError(f"not a VeLO_RNN state dict: missing keys {missing}, unexpected {extra}")
    hidden = int(rnn["rnn_to_controls.weight"].shape[-1])
    param_inits = int(rnn["rnn_to_controls.weight"].shape[0])
    hidden_idx = _hidden_indices(set(mlp))
    bank_keys = set(MLP_BANK_KEYS) | {
        f"hidden_{p}_.{i}" for i in hidden_idx for p in ("weights", "bias")
    }
    missing = sorted(bank_keys - set(mlp))
    extra = sorted(k for k in set(mlp) - bank_keys if not _SCRATCH.fullmatch(k))
    if missing or extra:
        raise LayoutError(f"not a VeLO_MLP state dict: missing keys {missing}, unexpected {extra}")
    mlp_hidden = int(mlp["input_weights_"].shape[1]) if mlp["input_weights_"].ndim == 3 else 0
    if mlp_hidden < 1:
        raise LayoutError(
            f"VeLO_MLP input_weights_ has shape {tuple(mlp['input_weights_'].shape)}, expected "
            f"(param_inits, hidden, {NUM_ELEMENT_FEATURES})"
        )
    return VeLOConfig(
        lstm_hidden_size=hidden,
        param_inits=param_inits,
        mlp_hidden_size=mlp_hidden,
        mlp_hidden_layers=len(hidden_idx) + 1,
    )


def theta_from_pylo(
    rnn: dict[str, torch.Tensor], mlp: dict[str, torch.Tensor], cfg: VeLOConfig
) -> dict[str, torch.Tensor]:
    """Map the two PyLO state dicts onto lozoo's θ, checking every shape (see the module doc)."""
    h, k, f = cfg.lstm_hidden_size, cfg.param_inits, NUM_TENSOR_FEATURES
    r = "VeLO_RNN"

    def linear(module: str, fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = _check(f"{module}.weight", rnn[f"{module}.weight"], (fan_out, fan_in), r)
        return w.t().contiguous(), _check(f"{module}.bias", rnn[f"{module}.bias"], (fan_out,), r)

    theta: dict[str, torch.Tensor] = {
        "lstm_init_h": _check("lstm_init_state.0", rnn["lstm_init_state.0"], (1, h), r)[0],
        "lstm_init_c": _check("lstm_init_state.1", rnn["lstm_init_state.1"], (1, h), r)[0],
    }
    _check("mix_layer1.weight", rnn["mix_layer1.weight"], (h, f), r)  # checked, then dropped
    _check("mix_layer1.bias", rnn["mix_layer1.bias"], (h,), r)
    for ours, module, fan_in, fan_out in (
        ("mix", "mix_layer2", f, h),
        ("final_mix", "final_mix_layer", f, h),
        ("lstm", "lstm.linear", 2 * h, 4 * h),
        ("controls", "rnn_to_controls", h, k),
        ("step_size", "step_size", h, 1),
    ):
        theta[f"{ours}_w"], theta[f"{ours}_b"] = linear(module, fan_in, fan_out)
    sizes = cfg.mlp_layer_sizes()
    names = ["input"] + [f"hidden.{i}" for i in range(len(sizes) - 2)] + ["output"]
    for i, (name, (fan_in, fan_out)) in enumerate(zip(names, sizes)):
        if name.startswith("hidden"):
            wkey, bkey = f"hidden_weights_.{name[7:]}", f"hidden_bias_.{name[7:]}"
        else:
            wkey, bkey = f"{name}_weights_", f"{name}_bias_"
        w = _check(wkey, mlp[wkey], (k, fan_out, fan_in), "VeLO_MLP")
        theta[f"bank_w{i}"] = w.transpose(1, 2).contiguous()
        theta[f"bank_b{i}"] = _check(bkey, mlp[bkey], (k, fan_out), "VeLO_MLP").clone()
    return theta


def cross_check_configs(
    cfg: VeLOConfig, rnn_json: dict[str, Any], mlp_json: dict[str, Any]
) -> list[str]:
    """Disagreements between the two config.json files and the tensors (empty when consistent)."""
    implied = {
        ("VeLO_RNN", "lstm_hidden_size"): cfg.lstm_hidden_size,
        ("VeLO_RNN", "param_inits"): cfg.param_inits,
        ("VeLO_RNN", "input_size"): NUM_TENSOR_FEATURES,
        ("VeLO_MLP", "param_inits"): cfg.param_inits,
        ("VeLO_MLP", "hidden_size"): cfg.mlp_hidden_size,
        ("VeLO_MLP", "hidden_layers"): cfg.mlp_hidden_layers - 1,
        ("VeLO_MLP", "input_size"): NUM_ELEMENT_FEATURES,
        ("VeLO_MLP", "output_size"): MLP_OUTPUTS,
    }
    problems = []
    for (which, key), value in implied.items():
        given = (rnn_json if which == "VeLO_RNN" else mlp_json).get(key, value)
        if given != value:
            problems.append(
                f"{which} config.json says {key}={given!r} but the tensors give {value}"
            )
    return problems
