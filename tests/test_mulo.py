"""MuLO: µP width multipliers from shapes, the float64 oracle, and the optimizer shell."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import lopt
from lopt import core, mulo

from .naive_small_fc import init_state as naive_init_state
from .naive_small_fc import step as naive_step
from .test_lopt_core import random_theta, scaled_grads


class Probe(nn.Module):
    """The probe model of µLO's shape rules: input, hidden, 2×-wide, conv, embedding, readout."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(48, width)
        self.fc_2 = nn.Linear(width, width)
        self.fc_3 = nn.Linear(width, 2 * width)
        self.conv = nn.Conv2d(width, width, 3, bias=False)
        self.embedding = nn.Embedding(100, width)
        self.readout = nn.Linear(2 * width, 10)
        self.temperature = nn.Parameter(torch.ones(()))


def test_width_multipliers_of_the_probe_model():
    wide = Probe(128)
    w = mulo.width_multipliers(
        {n: p.shape for n, p in wide.named_parameters()}, mulo._shapes_of(Probe(1))
    )
    hidden = {"fc_2.weight": 128, "fc_3.weight": 128, "conv.weight": 128}
    for name, value in w.items():
        assert value == hidden.get(name, 1.0), name
    # stock-mup convention: divide by the base model's size (base width 32 -> 128/32)
    w32 = mulo.width_multipliers(
        {n: p.shape for n, p in wide.named_parameters()}, mulo._shapes_of(Probe(32)), None
    )
    assert {n: v for n, v in w32.items() if v != 1} == dict.fromkeys(hidden, 4.0)


def test_width_multiplier_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"base_shapes has no entry for \['x'\]"):
        mulo.width_multipliers({"x": (3, 3)}, {})
    with pytest.raises(ValueError, match=r"x has shape \(3, 3\) but rank 1 in the base shapes"):
        mulo.width_multipliers({"x": (3, 3)}, {"x": (3,)})
    with pytest.raises(ValueError, match=r"has 3 width axes \(0, 1, 2\)"):
        mulo.width_multipliers({"x": (4, 4, 4)}, {"x": (1, 1, 1)})
    with pytest.raises(ValueError, match="base_dim must be > 0 or None"):
        mulo.width_multipliers({"x": (4,)}, {"x": (1,)}, base_dim=0)


# (shape, base shape): ranks 0-4, ties, hidden tensors with w = shape[last width axis]
ORACLE = {
    "scalar": ((), ()),
    "bias": ((6,), (1,)),
    "input": ((6, 5), (1, 5)),
    "hidden": ((6, 6), (1, 1)),
    "wide": ((12, 6), (2, 1)),
    "stack": ((3, 4, 4), (3, 1, 1)),
    "conv": ((4, 4, 3, 3), (1, 1, 3, 3)),
    "conv_in": ((5, 4, 3, 3), (5, 1, 3, 3)),
}


@pytest.mark.parametrize("tie_break", ["first", "last"])
def test_mulo_matches_the_float64_per_element_oracle(tie_break):
    cfg = lopt.SmallFCConfig(**{**lopt.MULO.to_dict(), "tie_break": tie_break})
    theta = {k: v.double() for k, v in random_theta(cfg, seed=2).items()}
    shapes = {n: s for n, (s, _) in ORACLE.items()}
    mult = mulo.width_multipliers(shapes, {n: b for n, (_, b) in ORACLE.items()})
    assert mult["hidden"] == 6 and mult["wide"] == 6 and mult["stack"] == 4
    assert mult["conv"] == 4 and mult["conv_in"] == 1 and mult["input"] == 1
    gen = torch.Generator().manual_seed(0)
    params = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    grads = {n: [g.double() for g in scaled_grads(s, 3, seed=i)] for i, (n, s) in
             enumerate(shapes.items())}  # fmt: skip
    state = lopt.init_state(params, cfg)
    state = {
        "t": state["t"].double(),
        "tensors": {n: {k: v.double() for k, v in s.items()} for n, s in state["tensors"].items()},
    }
    theta_np = {k: v.numpy() for k, v in theta.items()}
    naive = {n: (params[n].numpy().copy(), naive_init_state(s, tie_break)) for n, s in
             shapes.items()}  # fmt: skip
    for t in range(3):
        g = {n: grads[n][t] for n in shapes}
        new, state = mulo.update(theta, state, params, g, cfg, multipliers=mult, lr=0.7)
        for n in shapes:
            p_np, st = naive[n]
            full = p_np - naive_step(p_np, g[n].numpy(), st, theta_np, cfg, t)
            want = 0.7 * full / mult[n]
            got = (params[n] - new[n]).numpy()
            assert np.abs(got - want).max() <= 1e-9 * max(np.abs(want).max(), 1e-30), (t, n)
            naive[n] = (new[n].numpy().copy(), st)
        params = new


