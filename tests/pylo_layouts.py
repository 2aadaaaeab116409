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
