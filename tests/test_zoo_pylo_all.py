"""Importing every PyLO optimizer (AdafacLO, MuLO, ELO, CELO2, ELO_CELO2, VeLO) into the zoo.

Each layout is written from seeded random weights in PyLO's Hugging Face format
(tests/pylo_layouts.py); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lopt
import zoo
from zoo import cli

from .pylo_layouts import (
    celo2_state,
    velo_mlp_state,
    velo_rnn_state,
    write_all_layouts,
    write_velo_dirs,
)

ARCH = {
    "AdafacLO": "small_fc_lopt",
    "MuLO": "small_fc_lopt",
    "ELO": "elo",
    "CELO2": "pylo_celo2",
    "ELO_CELO2": "elo_celo2",
    "VeLO": "velo",
}


def needs(arch: str) -> None:
    if arch not in lopt.architecture_names():
        pytest.fail(f"architecture {arch!r} is not registered")


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_velo_import_maps_every_key_and_steps(zroot, tmp_path):
    rnn_dir, mlp_dir = write_velo_dirs(tmp_path / "hub")
    entry = zoo.import_pylo([mlp_dir, rnn_dir], "velo/pylo", source="Pauljanson002/VeLO_RNN")
    assert entry.meta["architecture"] == "velo" and entry.meta["pylo_class"] == "VeLO"
    assert entry.config == lopt.VeLOConfig()
    rnn, mlp = velo_rnn_state(0), velo_mlp_state(1)
    th = entry.theta
    torch.testing.assert_close(th["lstm_w"], rnn["lstm.linear.weight"].T)
    torch.testing.assert_close(th["mix_w"], rnn["mix_layer2.weight"].T)
    torch.testing.assert_close(th["final_mix_b"], rnn["final_mix_layer.bias"])
    torch.testing.assert_close(th["step_size_w"], rnn["step_size.weight"].T)
    torch.testing.assert_close(th["lstm_init_c"], rnn["lstm_init_state.1"][0])
    torch.testing.assert_close(th["bank_w0"], mlp["input_weights_"].transpose(1, 2))
    torch.testing.assert_close(th["bank_w1"], mlp["hidden_weights_.0"].transpose(1, 2))
    torch.testing.assert_close(th["bank_b2"], mlp["output_bias_"])
    files = entry.meta["source"]["files"]
    assert files["VeLO_RNN"]["sha256"]["model.safetensors"] == sha(rnn_dir / "model.safetensors")
    assert files["VeLO_MLP"]["config"]["hidden_layers"] == 1
    assert any("num_steps" in c for c in entry.meta["caveats"])
    assert (entry.path / "source_README_VeLO_RNN.md").read_text() == "VeLO RNN card\n"
    assert "num_steps=TOTAL_STEPS" in entry.card
    model = torch.nn.Linear(4, 3)
    opt = lopt.VeLO(model.parameters(), weights="velo/pylo", num_steps=10, backend="torch")
    loss = model(torch.randn(5, 4)).square().mean()
    loss.backward()
    before = model.weight.detach().clone()
    opt.step(loss=loss)
    assert not torch.equal(before, model.weight) and torch.isfinite(model.weight).all()


def test_velo_parent_directory_and_pylo_tie_rule(zroot, tmp_path):
    write_velo_dirs(tmp_path / "velo")
    entry = zoo.import_pylo(tmp_path / "velo", "velo/ties", tie_break="pylo")
    assert entry.config.tie_break == "pylo"
    assert "'pylo' reproduces PyLO's own optimizer" in " ".join(entry.meta["caveats"])


def test_mulo_import_is_small_fc_lopt_served_by_the_mulo_shell(zroot, tmp_path):
    src = write_all_layouts(tmp_path)["MuLO"][0]
    entry = zoo.import_pylo(src, "mulo/pylo", pylo_class="MuLO")
    assert entry.meta["architecture"] == "small_fc_lopt" and entry.config == lopt.MULO
    assert entry.meta["pylo_class"] == "MuLO" and "lopt.MuLO" in entry.meta["caveats"][0]

    def net(width):
        return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Linear(width, width))

    model = net(8)
    opt = lopt.MuLO(model.named_parameters(), net(2), weights="mulo/pylo", backend="torch")
    assert opt.width_multipliers == {"0.weight": 1, "0.bias": 1, "1.weight": 8, "1.bias": 1}


@pytest.mark.parametrize("cls", ["ELO", "CELO2", "ELO_CELO2"])
def test_celo2_family_and_elo_imports(zroot, tmp_path, cls):
    needs(ARCH[cls])
    src = write_all_layouts(tmp_path)[cls][0]
    entry = zoo.import_pylo(src, f"{cls.lower()}/pylo", pylo_class=cls)
    assert entry.meta["architecture"] == ARCH[cls] and entry.meta["pylo_class"] == cls
    arch = lopt.get_architecture(ARCH[cls])
    assert isinstance(entry.config, arch.config_class)
    if cls == "ELO":
        state = load_file(str(src / "model.safetensors"))
        torch.testing.assert_close(entry.theta["w1"], state["network.linear_0.weight"].T)
        assert entry.config.hidden_size == 32
    else:
        state = celo2_state(2 if cls == "CELO2" else 3)
        torch.testing.assert_close(entry.theta["w0"][10:11], state["w0.6"])  # rows by suffix
        torch.testing.assert_close(entry.theta["w0"][-3:], state["w0.13"])
        torch.testing.assert_close(entry.theta["w2"], state["dense_w.1"])
    model = torch.nn.Linear(4, 3)
    opt = lopt.make_optimizer(model.parameters(), f"{cls.lower()}/pylo")
    assert isinstance(opt, arch.optimizer)
    model(torch.randn(5, 4)).square().mean().backward()
    opt.step()
    assert torch.isfinite(model.weight).all()


def test_repository_id_picks_the_class_of_a_shared_layout(zroot, tmp_path):
    needs("elo_celo2")
    src = write_all_layouts(tmp_path)["ELO_CELO2"][0]
    cached = tmp_path / "hub" / "models--DiamondXL--elo-celo2" / "snapshots" / "abc"
    cached.parent.mkdir(parents=True)
    src.rename(cached)
    entry = zoo.import_pylo(cached, "celo2/elo")
    assert entry.meta["pylo_class"] == "ELO_CELO2" and entry.meta["source"]["revision"] == "abc"


def test_cli_imports_all_six_and_lists_them(zroot, tmp_path, capsys):
    for arch in set(ARCH.values()):
        needs(arch)
    layouts = write_all_layouts(tmp_path)
    for cls, dirs in layouts.items():
        name = f"pylo/{cls.lower()}"
        argv = ["import-pylo", *map(str, dirs), "--name", name, "--pylo-class", cls]
        assert cli.main(argv) == 0, capsys.readouterr().err
        assert f"({cls} as {ARCH[cls]})" in capsys.readouterr().out
    assert cli.main(["list"]) == 0
    listing = capsys.readouterr().out
    for cls, arch in ARCH.items():
        line = next(ln for ln in listing.splitlines() if ln.startswith(f"pylo/{cls.lower()}:"))
        assert line.split()[1] == arch, line
    assert cli.main(["verify"]) == 0


def _edit(path, key, value=None):
    state = load_file(str(path / "model.safetensors"))
    if value is None:
        state.pop(key)
    else:
        state[key] = value
    save_file(state, str(path / "model.safetensors"))


BAD = {
    "velo half": (
        lambda d: [d["VeLO"][0]],
        {},
        "VeLO needs its two checkpoints, VeLO_RNN and VeLO_MLP",
    ),
    "velo shape": (
        lambda d: _edit(d["VeLO"][0], "lstm.linear.weight", torch.zeros(2048, 1000)) or d["VeLO"],
        {},
        r"VeLO_RNN lstm.linear.weight has shape \(2048, 1000\), expected \(2048, 1024\)",
    ),
    "velo missing key": (
        lambda d: _edit(d["VeLO"][0], "step_size.bias") or d["VeLO"],
        {},
        r"not a VeLO_RNN state dict: missing keys \['step_size.bias'\]",
    ),
    "velo bank gap": (
        lambda d: _edit(d["VeLO"][1], "hidden_weights_.0") or d["VeLO"],
        {},
        r"not a VeLO_MLP state dict: missing keys \['hidden_weights_.0'\]",
    ),
    "velo config": (
        lambda d: _config(d["VeLO"][1], {"hidden_size": 8}) or d["VeLO"],
        {},
        "VeLO_MLP config.json says hidden_size=8 but the tensors give 4",
    ),
    "celo2 group": (
        lambda d: _edit(d["CELO2"][0], "w0.13") or d["CELO2"],
        {},
        r"not the published CELO2MLP .*missing keys \['w0.13'\]",
    ),
    "celo2 shape": (
        lambda d: _edit(d["CELO2"][0], "w0.3", torch.zeros(2, 8)) or d["CELO2"],
        {},
        r"CELO2MLP w0.3 has shape \(2, 8\), expected \(3, 8\)",
    ),
    "celo2 config": (
        lambda d: _config(d["CELO2"][0], {"hidden_size": 16}) or d["CELO2"],
        {},
        "config.json says hidden_size=16 but lozoo's Celo2 has 8",
    ),
    "wrong class": (
        lambda d: d["CELO2"],
        {"pylo_class": "VeLO"},
        "a CELO2MLP checkpoint holds CELO2 / ELO_CELO2 weights, not VeLO",
    ),
    "unknown layout": (
        lambda d: _edit(d["ELO"][0], "network.input.weight") or _rename_all(d["ELO"][0]),
        {},
        "not a PyLO checkpoint layout lozoo knows",
    ),
    "tie for celo2": (
        lambda d: d["CELO2"],
        {"tie_break": "last"},
        "--tie-break does not apply to pylo_celo2",
    ),
    "velo tie last": (
        lambda d: d["VeLO"],
        {"tie_break": "last"},
        r"--tie-break for velo must be one of \('first', 'pylo'\), got 'last'",
    ),
}


def _config(path, config) -> None:
    (path / "config.json").write_text(json.dumps(config))


def _rename_all(path):
    state = load_file(str(path / "model.safetensors"))
    save_file({f"other.{k}": v for k, v in state.items()}, str(path / "model.safetensors"))
    return [path]


@pytest.mark.parametrize("edit,kwargs,message", BAD.values(), ids=BAD.keys())
def test_malformed_directories_are_refused_and_write_nothing(zroot, tmp_path, edit, kwargs,
                                                             message):  # fmt: skip
    if "celo2" in message.lower():
        needs("pylo_celo2")
    dirs = edit(write_all_layouts(tmp_path))
    with pytest.raises(zoo.ImportFormatError, match=f"cannot import PyLO checkpoint .*{message}"):
        zoo.import_pylo(dirs, "pylo/bad", **kwargs)
    assert zoo.list_entries() == []