def test_hidden_step_is_the_small_fc_step_divided_by_w_including_weight_decay():
    cfg = lopt.MULO
    theta = random_theta(cfg)
    params = {"h": torch.randn(8, 8), "b": torch.randn(8)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    state = lopt.init_state(params, cfg)
    mult = {"h": 8.0, "b": 1.0}
    new, _ = mulo.update(theta, state, params, grads, cfg, multipliers=mult, weight_decay=0.1)
    plain, _ = core.update(theta, state, params, grads, cfg)
    for n, w in mult.items():
        step = params[n] - plain[n]
        torch.testing.assert_close(new[n], params[n] * (1 - 0.1 / w) - step / w)


class Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(5, width)
        self.hid = nn.Linear(width, width)
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        return self.out(torch.relu(self.hid(torch.relu(self.inp(x)))))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_mulo_optimizer_equals_the_functional_update(backend):
    cfg = lopt.MULO
    theta = random_theta(cfg)
    model = Net(16)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = [
        {"params": [("inp.weight", model.inp.weight), ("hid.weight", model.hid.weight)]},
        {"params": [(n, p) for n, p in model.named_parameters() if "weight" not in n or "out"
                    in n], "lr": 0.5},
    ]  # fmt: skip
    opt = mulo.MuLO(groups, Net(2), theta, cfg, lr=1.0, weight_decay=0.01, backend=backend)
    assert opt.width_multipliers["hid.weight"] == 16.0
    assert opt.width_multipliers["inp.weight"] == 1.0 and opt.width_multipliers["out.weight"] == 1
    lrs = {n: 1.0 if n in ("inp.weight", "hid.weight") else 0.5 for n in params}
    state = lopt.init_state(params, cfg)
    x = torch.randn(7, 5)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        new = {}
        for n in params:  # functional update, one tensor (and its group's lr) at a time
            new_n, state_n = mulo.update(
                theta, {"t": state["t"], "tensors": {n: state["tensors"][n]}}, {n: params[n]},
                {n: grads[n]}, cfg, multipliers=opt.width_multipliers, lr=lrs[n],
                weight_decay=0.01,
            )  # fmt: skip
            new[n] = new_n[n]
            state["tensors"][n] = state_n["tensors"][n]
        state["t"] = state["t"] + 1
        params = new
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), params[n], rtol=1e-5, atol=1e-6)


def test_mulo_needs_names_and_weights():
    theta = random_theta(lopt.MULO)
    with pytest.raises(ValueError, match=r"pass model.named_parameters\(\)"):
        mulo.MuLO(Net(4).parameters(), Net(2), theta)
    missing = "MuLO needs meta-weights.*--pylo-class MuLO --name mulo/pylo"
    with pytest.raises(ValueError, match=missing):
        mulo.MuLO(Net(4).named_parameters(), Net(2))
    with pytest.raises(TypeError, match="base_shapes must be a"):
        mulo.MuLO(Net(4).named_parameters(), [1, 2], theta)


def test_mulo_state_dict_round_trip():
    theta = random_theta(lopt.MULO)
    model = Net(8)
    opt = mulo.MuLO(model.named_parameters(), Net(2), theta, backend="torch")
    model(torch.randn(3, 5)).sum().backward()
    opt.step()
    clone = copy.deepcopy(model)
    opt2 = mulo.MuLO(clone.named_parameters(), Net(2), theta, backend="torch")
    opt2.load_state_dict(opt.state_dict())
    for o, m in ((opt, model), (opt2, clone)):
        m.zero_grad()
        m(torch.ones(3, 5)).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
