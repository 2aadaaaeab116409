"""scikit-learn's digits (dataset, ``mlp_digits`` family) and the weight-rescaling augmentation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, vmap

import tasks
from tasks import datasets
from tasks.augment import REPARAM_KEY, ReparamFamily


@pytest.fixture(autouse=True)
def shared_real_data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LOZOO_CACHE", str(tmp_path_factory.getbasetemp() / "lozoo-cache"))
    monkeypatch.delenv("LOZOO_DATA", raising=False)


def test_digits_splits_scaling_and_determinism() -> None:
    raw = datasets.load_raw("digits")
    assert raw.source.kind == "sklearn"
    assert raw.split_sizes() == {"train": 1150, "inner_valid": 143, "outer_valid": 145, "test": 359}
    # the 80/20 split is per class: every class is in both parts in proportion
    test_counts = torch.bincount(raw.test_labels, minlength=10)
    assert test_counts.min() >= 35 and test_counts.max() <= 37
    x, y = datasets.load_split("digits", "train", 8)
    assert x.shape == (1150, 1, 8, 8) and y.shape == (1150,)
    # ÷16, not ÷255: the brightest pixel is exactly 1 and every value is a multiple of 1/16
    assert float(x.max()) == 1.0 and float(x.min()) == 0.0
    assert torch.equal(x * 16, (x * 16).round())
    # a fixed hashed order, not the file's: the first training labels are not sorted
    assert raw.train_labels[:20].tolist() != sorted(raw.train_labels[:20].tolist())
    datasets.clear_memory_cache()
    again = datasets.load_raw("digits")
    assert torch.equal(again.train_images, raw.train_images)
    assert torch.equal(again.test_labels, raw.test_labels)


def test_digits_missing_package_message(monkeypatch) -> None:
    monkeypatch.setattr(datasets, "sklearn_digits_path", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"pip install scikit-learn"):
        datasets.find_source("digits")


def test_mlp_digits_family_is_8x8_and_trains() -> None:
    family = tasks.get_family("mlp_digits", depth=1, width=32, batch_size=64, activations="relu")
    gen = torch.Generator().manual_seed(0)
    static = family.sample_static(gen)
    assert static == tasks.ImageMLPConfig("digits", 8, (32,), 64, ("relu",))
    task = family.make_task(static)
    assert task.num_params == 64 * 32 + 32 + 32 * 10 + 10
    lane = family.sample_lane(gen, static)
    params = task.init(gen, lane)
    stream = task.batches("train", 1, 0)
    opt = torch.optim.Adam([p.requires_grad_() for p in params.values()], lr=1e-2)
    first = None
    for _ in range(150):
        batch = {k: v[0] for k, v in next(stream).items()}
        loss = task.loss(params, batch, lane)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    # digits are easy: 150 Adam steps take the loss from ~2.3 to well under 0.5
    assert first > 1.8 and float(loss.detach()) < 0.5


def _pair(seed: int, scale_range=(1e-3, 1e3)):
    base = tasks.get_family("mlp_mnist", image_sizes=8, depth=1, width=16, batch_size=32)
    aug = tasks.get_family(
        "mlp_mnist", image_sizes=8, depth=1, width=16, batch_size=32, reparam_scale=scale_range
    )
    return base, aug


def test_reparam_stores_init_over_s_and_evaluates_at_params_times_s() -> None:
    base, aug = _pair(0)
    assert isinstance(aug, ReparamFamily) and aug.base == base
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    static = base.sample_static(g1)
    assert aug.sample_static(g2) == static  # static configs are the base family's own
    lane_b, lane_a = base.sample_lane(g1, static), aug.sample_lane(g2, static)
    s = lane_a[REPARAM_KEY]
    assert s.dtype == torch.float32 and s.dim() == 0 and float(s) != 1.0
    assert all(torch.equal(lane_a[k], lane_b[k]) for k in lane_b)  # drawn after the base's
    task_b, task_a = base.make_task(static), aug.make_task(static)
    # the augmented lane consumed one more draw: init both from equal fresh generators
    p_b = task_b.init(torch.Generator().manual_seed(9), lane_b)
    p_a = task_a.init(torch.Generator().manual_seed(9), lane_a)
    for k in p_b:
        torch.testing.assert_close(p_a[k], p_b[k] / s)
    batch = {k: v[0] for k, v in next(task_b.batches("train", 1, 0)).items()}
    # the model function is unchanged: same loss at the corresponding points
    torch.testing.assert_close(task_a.loss(p_a, batch, lane_a), task_b.loss(p_b, batch, lane_b))
    ga, gb = grad(task_a.loss)(p_a, batch, lane_a), grad(task_b.loss)(p_b, batch, lane_b)
    for k in gb:  # the gradient the optimizer sees is s times the base one (chain rule)
        torch.testing.assert_close(ga[k], gb[k] * s, rtol=1e-4, atol=1e-7)
    metrics = task_a.metrics(p_a, batch, lane_a)
    torch.testing.assert_close(metrics["accuracy"], task_b.metrics(p_b, batch, lane_b)["accuracy"])


def test_reparam_scales_are_log_uniform_within_range() -> None:
    _, aug = _pair(0)
    gen = torch.Generator().manual_seed(0)
    static = aug.sample_static(gen)
    draws = [float(aug.sample_lane(gen, static)[REPARAM_KEY]) for _ in range(2000)]
    logs = torch.tensor([math.log10(s) for s in draws])
    assert -3.0 <= float(logs.min()) < -2.9 and 2.9 < float(logs.max()) <= 3.0
    assert abs(float(logs.mean())) < 0.15  # log-uniform: symmetric around s = 1
    fixed = ReparamFamily(tasks.get_family("quadratic"), 5.0)
    assert float(fixed.sample_lane(gen, fixed.sample_static(gen))[REPARAM_KEY]) == 5.0


def test_reparam_vmaps_per_lane_scales() -> None:
    _, aug = _pair(0)
    gen = torch.Generator().manual_seed(1)
    static = aug.sample_static(gen)
    task = aug.make_task(static)
    lanes = aug.sample_lanes(gen, static, 3)
    params = task.init_lanes(gen, lanes)
    batch = next(task.batches("train", 3, 0))
    batched = vmap(task.loss)(params, batch, lanes)
    for i in range(3):
        one = {k: v[i] for k, v in lanes.items()}
        p = {k: v[i] for k, v in params.items()}
        b = {k: v[i] for k, v in batch.items()}
        torch.testing.assert_close(batched[i], task.loss(p, b, one))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([0.0, 10.0], r"reparam_scale must satisfy 0 < lo <= hi"),
        ([10.0, 1.0], r"reparam_scale must satisfy 0 < lo <= hi"),
        ("big", r"reparam_scale must be a \(lo, hi\) range of positive numbers"),
        ([1.0, float("inf")], r"reparam_scale must satisfy 0 < lo <= hi \(finite\)"),
    ],
)
def test_reparam_bad_ranges(value, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tasks.get_family("mlp_mnist", reparam_scale=value)


def test_reparam_is_listed_among_valid_options_and_not_nested() -> None:
    with pytest.raises(ValueError, match=r"valid: .*reparam_scale"):
        tasks.get_family("mlp_digits", reparam=[1, 2])
    with pytest.raises(ValueError, match=r"already augmented"):
        ReparamFamily(tasks.get_family("mlp_mnist", reparam_scale=[1, 2]))
