"""lopt.functional.apply_decoupled_step: the one place every architecture applies its step."""

import torch

from lopt.functional import apply_decoupled_step


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)


def test_decoupled_weight_decay_is_scaled_by_lr_not_by_the_step():
    p, step = _inputs()
    p64, s64 = p.double(), step.double()
    out = apply_decoupled_step(p64, s64, 0.1, 0.5)
    torch.testing.assert_close(out, p64 * (1 - 0.1 * 0.5) - 0.1 * s64, rtol=0, atol=0)


def test_step_size_scales_only_the_step():
    p, step = _inputs()
    out = apply_decoupled_step(p, step, 0.1, 0.5, step_size=0.1 * 3.0)
    torch.testing.assert_close(out, p * (1 - 0.1 * 0.5) - (0.1 * 3.0) * step, rtol=0, atol=0)


def test_zero_weight_decay_as_number_or_tensor_gives_the_same_bits():
    p, step = _inputs()
    plain = p - 0.1 * step
    assert torch.equal(apply_decoupled_step(p, step, 0.1, 0.0), plain)
    assert torch.equal(apply_decoupled_step(p, step, 0.1, torch.tensor(0.0)), plain)


def test_vmaps_over_a_tensor_weight_decay():
    p, step = _inputs()
    wds = torch.tensor([0.0, 0.1, 1.0])
    out = torch.vmap(lambda wd: apply_decoupled_step(p, step, 0.1, wd))(wds)
    for i, wd in enumerate(wds.tolist()):
        torch.testing.assert_close(out[i], p * (1 - 0.1 * wd) - 0.1 * step)
