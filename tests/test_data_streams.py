"""BatchStream: stacked shapes, epoch semantics, independence, determinism, checkpointing."""

from __future__ import annotations

import pytest
import torch

from tasks.streams import BatchStream

N, D = 23, 3


def arrays() -> dict[str, torch.Tensor]:
    idx = torch.arange(N)
    return {"x": idx.float().unsqueeze(1).expand(N, D).contiguous(), "y": idx}


def test_shapes_dtypes_and_alignment() -> None:
    stream = BatchStream(arrays(), n_streams=4, batch_size=5, gen_or_seed=0, name="train")
    batch = next(stream)
    assert batch["x"].shape == (4, 5, D) and batch["x"].dtype == torch.float32
    assert batch["y"].shape == (4, 5) and batch["y"].dtype == torch.int64
    assert torch.equal(batch["x"][..., 0].long(), batch["y"])  # x and y gathered together
    assert stream.next()["y"].shape == (4, 5)  # .next() is next()


def test_each_epoch_is_a_fresh_permutation_without_remainder() -> None:
    stream = BatchStream(arrays(), n_streams=3, batch_size=5, gen_or_seed=1)
    assert stream.batches_per_epoch == 4  # 23 // 5: the last 3 examples of an epoch are dropped
    epochs = []
    for _ in range(3):
        ys = torch.cat([next(stream)["y"] for _ in range(4)], dim=1)  # [3, 20]
        for row in ys:
            assert len(set(row.tolist())) == 20  # no repeats within an epoch
        epochs.append(ys)
    assert stream.epoch == 2
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled every epoch
    assert not torch.equal(epochs[0][0], epochs[0][1])  # each stream has its own permutation


def test_same_seed_same_batches_and_generator_equivalent() -> None:
    a = BatchStream(arrays(), 2, 4, 7)
    b = BatchStream(arrays(), 2, 4, torch.Generator().manual_seed(7))
    c = BatchStream(arrays(), 2, 4, 8)
    draws_a = [next(a)["y"] for _ in range(12)]
    draws_b = [next(b)["y"] for _ in range(12)]
    draws_c = [next(c)["y"] for _ in range(12)]
    assert all(torch.equal(p, q) for p, q in zip(draws_a, draws_b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(draws_a, draws_c, strict=True))


def test_stream_i_does_not_depend_on_n_streams() -> None:
    two, five = BatchStream(arrays(), 2, 4, 3), BatchStream(arrays(), 5, 4, 3)
    for _ in range(9):
        assert torch.equal(next(two)["y"], next(five)["y"][:2])


def test_caller_generator_is_advanced() -> None:
    gen = torch.Generator().manual_seed(0)
    first = next(BatchStream(arrays(), 1, 4, gen))["y"]
    second = next(BatchStream(arrays(), 1, 4, gen))["y"]
    assert not torch.equal(first, second)


@pytest.mark.parametrize("warmup", [0, 3, 4, 9])  # fresh, mid-epoch, epoch boundary, later epoch
def test_checkpoint_resumes_bit_identically(warmup: int) -> None:
    stream = BatchStream(arrays(), 3, 5, 11, name="train")
    for _ in range(warmup):
        next(stream)
    state = stream.state_dict()
    expected = [next(stream) for _ in range(10)]
    resumed = BatchStream(arrays(), 3, 5, 999, name="train")  # different seed: state overrides
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert torch.equal(got["x"], want["x"]) and torch.equal(got["y"], want["y"])
    assert resumed.epoch == stream.epoch and resumed.cursor == stream.cursor


def test_state_dict_survives_torch_save(tmp_path) -> None:
    stream = BatchStream(arrays(), 2, 5, 0, name="test")
    next(stream)
    torch.save(stream.state_dict(), tmp_path / "s.pt")
    clone = BatchStream(arrays(), 2, 5, 1, name="test")
    clone.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert torch.equal(next(clone)["y"], next(stream)["y"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_streams": 3}, r"n_streams is 2 in the checkpoint but 3"),
        ({"batch_size": 4}, r"batch_size is 5 in the checkpoint but 4"),
        ({"name": "test"}, r"name is 'train' in the checkpoint but 'test'"),
    ],
)
def test_load_state_dict_rejects_a_different_stream(kwargs, match) -> None:
    state = BatchStream(arrays(), 2, 5, 0, name="train").state_dict()
    args = {"n_streams": 2, "batch_size": 5, "name": "train", **kwargs}
    other = BatchStream(arrays(), args["n_streams"], args["batch_size"], 0, name=args["name"])
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(state)


def test_load_state_dict_rejects_other_split_size() -> None:
    state = BatchStream(arrays(), 2, 5, 0).state_dict()
    smaller = {k: v[:20] for k, v in arrays().items()}
    with pytest.raises(ValueError, match=r"num_examples is 23 in the checkpoint but 20"):
        BatchStream(smaller, 2, 5, 0).load_state_dict(state)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: BatchStream(arrays(), 1, 24, 0, name="train"),
            r"batch_size must be an int in \[1, 23\]",
        ),
        (lambda: BatchStream(arrays(), 0, 4, 0), r"n_streams must be a positive int"),
        (lambda: BatchStream({}, 1, 4, 0), r"needs at least one array"),
        (
            lambda: BatchStream({"x": torch.zeros(5), "y": torch.zeros(6)}, 1, 2, 0),
            r"disagree on the number of examples",
        ),
    ],
    ids=["batch-too-big", "no-streams", "no-arrays", "ragged"],
)
def test_bad_arguments(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_seed_type() -> None:
    with pytest.raises(TypeError, match=r"expected a torch.Generator or an int seed"):
        BatchStream(arrays(), 1, 4, "seed")  # type: ignore[arg-type]
