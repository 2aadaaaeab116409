"""The bundled mixture entries (issue 14): verified, with their provenance, and they train."""

from __future__ import annotations

import json

import pytest

import lopt
import tasks
import zoo
from tests.task_training import sample_problem, train_losses

ENTRIES = ["small_fc_lopt/mixture_8x8", "celo2/mixture_8x8"]
LATEST = {"small_fc_lopt/mixture_8x8": "1.0.1", "celo2/mixture_8x8": "1.4.0"}
MIXTURE = "mlp_mnist,mlp_fashion_mnist,mlp_digits"


@pytest.mark.parametrize("name", ENTRIES)
def test_bundled_mixture_entry_verifies_and_records_its_run(name, monkeypatch, tmp_path):
    monkeypatch.setenv("LOZOO_ZOO", str(tmp_path / "empty-user-zoo"))
    entry = zoo.load(name)
    assert entry.bundled and entry.ref == f"{name}:{LATEST[name]}"
    assert [r.ok for r in zoo.verify(name)] == [True]
    meta = entry.meta
    assert meta["task_family"].startswith(MIXTURE)
    assert meta["command"].startswith("python -m metatrain ") and "--seed" in meta["command"]
    assert meta["metatrain_config"]["task_option"]["reparam_scale"] == [1e-3, 1e3]
    for key in ("heldout.png", "heldout.jsonl", "suite.json", "suite_table.md"):
        assert key in meta["files"], key
    # the card's main suite is the full-horizon one, 3 seeds
    assert meta["generalisation_suite"][0]["steps_scale"] == 1.0
    assert meta["generalisation_suite"][0]["seeds"] == 3


def test_celo2_1_1_and_1_2_are_the_first_run_theta_under_deployment_settings(monkeypatch, tmp_path):
    """1.1.0 and 1.2.0 are 1.0.0's θ with fields that change how the rule is applied (conv kernels
    as matrices; the Adam branch's multiplier); each card records the change from the run, and
    1.2.0's suite ran the learned optimizer with Muon's split (its identity's io_group)."""
    monkeypatch.setenv("LOZOO_ZOO", str(tmp_path / "empty-user-zoo"))
    new = zoo.load("celo2/mixture_8x8:1.2.0")
    mid, old = zoo.load("celo2/mixture_8x8:1.1.0"), zoo.load("celo2/mixture_8x8:1.0.0")
    assert "--preset celo2" in old.meta["command"] and old.meta["seed"] == 0
    assert new.theta_sha256 == mid.theta_sha256 == old.theta_sha256
    assert (old.config.conv_mode, mid.config.conv_mode, new.config.conv_mode) == (
        "slices",
        "matrix",
        "matrix",
    )
    assert (old.config.adam_lr_mult, mid.config.adam_lr_mult, new.config.adam_lr_mult) == (
        20.0,
        20.0,
        5.0,
    )
    assert mid.meta["config_changed_from_run"] == {"conv_mode": "matrix"}
    assert new.meta["config_changed_from_run"] == {"conv_mode": "matrix", "adam_lr_mult": 5}
    suite = json.loads((new.path / "suite.json").read_text())
    identity = suite["config"]["optimizer_spec"]["identity"]
    assert identity["io_group"] == {"adam": True}
    assert identity["config"]["adam_lr_mult"] == 5.0


