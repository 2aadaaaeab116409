"""Batched inner problems: ``Task.lanes_grad_and_value`` of each family equals the vmapped
reference (``vmap(grad_and_value(loss))``) on lanes with mixed activations and init scales."""

from __future__ import annotations

import pytest
import torch

import tasks
from tasks.base import Task

CASES = {
    "mlp_8x8_w32_mixed": ("mlp_mnist", dict(image_sizes=8, depth=1, width=32, batch_size=16)),
    "mlp_depth3_every_activation": (
        "mlp_mnist",
        dict(
            image_sizes=8,
            depth=3,
            width=[6, 12],
            batch_size=8,
            activations=("relu", "tanh", "gelu", "silu", "sigmoid", "sin", "leaky_relu", "selu"),
        ),
    ),  # fmt: skip
    "mlp_canonical_fashion": ("mlp_fashion_mnist", dict(canonical=True)),
    "conv_8x8_depth2": ("conv_mnist", dict(image_sizes=8, depth=2, channels=6, batch_size=8)),
    "conv_14x14_depth3": ("conv_mnist", dict(image_sizes=14, depth=3, channels=4, batch_size=4)),
    "mlp_digits": ("mlp_digits", {}),
    "mlp_reparam": (
        "mlp_mnist",
        dict(image_sizes=8, depth=1, width=8, batch_size=8, reparam_scale=(0.01, 100.0)),
    ),
}


def lanes_of(name: str, lanes: int = 12, seed: int = 0):
    family_name, options = CASES[name]
    family = tasks.get_family(family_name, **options)
    gen = torch.Generator().manual_seed(seed)
    static = family.sample_static(gen)
    task = family.make_task(static)
    cfgs = family.sample_lanes(gen, static, lanes)
    params = task.init_lanes(gen, cfgs)
    batch = next(task.batches("train", lanes, seed))
    return task, params, batch, cfgs


@pytest.mark.parametrize("name", CASES)
def test_batched_gradients_equal_the_vmapped_reference(name):
    task, params, batch, cfgs = lanes_of(name)
    assert type(task).lanes_grad_and_value is not Task.lanes_grad_and_value, "not batched"
    ref_grads, ref_loss = Task.lanes_grad_and_value(task, params, batch, cfgs)
    with torch.no_grad():  # the unroll calls it without a graph; the result must not care
        grads, loss = task.lanes_grad_and_value(params, batch, cfgs)
    assert list(grads) == list(params)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for key, ref in ref_grads.items():
        assert grads[key].shape == ref.shape, key
        assert not grads[key].requires_grad, key
        # per lane, relative to that lane's largest gradient entry
        scale = ref.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, *[1] * (ref.dim() - 1))
        assert ((grads[key] - ref).abs() / scale).max() < 2e-5, key


def test_lanes_with_one_activation_and_with_several_agree_lane_by_lane():
    """A lane's gradient does not depend on which activations the other lanes use."""
    task, params, batch, cfgs = lanes_of("mlp_8x8_w32_mixed")
    assert len(set(cfgs["activation"].tolist())) > 1
    grads, loss = task.lanes_grad_and_value(params, batch, cfgs)
    for lane in (0, 5):
        one = {k: v[lane : lane + 1] for k, v in params.items()}
        b = {k: v[lane : lane + 1] for k, v in batch.items()}
        c = {k: v[lane : lane + 1] for k, v in cfgs.items()}
        g1, l1 = task.lanes_grad_and_value(one, b, c)
        torch.testing.assert_close(l1[0], loss[lane], rtol=1e-6, atol=1e-7)
        for key in grads:
            torch.testing.assert_close(g1[key][0], grads[key][lane], rtol=1e-5, atol=1e-7)


def test_lane_activation_groups_follow_in_place_changes_of_the_lane_configs():
    """The unroll resets lane configs in place; the cached grouping must notice."""
    task, params, batch, cfgs = lanes_of("mlp_8x8_w32_mixed")
    task.lanes_grad_and_value(params, batch, cfgs)  # caches the grouping of this tensor
    cfgs["activation"][:] = (cfgs["activation"] + 1) % len(task.activations)
    ref_grads, _ = Task.lanes_grad_and_value(task, params, batch, cfgs)
    grads, _ = task.lanes_grad_and_value(params, batch, cfgs)
    for key, ref in ref_grads.items():
        torch.testing.assert_close(grads[key], ref, rtol=1e-4, atol=1e-6)
