"""The architecture seam: registry, shared shell base class, weights files and zoo format 2.

A throw-away architecture (``toy_scaled_sgd``: ``step = scale · g · loss^[loss given] ·
(1/num_steps)^[num_steps given]``) is registered to test what the base class does for any
architecture, independent of small_fc_lopt's kernels.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from safetensors import safe_open
from torch import nn

import lopt
import zoo
from lopt.architecture import (
    ARCHITECTURE_METADATA_KEY,
    FORMAT_METADATA_KEY,
    WEIGHTS_FORMAT_VERSION,
    Architecture,
    ConfigMixin,
)


# -- a toy architecture ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ToyConfig(ConfigMixin):
    architecture: ClassVar[str] = "toy_scaled_sgd"
    initial_scale: float = 0.5
    decays: tuple[float, float] = (0.9, 0.99)

    def theta_shapes(self):
        return {"scale": (1,), "mix": (2, 3)}


def toy_init_theta(cfg, generator=None):
    return {"scale": torch.tensor([cfg.initial_scale]), "mix": torch.zeros(2, 3)}


def toy_init_tensor_state(param, cfg):
    return {"m": torch.zeros(param.shape, dtype=torch.float32, device=param.device)}


def toy_init_state(params, cfg):
    return {
        "t": torch.zeros((), dtype=torch.float32),
        "tensors": {k: toy_init_tensor_state(p, cfg) for k, p in params.items()},
    }


def toy_update(
    theta, state, params, grads, cfg, *, lr=1.0, weight_decay=0.0, loss=None, num_steps=None
):
    factor = theta["scale"][0]
    if loss is not None:
        factor = factor * loss
    if num_steps is not None:
        factor = factor / num_steps
    new_params, tensors = {}, {}
    for name, p in params.items():
        g = grads[name]
        tensors[name] = {"m": state["tensors"][name]["m"] + g}
        new_params[name] = p * (1 - lr * weight_decay) - lr * factor * g
    return new_params, {"t": state["t"] + 1, "tensors": tensors}


class ToyLOpt(lopt.LearnedOptimizer):
    architecture = "toy_scaled_sgd"


TOY_PRESETS = {"half": ToyConfig(), "tenth": ToyConfig(initial_scale=0.1)}


def toy_architecture(**overrides):
    fields = dict(
        name="toy_scaled_sgd",
        config_class=ToyConfig,
        init_theta=toy_init_theta,
        init_state=toy_init_state,
        init_tensor_state=toy_init_tensor_state,
        update=toy_update,
        optimizer=ToyLOpt,
        presets=TOY_PRESETS,
        default_preset="half",
    )
    fields.update(overrides)
    return Architecture(**fields)


@pytest.fixture
def toy():
    arch = lopt.register_architecture(toy_architecture())
    yield arch
    lopt.unregister_architecture("toy_scaled_sgd")


def toy_theta(scale=0.5):
    return {"scale": torch.tensor([scale]), "mix": torch.zeros(2, 3)}


# -- registry --------------------------------------------------------------------------------------
def test_small_fc_lopt_is_registered_with_its_parts():
    arch = lopt.get_architecture("small_fc_lopt")
    assert "small_fc_lopt" in lopt.architecture_names()
    assert arch.config_class is lopt.SmallFCConfig and arch.optimizer is lopt.SmallFCLOpt
    assert arch.update is lopt.core.update and arch.init_theta is lopt.theta.init_theta
    # the top-level functions dispatch on the config's architecture
    theta = lopt.init_theta(lopt.MLPLOptConfig(hidden_size=3), torch.Generator().manual_seed(0))
    assert theta["w0"].shape == (19, 3)
    assert arch.preset() == lopt.ORIGINAL and arch.preset("mulo") == lopt.MULO
    assert lopt.architecture_of(lopt.MULO) is arch
    assert "39→4→4→2" in arch.summary(lopt.ORIGINAL)


def test_unknown_architecture_lists_the_registered_ones():
    with pytest.raises(lopt.UnknownArchitectureError, match=r"'nope'; registered.*small_fc_lopt"):
        lopt.get_architecture("nope")


def test_register_refuses_bad_records(toy):
    with pytest.raises(ValueError, match="must be lower-case letters"):
        lopt.register_architecture(toy_architecture(name="Toy-SGD"))
    with pytest.raises(ValueError, match=r"ToyConfig.architecture must be 'other'"):
        lopt.register_architecture(toy_architecture(name="other"))
    with pytest.raises(ValueError, match="default preset 'big' of toy_scaled_sgd is not one"):
        lopt.register_architecture(toy_architecture(default_preset="big"))
    with pytest.raises(TypeError, match="preset 'x' of toy_scaled_sgd is not a ToyConfig"):
        lopt.register_architecture(toy_architecture(presets={"half": ToyConfig(), "x": 1}))
    with pytest.raises(ValueError, match="'toy_scaled_sgd' is already registered"):
        lopt.register_architecture(toy_architecture(default_preset="tenth"))
    assert lopt.register_architecture(toy) is toy  # the same record again is a no-op


def test_resolve_config_names_and_options(toy):
    assert lopt.resolve_config("small_fc_lopt") == lopt.ORIGINAL
    assert lopt.resolve_config("mulo") == lopt.MULO  # a preset only one architecture has
    assert lopt.resolve_config("toy_scaled_sgd:tenth") == ToyConfig(initial_scale=0.1)
    assert lopt.resolve_config("toy_scaled_sgd", {"decays": [0.5, 0.6]}).decays == (0.5, 0.6)
    assert lopt.resolve_config("mulo", {"step_mult": 0.5}).hidden_size == 32
    with pytest.raises(lopt.UnknownArchitectureError, match=r"'adamw'.*small_fc_lopt:mulo"):
        lopt.resolve_config("adamw")
    with pytest.raises(ValueError, match=r"unknown toy_scaled_sgd config keys \['width'\]"):
        lopt.resolve_config("toy_scaled_sgd", {"width": 3})


def test_config_mixin_round_trips_through_json():
    cfg = ToyConfig(initial_scale=0.25, decays=(0.1, 0.2))
    assert ToyConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json()) == {"initial_scale": 0.25, "decays": [0.1, 0.2]}
    assert cfg.num_params == 7
    with pytest.raises(ValueError, match=r"valid keys: \['decays', 'initial_scale'\]"):
        ToyConfig.from_dict({"scale": 1})


def test_unflatten_theta_returns_views_of_the_flat_vector():
    cfg = lopt.ORIGINAL
    flat = lopt.flatten_theta(lopt.init_theta(cfg, torch.Generator().manual_seed(0)), cfg)
    theta = lopt.unflatten_theta(flat, cfg)
    before = {k: v.clone() for k, v in theta.items()}
    flat.add_(1.0)  # a write to the flat vector must show through every key
    assert all(torch.equal(theta[k], before[k] + 1.0) for k in theta)
    leaf = flat.clone().requires_grad_()  # and gradients flow back to the flat vector
    sum(v.sum() for v in lopt.unflatten_theta(leaf, cfg).values()).backward()
    assert torch.equal(leaf.grad, torch.ones_like(leaf))


# -- the shared shell base class -------------------------------------------------------------------
def toy_model():
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def test_base_class_applies_lr_wd_maximize_loss_and_num_steps(toy):
    model = toy_model()
    p0 = [p.detach().clone() for p in model.parameters()]
    opt = ToyLOpt(
        model.parameters(),
        weights=toy_theta(0.5),
        lr=0.1,
        weight_decay=0.2,
        maximize=True,
        num_steps=4,
    )
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    loss = opt.step(lambda: torch.tensor(3.0))
    assert float(loss) == 3.0
    # maximize flips g; step = 0.5 · (−1) · loss 3 / num_steps 4; p·(1 − 0.1·0.2) − 0.1·step
    for p, before in zip(model.parameters(), p0):
        torch.testing.assert_close(p.detach(), before * (1 - 0.02) + 0.1 * 0.5 * 3 / 4)
    state = opt.state[next(iter(model.parameters()))]
    assert float(state["step"]) == 1 and torch.equal(state["m"], -torch.ones(2, 3))


def test_base_class_follows_the_groups_lr_of_a_scheduler(toy):
    model = toy_model()
    opt = ToyLOpt(model.parameters(), weights=toy_theta(1.0), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    w = model.weight
    for expected_lr in (1.0, 0.5, 0.25):
        before = w.detach().clone()
        w.grad = torch.ones_like(w)
        opt.step()
        sched.step()
        torch.testing.assert_close(before - w.detach(), torch.full_like(w, expected_lr))


def test_base_class_state_dict_records_architecture_and_resumes(toy):
    model = toy_model()
    opt = ToyLOpt(model.parameters(), weights=toy_theta(), num_steps=10)
    model.weight.grad = torch.ones_like(model.weight)
    opt.step()
    saved = opt.state_dict()
    record = saved["meta_weights"]
    assert record["architecture"] == "toy_scaled_sgd" and record["source"] == "dict"
    assert record["config"] == ToyConfig().to_dict()
    fresh = ToyLOpt(model.parameters(), weights=toy_theta())
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.state[model.weight]["m"], opt.state[model.weight]["m"])
    assert fresh.state[model.weight]["m"].dtype == torch.float32


def test_shell_refuses_weights_of_another_architecture(toy, tmp_path):
    path = tmp_path / "toy.safetensors"
    lopt.save_theta(path, toy_theta(), ToyConfig())
    with pytest.raises(
        ValueError,
        match=r"SmallFCLOpt runs the small_fc_lopt architecture, but "
        r"these meta-weights are toy_scaled_sgd.*lopt.ToyLOpt",
    ):
        lopt.SmallFCLOpt(toy_model().parameters(), weights=path)
    opt = lopt.make_optimizer(toy_model().parameters(), weights=path)
    assert type(opt) is ToyLOpt and opt.config == ToyConfig()


def test_shell_without_default_weights_says_so(toy):
    with pytest.raises(ValueError, match="ToyLOpt has no default meta-weights; pass weights="):
        ToyLOpt(toy_model().parameters())


def test_hyper_parameter_and_backend_errors(toy):
    with pytest.raises(ValueError, match="Invalid num_steps: 0"):
        ToyLOpt(toy_model().parameters(), weights=toy_theta(), num_steps=0)
    with pytest.raises(ValueError, match="unknown backend 'cpp' for ToyLOpt"):
        ToyLOpt(toy_model().parameters(), weights=toy_theta(), backend="cpp")


# -- small_fc_lopt: no change of behaviour ---------------------------------------------------------
# Computed with the pre-seam code (commit 017f234) and the bundled weights, torch backend.
BUNDLED_STEP_SHA256 = "a8fca9da470861e92140f8cd50b95d8bca0b423abdf818962f0c152eb37f9ab1"
BUNDLED_STEP_DELTAS = [
    [
        0.0254792869,
        -0.0453279614,
        0.0157052875,
        -0.0249387473,
        -0.00331252813,
        0.0160761476,
        0.0238061845,
        0.0208865404,
        -0.0262881517,
        0.0279569626,
        -0.0119329542,
        -0.00408086181,
        -0.0296841115,
        0.0248430967,
        0.0305074304,
    ],
    [-0.0358369946, -0.013540566, 0.00955289602, 0.0258446373, 0.0294057131],
]


def test_bundled_weights_step_bit_identically_to_the_pre_seam_code():
    g = torch.Generator().manual_seed(1234)
    params = [torch.randn(3, 5, generator=g), torch.randn(5, generator=g)]
    params = [p.requires_grad_() for p in params]
    init = [p.detach().clone() for p in params]
    opt = lopt.SmallFCLOpt(params, weights="small_fc_lopt/mlp_mnist", backend="torch")
    assert opt.meta_weights_info["source"] == "zoo:small_fc_lopt/mlp_mnist:1.0.0"
    for _ in range(3):
        params[0].grad = torch.randn(3, 5, generator=g)
        params[1].grad = torch.randn(5, generator=g)
        opt.step()
    deltas = [(p.detach() - i).flatten().tolist() for p, i in zip(params, init)]
    for got, want in zip(deltas, BUNDLED_STEP_DELTAS):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in params)).hexdigest()
    assert digest == BUNDLED_STEP_SHA256, "the bundled weights no longer step bit-identically"


# -- weights files and zoo format 2 ----------------------------------------------------------------
def test_weights_file_records_architecture_and_format(toy, tmp_path):
    path = lopt.save_theta(tmp_path / "w.safetensors", toy_theta(0.3), ToyConfig())
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta[ARCHITECTURE_METADATA_KEY] == "toy_scaled_sgd"
    assert meta[FORMAT_METADATA_KEY] == str(WEIGHTS_FORMAT_VERSION)
    theta, cfg = lopt.load_theta(path)
    assert cfg == ToyConfig() and float(theta["scale"]) == pytest.approx(0.3)
    again = lopt.save_theta(tmp_path / "w2.safetensors", toy_theta(0.3), ToyConfig())
    assert again.read_bytes() == path.read_bytes()  # metadata order does not vary


def test_zoo_v2_round_trip_of_another_architecture(toy, zroot):
    entry = zoo.publish(toy_theta(0.25), ToyConfig(), "toy/sgd", meta={"task_family": "q"})
    config = json.loads((entry.path / "config.json").read_text())
    assert config == {
        "architecture": "toy_scaled_sgd",
        "format_version": 2,
        **ToyConfig().to_dict(),
    }
    assert entry.meta["architecture"] == "toy_scaled_sgd"
    assert entry.meta["format"] == "lozoo-zoo-entry/2"
    loaded = zoo.load("toy/sgd")
    assert (loaded.architecture, loaded.format_version, loaded.config) == (
        "toy_scaled_sgd",
        2,
        ToyConfig(),
    )
    assert loaded.optimizer_class is ToyLOpt
    assert "- toy_scaled_sgd" in loaded.card and "lopt.ToyLOpt(model.parameters()" in loaded.card
    [listed] = zoo.list_entries()
    assert listed.architecture == "toy_scaled_sgd" and listed.format_version == 2
    [checked] = zoo.verify("toy/sgd")
    assert checked.ok and (checked.architecture, checked.format_version) == ("toy_scaled_sgd", 2)
    opt = lopt.make_optimizer(toy_model().parameters(), weights="toy/sgd")
    assert type(opt) is ToyLOpt and opt.meta_weights_info["source"] == "zoo:toy/sgd:1.0.0"


def test_bundled_format_1_entry_still_loads_and_verifies():
    entry = zoo.load("small_fc_lopt/mlp_mnist:1.0.0")
    assert (entry.architecture, entry.format_version) == ("small_fc_lopt", 1)
    assert entry.config.step_mult == 0.003
    [checked] = zoo.verify("small_fc_lopt/mlp_mnist:1.0.0")
    assert checked.ok and checked.format_version == 1


def test_publish_refuses_an_unregistered_architecture(zroot):
    @dataclass(frozen=True)
    class Stray(ConfigMixin):
        architecture: ClassVar[str] = "stray_lopt"

        def theta_shapes(self):
            return {"a": (1,)}

    with pytest.raises(
        lopt.UnknownArchitectureError,
        match=r"architecture 'stray_lopt' is not "
        r"registered \(registered: .*small_fc_lopt.*\); import the module",
    ):
        zoo.publish({"a": torch.zeros(1)}, Stray(), "stray/x")
    with pytest.raises(TypeError, match="config must be a learned-optimizer config"):
        zoo.publish({"a": torch.zeros(1)}, {"a": 1}, "stray/x")


def test_entry_of_an_unregistered_architecture_fails_verify_with_the_reason(toy, zroot):
    zoo.publish(toy_theta(), ToyConfig(), "toy/gone")
    lopt.unregister_architecture("toy_scaled_sgd")
    [checked] = zoo.verify("toy/gone")
    assert not checked.ok
    assert "unknown learned-optimizer architecture 'toy_scaled_sgd'" in checked.problem


def test_lopt_does_not_import_zoo():
    import subprocess
    import sys

    code = "import sys, lopt; print('zoo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
