"""The unroll's fast path (batched inner problems + lane-batched in-place lopt update) against the
vmapped reference, through resets; and its in-place lane state never leaks into state dicts."""

from __future__ import annotations

import pytest
import torch

import lopt
import tasks
from metatrain.schedules import Constant
from metatrain.unroll import TaskLanes, VectorizedUnroll


def make_unroll(backend: str, family_name="mlp_mnist", pairs=3, **options):
    options = options or dict(image_sizes=8, depth=1, width=12, batch_size=16)
    family = tasks.get_family(family_name, **options)
    static = family.sample_static(torch.Generator().manual_seed(0))
    task = family.make_task(static)
    problem = TaskLanes(task, family, static, lopt.ORIGINAL, pairs, 1, lopt_backend=backend)
    return VectorizedUnroll(problem, pairs, Constant(4), random_offset=4, seed=3)


def lane_thetas(pairs: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    theta = lopt.flatten_theta(lopt.init_theta(lopt.ORIGINAL, gen), lopt.ORIGINAL)
    return theta + 0.05 * torch.randn(2 * pairs, theta.numel(), generator=gen)


@pytest.mark.parametrize(
    "family_name,options",
    [
        ("mlp_mnist", {}),
        ("conv_mnist", dict(image_sizes=8, depth=2, channels=4, batch_size=8)),
    ],
    ids=["mlp", "conv"],
)
def test_fast_path_follows_the_vmapped_reference_through_resets(family_name, options):
    runs = {b: make_unroll(b, family_name, **options) for b in ("torch", "cpp")}
    assert runs["cpp"].problem.lopt_backend == "cpp", "the fused CPU kernel must load here"
    thetas = lane_thetas(3)
    outs = {b: u.run(thetas, 9) for b, u in runs.items()}
    assert outs["cpp"].mask.min() == 0, "the test must cross resets"
    assert torch.equal(outs["cpp"].mask, outs["torch"].mask)
    assert outs["cpp"].inner_steps == outs["torch"].inner_steps
    torch.testing.assert_close(outs["cpp"].losses, outs["torch"].losses, rtol=1e-5, atol=1e-6)
    ref, fast = runs["torch"].state, runs["cpp"].state
    for key, value in ref["params"].items():
        torch.testing.assert_close(fast["params"][key], value, rtol=1e-4, atol=1e-6)
    assert torch.equal(fast["opt_state"]["t"], ref["opt_state"]["t"])


def test_state_dicts_do_not_alias_the_in_place_lane_state():
    unroll = make_unroll("cpp")
    thetas = lane_thetas(3)
    unroll.run(thetas, 2)
    saved = unroll.state_dict()
    snapshot = {k: v.clone() for k, v in saved["lanes"]["params"].items()}
    unroll.run(thetas, 2)
    for key, value in saved["lanes"]["params"].items():
        assert torch.equal(value, snapshot[key]), "state_dict must hold a copy"
    # two unrolls loaded from one dict advance independently and identically
    a, b = make_unroll("cpp"), make_unroll("cpp")
    a.load_state_dict(saved)
    b.load_state_dict(saved)
    out_a, out_b = a.run(thetas, 3), b.run(thetas, 3)
    assert torch.equal(out_a.losses, out_b.losses)
    for key, value in saved["lanes"]["params"].items():
        assert torch.equal(value, snapshot[key])


def test_fast_path_is_deterministic_run_to_run():
    thetas = lane_thetas(3)
    first, second = (make_unroll("cpp").run(thetas, 6) for _ in range(2))
    assert torch.equal(first.losses, second.losses)
