"""``load_state_dict`` of every learned optimizer checks where the state dict comes from.

Before: ``SmallFCLOpt(params).load_state_dict(AdamW(params, lr=1e-3, weight_decay=0.5)
.state_dict())`` silently adopted lr 1e-3 and weight decay 0.5, and failed with ``KeyError: 'm'``
on the first step if that AdamW had stepped.
"""

from __future__ import annotations

import pytest
import torch

import lopt

NAMES = lopt.architecture_names()


def build(name: str, params, seed: int = 0):
    arch = lopt.get_architecture(name)
    cfg = arch.preset()
    theta = arch.init_theta(cfg, torch.Generator().manual_seed(seed))
    return arch.optimizer(params, theta, cfg, backend="torch", num_steps=50)


def stepped(name: str, shapes=((4, 5), (3,)), seed: int = 0):
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = build(name, params, seed)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step(lambda: torch.tensor(1.0))
    return opt, params


@pytest.mark.parametrize("adamw_stepped", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_another_optimizers_state_dict_is_refused(name, adamw_stepped):
    params = [torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(3))]
    adamw = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.5)
    if adamw_stepped:
        for p in params:
            p.grad = torch.randn_like(p)
        adamw.step()
    opt = build(name, params)
    with pytest.raises(ValueError, match="has no 'meta_weights' record, so no lozoo learned") as e:
        opt.load_state_dict(adamw.state_dict())
    assert "betas" in str(e.value) and "start" in str(e.value)
    assert opt.param_groups[0]["lr"] == 1.0 and opt.param_groups[0]["weight_decay"] == 0.0
    assert len(opt.state) == 0, "nothing of the foreign state may be adopted"


# every architecture saves once and loads once (a ring), not every pair: the check is by name
@pytest.mark.parametrize("saver,loader", list(zip(NAMES, NAMES[1:] + NAMES[:1]))[: len(NAMES)])
def test_another_architectures_state_dict_is_refused(saver, loader):
    opt, params = stepped(saver)
    with pytest.raises(ValueError, match=f"saved by a '{saver}' optimizer, this one is '{loader}'"):
        build(loader, params).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_state_of_other_parameters_is_refused(name):
    saved, _ = stepped(name, shapes=((4, 5), (3,)))
    other = [torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(5, 4\)\): saved state '\w+' has"):
        build(name, other).load_state_dict(saved.state_dict())
    swapped = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4, 5))]
    # rank-dependent state (small_fc_lopt's r/c vs vd) differs in keys, other states in shape
    swapped_error = r"parameter 0 \(shape \(3,\)\): saved state (has keys|'m' has shape)"
    with pytest.raises(ValueError, match=swapped_error):
        build(name, swapped).load_state_dict(saved.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_different_meta_weights_still_load_with_a_warning(name):
    saved, params = stepped(name, seed=0)
    other = build(name, params, seed=1)
    with pytest.warns(UserWarning, match="saved with different meta-weights"):
        other.load_state_dict(saved.state_dict())
    for p in params:
        for key, value in saved.state[p].items():
            assert torch.equal(other.state[p][key], value), key


def test_a_record_from_before_the_architecture_seam_is_small_fc_lopt():
    saved, params = stepped("small_fc_lopt")
    state_dict = saved.state_dict()
    del state_dict["meta_weights"]["architecture"]
    fresh = build("small_fc_lopt", params)
    fresh.load_state_dict(state_dict)
    assert torch.equal(fresh.state[params[0]]["m"], saved.state[params[0]]["m"])