def test_celo2_1_3_continues_1_2_with_a_conv_family_and_is_its_best_held_out_theta(
    monkeypatch, tmp_path
):
    """1.3.0 is a run started from 1.2.0 under 1.2.0's deployment settings, with conv_mnist added
    to the mixture; the published θ is that run's best held-out checkpoint (not its final θ)."""
    monkeypatch.setenv("LOZOO_ZOO", str(tmp_path / "empty-user-zoo"))
    new, parent = zoo.load("celo2/mixture_8x8:1.3.0"), zoo.load("celo2/mixture_8x8:1.2.0")
    meta = new.meta
    assert meta["init_from"]["resolved"] == "celo2/mixture_8x8:1.2.0"
    assert meta["init_from"]["theta_sha256"] == parent.theta_sha256 != new.theta_sha256
    assert meta["task_family"] == MIXTURE + ",conv_mnist"
    assert (new.config.conv_mode, new.config.adam_lr_mult) == ("matrix", 5.0)
    assert new.config == parent.config  # meta-trained under the settings it is deployed with
    assert "config_changed_from_run" not in meta
    assert meta["weights_file"] == "theta_best.safetensors" and meta["weights_step"] == 500
    suite = json.loads((new.path / "suite.json").read_text())
    identity = suite["config"]["optimizer_spec"]["identity"]
    assert identity["io_group"] == {"adam": True} and identity["theta_sha256"] == new.theta_sha256


def test_the_default_celo2_entry_continues_1_3_on_the_validation_objective(monkeypatch, tmp_path):
    """1.4.0 is 1.3.0 meta-trained further with --meta-loss-split outer_valid, same families and
    settings; its θ is the checkpoint with the best held-out *validation* ratio, and its card
    carries the 4× and 10× horizon reports next to the main suite."""
    monkeypatch.setenv("LOZOO_ZOO", str(tmp_path / "empty-user-zoo"))
    new, parent = zoo.load("celo2/mixture_8x8"), zoo.load("celo2/mixture_8x8:1.3.0")
    meta = new.meta
    assert meta["init_from"]["resolved"] == "celo2/mixture_8x8:1.3.0"
    assert meta["init_from"]["theta_sha256"] == parent.theta_sha256 != new.theta_sha256
    assert meta["metatrain_config"]["meta_loss_split"] == "outer_valid"
    assert parent.meta["metatrain_config"].get("meta_loss_split", "train") == "train"
    assert meta["task_family"] == parent.meta["task_family"] == MIXTURE + ",conv_mnist"
    assert new.config == parent.config and "config_changed_from_run" not in meta
    assert meta["weights_file"] == "theta_best.safetensors" and meta["weights_step"] == 1500
    # kept by the validation ratio: at its step that ratio is the curve's best, the train one not
    curve = [json.loads(x) for x in (new.path / "heldout.jsonl").read_text().splitlines()]
    at = next(x for x in curve if x["step"] == 1500)
    assert at["heldout_valid_ratio"] == min(x["heldout_valid_ratio"] for x in curve)
    assert at["heldout_ratio"] > min(x["heldout_ratio"] for x in curve)
    labels = [s["label"] for s in meta["generalisation_suite"]]
    assert labels == ["suite", "suite2", "suite3"]
    assert [s["steps_scale"] for s in meta["generalisation_suite"]] == [1.0, 4.0, 1.0]
    suite = json.loads((new.path / "suite.json").read_text())
    identity = suite["config"]["optimizer_spec"]["identity"]
    assert identity["io_group"] == {"adam": True} and identity["theta_sha256"] == new.theta_sha256


@pytest.mark.parametrize("name", ENTRIES)
def test_bundled_mixture_entry_trains_the_digits_task(name, monkeypatch, tmp_path):
    """150 steps on an 8×8 digits MLP at its default lr: the loss falls well below chance."""
    monkeypatch.setenv("LOZOO_ZOO", str(tmp_path / "empty-user-zoo"))
    entry = zoo.load(name)
    family = tasks.get_family("mlp_digits", depth=1, width=32, batch_size=64, activations="relu")
    task, lane, params = sample_problem(family, 0)
    arch = lopt.architecture_of(entry.config)
    lr = 3.0 if arch.name == "celo2" else 1.0  # Celo2's lr 1 is a 1e-3 RMS step
    opt = arch.optimizer(params.values(), entry.theta, entry.config, lr=lr)
    losses = train_losses(task, lane, params, opt, steps=150, data_seed=0)
    assert losses[0] > 2.0
    assert sum(losses[-20:]) / 20 < 0.5
