"""The VeLO torch.optim shell: loss plumbing, groups, missing grads, dtypes, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lopt import velo
from lopt.velo import core

CFG = velo.VeLOConfig(lstm_hidden_size=16, param_inits=8)


def theta(seed=0):
    th = velo.init_theta(CFG, torch.Generator().manual_seed(seed))
    th["lstm_init_c"] = torch.randn(16, generator=torch.Generator().manual_seed(seed + 7))
    return th


class Net(nn.Module):
    """Parameters of rank 0 to 4, including a tied conv weight."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.temp = nn.Parameter(torch.randn((), generator=gen))
        self.bias = nn.Parameter(torch.randn(4, generator=gen))
        self.mat = nn.Parameter(torch.randn(4, 3, generator=gen))
        self.cube = nn.Parameter(torch.randn(2, 4, 3, generator=gen))
        self.conv = nn.Parameter(torch.randn(3, 3, 2, 2, generator=gen))
        self.unused = nn.Parameter(torch.randn(5, generator=gen))

    def forward(self, x):
        y = x @ self.mat.T + self.bias  # (n, 4)
        y = y + torch.einsum("aij,nj->ni", self.cube, x).sum(-1, keepdim=True) * 0.1
        return (y * self.temp).square().mean() + self.conv.square().sum() * 0.01


def closure_for(model, x):
    def closure():
        model.zero_grad()
        loss = model(x)
        loss.backward()
        return loss

    return closure


def test_shell_matches_the_functional_core_over_steps():
    model = Net()
    reference = copy.deepcopy(model)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    opt = velo.VeLO(model.parameters(), theta(), CFG, num_steps=20, lr=0.5, weight_decay=0.1)
    params = {n: p.detach().clone() for n, p in reference.named_parameters()}
    state = velo.init_state(params, CFG)
    for _ in range(3):
        loss = opt.step(closure_for(model, x))
        with torch.enable_grad():
            ref = {n: p.clone().requires_grad_(True) for n, p in params.items()}
            ref_loss = torch.func.functional_call(reference, ref, (x,))
            grads = torch.autograd.grad(ref_loss, [ref[n] for n in ref], allow_unused=True)
        grads = dict(zip(ref, grads))
        assert torch.equal(loss.detach(), ref_loss.detach())
        params, state = velo.update(
            theta(), state, params, grads, CFG, lr=0.5, weight_decay=0.1, loss=ref_loss.detach(),
            num_steps=20,
        )  # fmt: skip
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), params[n], rtol=0, atol=1e-6)
    assert model.unused.grad is None and len(opt.state[model.unused]) == 0
    assert torch.equal(model.unused, reference.unused)


def test_loss_argument_equals_closure_and_is_required():
    x = torch.randn(8, 3)
    a, b = Net(), Net()
    opt_a = velo.VeLO(a.parameters(), theta(), CFG, num_steps=10)
    opt_b = velo.VeLO(b.parameters(), theta(), CFG, num_steps=10)
    for _ in range(2):
        opt_a.step(closure_for(a, x))
        loss = closure_for(b, x)()
        assert opt_b.step(loss=loss) is None
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    closure_for(b, x)()
    with pytest.raises(velo.MissingInputError, match=r"optimizer.step\(closure\)"):
        opt_b.step()
    with pytest.raises(ValueError, match="either a closure or loss=..., not both"):
        opt_b.step(closure_for(b, x), loss=1.0)
    with pytest.raises(ValueError, match="non-finite training loss"):
        opt_b.step(loss=float("nan"))


def test_num_steps_and_weights_are_required_with_clear_errors():
    params = Net().parameters()
    with pytest.raises(velo.MissingInputError, match=r"Pass num_steps=<total steps>"):
        velo.VeLO(params, theta(), CFG)
    with pytest.raises(ValueError, match="VeLO needs meta-weights"):
        velo.VeLO(Net().parameters(), None, CFG, num_steps=5)
    with pytest.raises(ValueError, match="Invalid lr: -1"):
        velo.VeLO(Net().parameters(), theta(), CFG, num_steps=5, lr=-1)


def test_param_groups_get_their_own_lr_and_weight_decay():
    x = torch.randn(8, 3)
    a, b = Net(), Net()
    groups = [
        {"params": [a.mat, a.bias], "lr": 0.1, "weight_decay": 0.5},
        {"params": [a.temp, a.cube, a.conv, a.unused]},
    ]
    opt_a = velo.VeLO(groups, theta(), CFG, num_steps=10)
    opt_b = velo.VeLO(b.parameters(), theta(), CFG, num_steps=10)
    before = {n: p.detach().clone() for n, p in a.named_parameters()}
    opt_a.step(closure_for(a, x))
    opt_b.step(closure_for(b, x))
    for n, pa in a.named_parameters():
        pb = dict(b.named_parameters())[n]
        if n in ("mat", "bias"):  # same learned step (same tensors), lr 0.1 and wd 0.5
            step = before[n] - pb.detach()
            torch.testing.assert_close(pa.detach(), before[n] * (1 - 0.05) - 0.1 * step)
        else:
            torch.testing.assert_close(pa, pb)


def test_maximize_equals_minimising_the_negated_objective():
    x = torch.randn(8, 3)
    a, b = Net(), Net()
    opt_a = velo.VeLO(a.parameters(), theta(), CFG, num_steps=10, maximize=True)
    opt_b = velo.VeLO(b.parameters(), theta(), CFG, num_steps=10)

    def negated(model):
        def closure():
            model.zero_grad()
            loss = -model(x)
            loss.backward()
            return loss

        return closure

    for _ in range(2):
        loss_a = closure_for(a, x)()
        opt_a.step(loss=loss_a)
        opt_b.step(negated(b))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_state_dict_resume_is_exact():
    x = torch.randn(8, 3)
    a = Net()
    opt_a = velo.VeLO(a.parameters(), theta(), CFG, num_steps=10)
    for _ in range(2):
        opt_a.step(closure_for(a, x))
    b = copy.deepcopy(a)
    opt_b = velo.VeLO(b.parameters(), theta(), CFG, num_steps=10)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for _ in range(2):
        opt_a.step(closure_for(a, x))
        opt_b.step(closure_for(b, x))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_bfloat16_params_keep_float32_state():
    model = Net().to(torch.bfloat16)
    x = torch.randn(8, 3, dtype=torch.bfloat16)
    opt = velo.VeLO(model.parameters(), theta(), CFG, num_steps=10)
    opt.step(closure_for(model, x))
    assert model.mat.dtype == torch.bfloat16
    assert opt.state[model.mat]["m"].dtype == torch.float32
    assert opt.state[model.conv]["r"].shape == core.state_shapes((3, 3, 2, 2), CFG)["r"]


def test_velo_is_registered_and_its_weights_files_round_trip(tmp_path):
    import lopt

    arch = lopt.get_architecture("velo")
    assert arch.optimizer is velo.VeLO and arch.preset() == velo.VELO
    assert lopt.resolve_config("velo:velo_pylo_ties").tie_break == "pylo"
    path = lopt.save_theta(tmp_path / "velo.safetensors", theta(), CFG)
    loaded, cfg = lopt.load_theta(path)
    assert cfg == CFG and all(torch.equal(loaded[k], v) for k, v in theta().items())
    model = Net()
    opt = lopt.make_optimizer(model.parameters(), str(path), num_steps=5)
    assert isinstance(opt, velo.VeLO) and opt.config == CFG
    opt.step(closure_for(model, torch.randn(4, 3)))
    record = opt.state_dict()["meta_weights"]
    assert record["architecture"] == "velo" and record["source"].startswith("file:")
