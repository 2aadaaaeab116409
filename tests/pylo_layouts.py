"""PyLO / Hugging Face checkpoint directories built from seeded random weights, for the tests.

Each writer produces what ``PyTorchModelHubMixin.save_pretrained`` writes for the PyLO class —
``config.json`` with the constructor arguments and ``model.safetensors`` with the state dict, key
for key and shape for shape — since nothing can be downloaded here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def _uniform(gen, shape, fan_in):
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def velo_rnn_state(seed=0, hidden=512, param_inits=256, features=30):
    """VeLORNN's state dict: nn.Linear (Kaiming-uniform-like) weights, learned initial state."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for module, fan_in, fan_out in (
        ("mix_layer1", features, hidden),
        ("mix_layer2", features, hidden),
        ("final_mix_layer", features, hidden),
        ("lstm.linear", 2 * hidden, 4 * hidden),
        ("rnn_to_controls", hidden, param_inits),
        ("step_size", hidden, 1),
    ):
        state[f"{module}.weight"] = _uniform(gen, (fan_out, fan_in), fan_in)
        state[f"{module}.bias"] = _uniform(gen, (fan_out,), fan_in)
    state["lstm_init_state.0"] = torch.randn(1, hidden, generator=gen) * 0.1
    state["lstm_init_state.1"] = torch.randn(1, hidden, generator=gen) * 0.1
    return state


def velo_mlp_state(seed=1, param_inits=256, hidden=4, hidden_layers=1, features=30, scratch=True):
    """VeLOMLP's state dict: ``torch.randn`` banks (K, out, in), plus PyLO's scratch copies."""
    gen = torch.Generator().manual_seed(seed)
    k = param_inits
    state = {
        "input_weights_": torch.randn(k, hidden, features, generator=gen),
        "input_bias_": torch.randn(k, hidden, generator=gen),
    }
    for i in range(hidden_layers):
        state[f"hidden_weights_.{i}"] = torch.randn(k, hidden, hidden, generator=gen)
        state[f"hidden_bias_.{i}"] = torch.randn(k, hidden, generator=gen)
    state["output_weights_"] = torch.randn(k, 3, hidden, generator=gen)
    state["output_bias_"] = torch.randn(k, 3, generator=gen)
    if scratch:  # overwritten on every use by PyLO; present in the published file
        for key in list(state):
            state[key.rstrip("_").replace("_.", ".")] = torch.zeros(state[key].shape[1:])
    return state


def write_hf_dir(path: Path, state: dict, config: dict, readme: str | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if readme is not None:
        (path / "README.md").write_text(readme)
    return path


VELO_RNN_CONFIG = {
    "input_size": 30,
    "lstm_hidden_size": 512,
    "mix_layers": True,
    "param_inits": 256,
}
VELO_MLP_CONFIG = {
    "hidden_layers": 1,
    "hidden_size": 4,
    "input_size": 30,
    "output_size": 3,
    "param_inits": 256,
}


def write_velo_dirs(root: Path, seed=0) -> tuple[Path, Path]:
    """``root/VeLO_RNN`` and ``root/VeLO_MLP`` as PyLO's two Hub repositories hold them."""
    rnn = write_hf_dir(root / "VeLO_RNN", velo_rnn_state(seed), VELO_RNN_CONFIG, "VeLO RNN card\n")
    mlp = write_hf_dir(root / "VeLO_MLP", velo_mlp_state(seed + 1), VELO_MLP_CONFIG)
    return rnn, mlp


CELO2_GROUP_WIDTHS = (1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3)
CELO2_CONFIG = {
    "activation": "relu",
    "feature_dims": list(CELO2_GROUP_WIDTHS),
    "hidden_layers": 2,
    "hidden_size": 8,
    "output_size": 3,
}


def celo2_state(seed=0):
    """CELO2MLP's state dict: (in, out) weights, first layer split into 14 feature groups."""
    gen = torch.Generator().manual_seed(seed)
    state = {f"w0.{i}": torch.randn(w, 8, generator=gen) / 30**0.5
             for i, w in enumerate(CELO2_GROUP_WIDTHS)}  # fmt: skip
    state["b0"] = torch.randn(8, generator=gen) * 0.1
    state["dense_w.0"] = torch.randn(8, 8, generator=gen) / 8**0.5
    state["dense_b.0"] = torch.randn(8, generator=gen) * 0.1
    state["dense_w.1"] = torch.randn(8, 3, generator=gen) / 8**0.5
    state["dense_b.1"] = torch.randn(3, generator=gen) * 0.1
    return state


def metamlp_state(seed=0, hidden=32, hidden_layers=1, inputs=39):
    """PyLO's MetaMLP state dict (nn.Linear (out, in)): input, linear_i, output."""
    gen = torch.Generator().manual_seed(seed)
    dims = [("input", inputs, hidden)]
    dims += [(f"linear_{i}", hidden, hidden) for i in range(hidden_layers)]
    dims += [("output", hidden, 2)]
    state = {}
    for module, fan_in, fan_out in dims:
        state[f"network.{module}.weight"] = torch.randn(fan_out, fan_in, generator=gen) * 0.3
        state[f"network.{module}.bias"] = torch.randn(fan_out, generator=gen) * 0.3
    return state


def write_all_layouts(root: Path) -> dict[str, list[Path]]:
    """One seeded checkpoint directory (two for VeLO) per PyLO class."""
    mulo_cfg = {"hidden_layers": 1, "hidden_size": 32, "input_size": 39}
    metamlp = write_hf_dir(root / "mulo", metamlp_state(0), mulo_cfg, "MetaMLP card\n")
    return {
        "AdafacLO": [metamlp],
        "MuLO": [metamlp],
        "ELO": [write_hf_dir(root / "elo", metamlp_state(1), mulo_cfg)],
        "CELO2": [write_hf_dir(root / "celo2", celo2_state(2), CELO2_CONFIG)],
        "ELO_CELO2": [write_hf_dir(root / "elo_celo2", celo2_state(3), CELO2_CONFIG)],
        "VeLO": list(write_velo_dirs(root / "velo", seed=4)),
    }
