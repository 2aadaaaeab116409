"""ELO: small_fc_lopt's per-element rule with fixed decays and a 32-unit MLP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lopt import celo2
from lopt.celo2 import elo

from .naive_small_fc import init_state as naive_init_state
from .naive_small_fc import step as naive_step


def random_elo_theta(seed: int) -> dict:
    return celo2.init_elo_theta(celo2.ELO, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(), (7,), (5, 3), (4, 4), (2, 3, 4), (3, 2, 2, 5)])
def test_elo_matches_the_naive_per_element_reference(shape):
    cfg = celo2.ELO
    theta = random_elo_theta(1)
    # The naive reference reparameterises decays; zero offsets give the raw decays in float64.
    naive_theta = {k: v.double().numpy() for k, v in theta.items()}
    naive_theta.update(momentum_decays=np.zeros(3), rms_decays=np.zeros(1),
                       adafactor_decays=np.zeros(3))  # fmt: skip
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(shape, generator=gen)
    params = {"x": p}
    state = elo.init_state(params, cfg)
    naive_state = naive_init_state(tuple(shape), cfg.tie_break)
    expected = p.double().numpy()
    for t in range(4):
        g = torch.randn(shape, generator=gen) * 10.0 ** (t - 2)
        params, state = elo.update(theta, state, params, {"x": g}, cfg)
        expected = naive_step(expected, g.double().numpy(), naive_state, naive_theta,
                              cfg.small_fc_config(), t)  # fmt: skip
        torch.testing.assert_close(params["x"].double(), torch.from_numpy(np.asarray(expected)),
                                   atol=2e-6, rtol=0)  # fmt: skip


def test_elo_lr_and_weight_decay():
    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(6, 5, generator=gen)}
    grads = {"w": torch.randn(6, 5, generator=gen)}
    theta = random_elo_theta(0)
    zero = elo.init_state(params, celo2.ELO)
    one, _ = elo.update(theta, zero, params, grads, celo2.ELO)
    half, _ = elo.update(theta, zero, params, grads, celo2.ELO, lr=0.5)
    decayed, new_state = elo.update(theta, zero, params, grads, celo2.ELO, lr=0.5, weight_decay=0.1)
    torch.testing.assert_close(half["w"] - params["w"], 0.5 * (one["w"] - params["w"]))
    torch.testing.assert_close(decayed["w"] - half["w"], -0.05 * params["w"])
    assert new_state["t"].item() == 1


def test_elo_theta_layout_and_config():
    assert celo2.ELO.num_params == 2402
    assert list(celo2.ELO.theta_shapes()) == ["w0", "b0", "w1", "b1", "w2", "b2"]
    assert celo2.EloConfig.from_json(celo2.ELO.to_json()) == celo2.ELO
    with pytest.raises(ValueError, match=r"unknown ELO config keys \['depth'\]"):
        celo2.EloConfig.from_dict({"depth": 3})
    with pytest.raises(ValueError, match=r"rms_decays must be 1 decays in \[0, 1\)"):
        celo2.EloConfig(rms_decays=(1.5,))


def test_elo_vmaps_over_theta():
    params = {"w": torch.randn(4, 3), "b": torch.randn(4)}
    grads = {k: torch.randn(v.shape) for k, v in params.items()}
    thetas = torch.stack([celo2.flatten_theta(random_elo_theta(s), celo2.ELO) for s in range(3)])

    def run(flat):
        theta = celo2.unflatten_theta(flat, celo2.ELO)
        new, _ = elo.update(theta, elo.init_state(params, celo2.ELO), params, grads, celo2.ELO)
        return new["w"].sum() + new["b"].sum()

    torch.testing.assert_close(torch.func.vmap(run)(thetas), torch.stack([run(t) for t in thetas]))
