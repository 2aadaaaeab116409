"""Meta-training the Celo2 family with lozoo's meta-trainer (it vmaps ``lopt.celo2.update``)."""

from __future__ import annotations

import math

import pytest
import torch

import lopt
from metatrain import train
from tests.tiny_runs import tiny_config


@pytest.mark.parametrize("name", ["celo2", "celo2_base"])
def test_tiny_meta_training_run_updates_theta(tmp_path, name):
    one = train(tiny_config(tmp_path / "one", lopt=name, outer_steps=1, checkpoint_every=1))
    six = train(tiny_config(tmp_path / "six", lopt=name))
    assert type(six.lopt_config).architecture == name
    shapes = lopt.get_architecture(name).preset().theta_shapes()
    assert {k: tuple(v.shape) for k, v in six.theta.items()} == shapes
    assert all(torch.isfinite(v).all() for v in six.theta.values())
    assert all(math.isfinite(x) for x in six.meta_losses) and len(six.meta_losses) == 6
    assert any(not torch.equal(one.theta[k], six.theta[k]) for k in shapes)
    saved, cfg = lopt.load_theta(six.run_dir / "theta.safetensors")
    assert type(cfg).architecture == name and torch.equal(saved["w0"], six.theta["w0"])
