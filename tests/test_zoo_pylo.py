"""PyLO / µLO Hugging Face layout importer, on directories the tests write in that layout."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lopt
import zoo
from lopt import core


class MetaMLP(nn.Module):
    """PyLO's MetaMLP(input_size, hidden_size, hidden_layers), key for key
    (docs/design/small_fc_lopt.md §14)."""

    def __init__(self, input_size: int, hidden_size: int, hidden_layers: int) -> None:
        super().__init__()
        layers = OrderedDict(input=nn.Linear(input_size, hidden_size), relu_input=nn.ReLU())
        for i in range(hidden_layers):
            layers[f"linear_{i}"] = nn.Linear(hidden_size, hidden_size)
            layers[f"relu_{i}"] = nn.ReLU()
        layers["output"] = nn.Linear(hidden_size, 2)
        self.network = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


def write_pylo_dir(path, hidden=32, layers=1, seed=0, config=None, readme=True):
    torch.manual_seed(seed)
    net = MetaMLP(39, hidden, layers)
    for p in net.parameters():  # non-zero biases so the bias mapping is tested too
        nn.init.normal_(p, std=0.3)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    cfg = {"input_size": 39, "hidden_size": hidden, "hidden_layers": layers, **(config or {})}
    (path / "config.json").write_text(json.dumps(cfg))
    if readme:
        (path / "README.md").write_text("---\ntags:\n- learned-optimizer\n---\nMetaMLP card\n")
    return net


@pytest.mark.parametrize("hidden,layers", [(32, 1), (8, 2), (4, 0)])
def test_imported_theta_reproduces_the_pylo_network(zroot, tmp_path, hidden, layers):
    src = tmp_path / "pylo"
    net = write_pylo_dir(src, hidden, layers)
    entry = zoo.import_pylo(src, "mulo/test", source="btherien/mulo", revision="abc123")
    cfg = entry.config
    assert (cfg.hidden_size, cfg.hidden_layers) == (hidden, layers + 1)
    assert (cfg.step_mult, cfg.exp_mult, cfg.tie_break) == (1e-2, 1e-3, "first")
    x = torch.randn(64, 39)
    theta = entry.theta
    ours = core.mlp_outputs(theta, x, theta["w0"], theta["b0"], cfg.hidden_layers + 1)
    torch.testing.assert_close(ours, net(x), rtol=1e-5, atol=1e-6)
    assert entry.meta["num_params"] == cfg.num_params


def test_mulo_import_matches_the_mulo_preset_and_records_provenance(zroot, tmp_path):
    src = tmp_path / "pylo"
    write_pylo_dir(src)
    entry = zoo.import_pylo(src, "mulo/imagenet", source="btherien/mulo", revision="abc123")
    assert entry.config == lopt.MULO and entry.config.num_params == 2409
    for key, offsets in lopt.MULO.init_decay_offsets.items():
        assert entry.theta[key].tolist() == pytest.approx(offsets)
    momentum, _, _ = core.effective_decays(entry.theta, entry.config)
    assert momentum.tolist() == pytest.approx([0.542027, 0.958441, 0.998024], abs=1e-6)
    source = entry.meta["source"]
    assert (source["repo_id"], source["revision"]) == ("btherien/mulo", "abc123")
    sha = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    assert source["sha256"]["model.safetensors"] == sha
    assert source["config"] == {"input_size": 39, "hidden_size": 32, "hidden_layers": 1}
    assert any("µP" in c for c in entry.meta["caveats"])
    card = entry.card
    for text in ("btherien/mulo", "abc123", sha, "µP", "## Caveats", "source_README.md"):
        assert text in card, text
    assert (entry.path / "source_README.md").read_text().endswith("MetaMLP card\n")
    model = nn.Linear(6, 3)
    opt = lopt.SmallFCLOpt(model.parameters(), weights="mulo/imagenet")
    model(torch.randn(5, 6)).pow(2).mean().backward()
    opt.step()
    assert torch.isfinite(model.weight).all()


def test_tie_break_and_hf_cache_path_inference(zroot, tmp_path):
    src = tmp_path / "hub" / "models--btherien--mulo" / "snapshots" / "0123abcd"
    write_pylo_dir(src, readme=False)
    entry = zoo.import_pylo(src, "mulo/pylo-parity", tie_break="last")
    assert entry.config.tie_break == "last"
    assert (entry.meta["source"]["repo_id"], entry.meta["source"]["revision"]) == (
        "btherien/mulo",
        "0123abcd",
    )
    assert not (entry.path / "source_README.md").exists()


def _drop(key):
    def edit(path):
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
        state.pop(key)
        save_file(state, str(path / "model.safetensors"))

    return edit


def _replace(key, value):
    def edit(path):
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
        state[key] = value
        save_file(state, str(path / "model.safetensors"))

    return edit


def _rename(old, new):
    def edit(path):
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
        state[new] = state.pop(old)
        save_file(state, str(path / "model.safetensors"))

    return edit


def _pickle_only(path):
    (path / "model.safetensors").unlink()
    torch.save({"network.input.weight": torch.zeros(32, 39)}, path / "pytorch_model.bin")


BAD = {
    "missing model": (lambda p: (p / "model.safetensors").unlink(), "missing model.safetensors"),
    "pickle only": (_pickle_only, r"missing model.safetensors \(pytorch_model.bin is a pickle"),
    "missing config": (lambda p: (p / "config.json").unlink(), "missing config.json"),
    "bad json": (lambda p: (p / "config.json").write_text("{"), "config.json is not valid JSON"),
    "hidden mismatch": (
        lambda p: (p / "config.json").write_text(json.dumps({"hidden_size": 64})),
        "config.json says hidden_size=64 but the tensors give 32",
    ),
    "layers mismatch": (
        lambda p: (p / "config.json").write_text(json.dumps({"hidden_layers": 2})),
        "config.json says hidden_layers=2 but the tensors give 1",
    ),
    "input 40": (
        _replace("network.input.weight", torch.zeros(32, 40)),
        r"network.input.weight has shape \(32, 40\), expected \(32, 39\)",
    ),
    "output 3": (
        _replace("network.output.weight", torch.zeros(3, 32)),
        r"network.output.weight has shape \(3, 32\), expected \(2, 32\)",
    ),
    "missing bias": (_drop("network.output.bias"), r"missing keys \['network.output.bias'\]"),
    "unexpected key": (
        _replace("network.extra.weight", torch.zeros(1)),
        r"unexpected keys \['network.extra.weight'\]",
    ),
    "index gap": (
        lambda p: [
            _rename(f"network.linear_0.{k}", f"network.linear_1.{k}")(p) for k in ("weight", "bias")
        ],
        r"network.linear_\* indices \[1\] are not 0..H-1",
    ),
    "int tensor": (
        _replace("network.input.bias", torch.zeros(32, dtype=torch.int32)),
        "network.input.bias is torch.int32, not floating",
    ),
    "corrupt file": (
        lambda p: (p / "model.safetensors").write_bytes(b"\x80\x04garbage"),
        r"model.safetensors is not valid safetensors \(it looks like a pickle\)",
    ),
    "not a dir": (lambda p: None, "not a directory"),
}


@pytest.mark.parametrize("edit,message", BAD.values(), ids=BAD.keys())
def test_bad_pylo_directories(zroot, tmp_path, edit, message):
    src = tmp_path / "pylo"
    write_pylo_dir(src)
    edit(src)
    target = src / "config.json" if message == "not a directory" else src
    with pytest.raises(zoo.ImportFormatError, match=f"cannot import PyLO checkpoint .*{message}"):
        zoo.import_pylo(target, "mulo/bad")
    assert zoo.list_entries() == []


def test_non_finite_pylo_weights_are_refused(zroot, tmp_path):
    src = tmp_path / "pylo"
    write_pylo_dir(src)
    bad = torch.zeros(32)
    bad[3] = float("inf")
    _replace("network.linear_0.bias", bad)(src)
    with pytest.raises(ValueError, match="meta-weight 'b1' contains NaN or inf"):
        zoo.import_pylo(src, "mulo/bad")
