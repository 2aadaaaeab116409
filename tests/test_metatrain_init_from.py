"""``--init-from REF``: meta-training starts from existing weights of the same architecture."""

from __future__ import annotations

import json

import pytest
import torch

import lopt
import zoo
from metatrain import train
from metatrain.cli import main as cli_main
from tests.tiny_runs import tiny_config


def _same(a, b):
    # one Adam step at lr 1e-12 moves each coordinate by at most ~1e-12
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_one_tiny_step_from_a_zoo_entry_returns_its_weights_and_adopts_its_settings(tmp_path):
    entry = zoo.load("small_fc_lopt/mlp_mnist")
    result = train(
        tiny_config(
            tmp_path / "r", init_from="small_fc_lopt/mlp_mnist", outer_steps=1, outer_lr=1e-12
        )
    )
    for k, v in entry.theta.items():
        _same(result.theta[k], v)
    assert result.lopt_config == entry.config  # step_mult 0.003, not the preset's 0.001
    record = json.loads((result.run_dir / "config.json").read_text())
    assert record["init_from"]["resolved"] == entry.ref
    assert record["init_from"]["theta_sha256"] == entry.theta_sha256
    assert record["lopt"]["step_mult"] == entry.config.step_mult


def test_training_moves_away_from_the_source_and_explicit_options_win(tmp_path):
    src = train(tiny_config(tmp_path / "src", outer_steps=2))
    run = train(
        tiny_config(tmp_path / "dst", init_from=str(src.run_dir), lopt_option={"step_mult": 0.002})
    )
    assert run.lopt_config.step_mult == 0.002
    fresh = train(tiny_config(tmp_path / "fresh", lopt_option={"step_mult": 0.002}))
    # same seed and data: only the starting θ differs, so the results differ
    assert any(not torch.equal(run.theta[k], fresh.theta[k]) for k in run.theta)
    zero = train(
        tiny_config(tmp_path / "zero", init_from=str(src.run_dir), outer_steps=1, outer_lr=1e-12)
    )
    for k in src.theta:
        _same(zero.theta[k], src.theta[k])


def test_a_run_dir_without_final_weights_starts_from_its_latest_checkpoint(tmp_path):
    src = train(tiny_config(tmp_path / "src", outer_steps=3, checkpoint_every=3))
    (src.run_dir / "theta.safetensors").unlink()
    run = train(
        tiny_config(tmp_path / "dst", init_from=str(src.run_dir), outer_steps=1, outer_lr=1e-12)
    )
    for k in src.theta:
        _same(run.theta[k], src.theta[k])
    record = json.loads((run.run_dir / "config.json").read_text())
    assert record["init_from"]["kind"] == "checkpoint"


def test_architecture_mismatch_is_a_clear_error(tmp_path):
    path = tmp_path / "mulo.safetensors"
    lopt.save_theta(path, lopt.init_theta(lopt.MULO), lopt.MULO)
    with pytest.raises(
        ValueError,
        match=r"holds small_fc_lopt with 2409 meta-parameters, but "
        r"this run meta-trains small_fc_lopt with 197",
    ):
        train(tiny_config(tmp_path / "r", init_from=str(path)))


def test_bad_references_and_resume_keep_the_record(tmp_path, capsys):
    argv = ["--init-from", "nope/none", "--out-dir", str(tmp_path / "x"), "--outer-steps", "1"]
    assert cli_main(argv) == 2
    assert "--init-from 'nope/none' is not a meta-training run directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"holds neither final weights"):
        train(tiny_config(tmp_path / "y", init_from=str(empty)))
    cfg = tiny_config(tmp_path / "z", init_from="small_fc_lopt/mlp_mnist", outer_steps=2)
    train(cfg)
    cfg.outer_steps = 3
    train(cfg, resume=True)
    record = json.loads((tmp_path / "z" / "config.json").read_text())
    assert record["init_from"]["resolved"].startswith("small_fc_lopt/mlp_mnist:")


def test_auto_starts_from_the_architectures_default_weights_when_they_fit(tmp_path):
    from metatrain.init_from import resolve_init

    entry = zoo.load(lopt.DEFAULT_ZOO_REF)
    init = resolve_init("auto", lopt.ORIGINAL, {})
    assert init is not None and init.record["ref"] == "auto"
    assert init.record["resolved"] == entry.ref and init.config == entry.config
    assert resolve_init("auto", lopt.MULO, {}) is None  # h=32 has no default weights: fresh
    assert resolve_init("none", lopt.ORIGINAL, {}) is None
    assert resolve_init(None, lopt.ORIGINAL, {}) is None
    # the dataclass (and so the bare CLI) default is auto; a fresh run records that it was fresh
    fresh = train(tiny_config(tmp_path / "fresh", init_from="none", outer_steps=1))
    record = json.loads((fresh.run_dir / "config.json").read_text())
    assert record["init_from"] == {"ref": None, "kind": "fresh"}
    auto = train(tiny_config(tmp_path / "auto", init_from="auto", outer_steps=1, outer_lr=1e-12))
    for k, v in entry.theta.items():
        _same(auto.theta[k], v)


def test_celo2_momentum_theta_is_orthogonalised_momentum(tmp_path):
    import importlib.util
    from pathlib import Path

    from lopt.celo2 import core

    path = Path(__file__).resolve().parents[1] / "scripts" / "celo2_momentum_theta.py"
    spec = importlib.util.spec_from_file_location("celo2_momentum_theta", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = lopt.resolve_config("celo2")
    arch = lopt.architecture_of(cfg)
    theta = module.momentum_theta(noise=0.0)
    params = {"w": torch.randn(6, 9) * 0.1, "b": torch.zeros(6)}
    state = arch.init_state(params, cfg)
    gen = torch.Generator().manual_seed(0)
    m = torch.zeros(6, 9)
    for _ in range(3):
        grads = {"w": torch.randn(6, 9, generator=gen), "b": torch.randn(6, generator=gen)}
        m = 0.9 * m + 0.1 * grads["w"]
        new, state = arch.update(theta, state, params, grads, cfg, lr=1.0)
        step = (params["w"] - new["w"]) / cfg.step_mult
        params = new
        expected = core.newton_schulz(m)
        expected = expected / expected.pow(2).mean().sqrt()
        torch.testing.assert_close(step, expected, rtol=1e-3, atol=1e-3)
    # through the run: --init-from accepts the written file for a celo2 run
    out = tmp_path / "m.safetensors"
    lopt.save_theta(out, module.momentum_theta(), cfg)
    from metatrain.init_from import resolve_init

    init = resolve_init(str(out), cfg, {})
    assert init is not None and init.record["kind"] == "file"


def test_auto_for_celo2_starts_from_the_bundled_mixture_weights():
    from metatrain.init_from import resolve_init

    entry = zoo.load("celo2/mixture_8x8")
    init = resolve_init("auto", lopt.resolve_config("celo2"), {})
    assert init is not None and init.record["resolved"] == entry.ref
    assert resolve_init("auto", lopt.resolve_config("celo2_base"), {}) is None
