"""The validation meta-objective (``--meta-loss-split``): what a slot scores, on which batch, for
both lane backends; resume; the held-out monitor's choice of θ; bad input."""

from __future__ import annotations

import json

import pytest
import torch

import lopt
import tasks
from lopt.tree import tree_map
from metatrain import train
from metatrain.heldout import BEST_FILE, CURVE_FILE, HELDOUT_STEP_KEY, HeldoutMonitor
from metatrain.schedules import Constant
from metatrain.seeding import TAG_META_STREAM, derive_seed
from metatrain.unroll import TaskLanes, VectorizedUnroll, _pairs_to_lanes
from tests.tiny_runs import tiny_config

OPTIONS = dict(image_sizes=8, depth=1, width=12, batch_size=16)
PAIRS, STREAM_SEED = 2, 5


def make_lanes(backend="torch", meta_split="outer_valid", family_name="mlp_digits"):
    family = tasks.get_family(family_name, **OPTIONS)
    static = family.sample_static(torch.Generator().manual_seed(0))
    task = family.make_task(static)
    return TaskLanes(
        task, family, static, lopt.ORIGINAL, PAIRS, STREAM_SEED, lopt_backend=backend,
        meta_split=meta_split,
    )  # fmt: skip


def lane_thetas() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    theta = lopt.flatten_theta(lopt.init_theta(lopt.ORIGINAL, gen), lopt.ORIGINAL)
    return theta + 0.05 * torch.randn(2 * PAIRS, theta.numel(), generator=gen)


def fresh_state(lanes: TaskLanes) -> dict:
    return _pairs_to_lanes(lanes.fresh(PAIRS, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_slot_scores_the_updated_params_on_a_fresh_valid_batch(backend):
    lanes, plain = make_lanes(backend), make_lanes(backend, meta_split="train")
    thetas = lane_thetas()
    state = fresh_state(lanes)
    start = tree_map(torch.clone, state)
    batch = lanes.next_batch()
    assert set(batch) == {"inner", "meta"}
    state, loss = lanes.step(thetas, state, _pairs_to_lanes(batch))
    # the inner step is the plain one: same training batch, same update
    plain_state, train_loss = plain.step(thetas, start, _pairs_to_lanes(plain.next_batch()))
    for key, value in plain_state["params"].items():
        assert torch.equal(state["params"][key], value), key
    # the meta batch is the task's outer_valid stream with its own seed ...
    valid = lanes.task.batches("outer_valid", PAIRS, derive_seed(STREAM_SEED, TAG_META_STREAM))
    expected_batch = next(valid)
    for key, value in expected_batch.items():
        assert torch.equal(batch["meta"][key], value), key
    # ... and the loss is each lane's post-update params on it (lanes i and i+N share the batch)
    lane_batches = _pairs_to_lanes(expected_batch)
    for lane in range(2 * PAIRS):
        params = {k: v[lane].double() for k, v in state["params"].items()}
        one = {k: v[lane].double() if v.is_floating_point() else v[lane]
               for k, v in lane_batches.items()}  # fmt: skip
        cfg = {k: v[lane] for k, v in state["task_cfg"].items()}
        oracle = lanes.task.loss(params, one, cfg)
        torch.testing.assert_close(loss[lane].double(), oracle, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss, train_loss), "the valid loss must not be the train loss"


def test_both_backends_score_the_same_meta_loss_through_resets():
    thetas = lane_thetas()
    runs = {}
    for backend in ("torch", "cpp"):
        unroll = VectorizedUnroll(make_lanes(backend), PAIRS, Constant(3), 3, seed=2)
        runs[backend] = unroll.run(thetas, 7)
    assert runs["cpp"].mask.min() == 0, "the test must cross resets"
    torch.testing.assert_close(runs["cpp"].losses, runs["torch"].losses, rtol=1e-5, atol=1e-6)


def test_the_meta_stream_resumes_where_it_stopped():
    thetas = lane_thetas()
    a = VectorizedUnroll(make_lanes("cpp"), PAIRS, Constant(3), 3, seed=2)
    a.run(thetas, 2)
    saved = a.state_dict()
    assert "meta_stream" in saved["problem"]
    b = VectorizedUnroll(make_lanes("cpp"), PAIRS, Constant(3), 3, seed=2)
    b.load_state_dict(saved)
    assert torch.equal(a.run(thetas, 3).losses, b.run(thetas, 3).losses)


def test_the_default_objective_is_unchanged():
    lanes = make_lanes(meta_split="train")
    assert lanes.meta_stream is None
    assert "meta_stream" not in lanes.state_dict()
    assert set(lanes.next_batch()) == {"x", "y"}


@pytest.mark.parametrize(
    "split,message",
    [
        ("test", "meta-loss split 'test' is refused: the test split is kept for final reports"),
        ("valid", "unknown meta-loss split 'valid'; this task has: train, inner_valid"),
    ],
)
def test_bad_meta_splits_are_refused_with_the_fix(split, message):
    with pytest.raises(ValueError, match=message):
        make_lanes(meta_split=split)
    with pytest.raises(ValueError, match="--meta-loss-split: " + message.split(":")[0]):
        tiny_config("unused", meta_loss_split=split).validate()


def test_a_split_the_task_lacks_is_named():
    class TrainTestOnly:  # like the suite's fixed problems: no validation split
        splits = ("train", "test")

    with pytest.raises(ValueError, match="unknown meta-loss split 'outer_valid'; this task has: "
                       "train, test"):  # fmt: skip
        TaskLanes(TrainTestOnly(), None, None, lopt.ORIGINAL, 1, 0, meta_split="outer_valid")


def test_a_run_keeps_the_theta_with_the_best_held_out_valid_ratio(tmp_path, monkeypatch):
    """Under a validation objective θ is kept by the validation ratio, not the train ratio."""
    scripted = iter(
        [
            {"heldout_ratio": 2.0, "heldout_valid_ratio": 1.0},  # step 0: best valid
            {"heldout_ratio": 0.5, "heldout_valid_ratio": 3.0},  # step 2: better train only
            {"heldout_ratio": 4.0, "heldout_valid_ratio": 0.8},  # step 4: best valid
        ]
    )

    def evaluate(self, theta_flat, lopt_config):
        losses = {"heldout_train_loss": 1.0, "heldout_adam_train_loss": 1.0}
        return {"heldout_diverged": 0.0, **losses, **next(scripted)}

    monkeypatch.setattr(HeldoutMonitor, "evaluate", evaluate)
    cfg = tiny_config(
        tmp_path / "r", meta_loss_split="outer_valid", heldout_tasks=1, heldout_steps=10,
        outer_steps=4, checkpoint_every=2,
    )  # fmt: skip
    run = train(cfg).run_dir
    meta = lopt.weights.read_header(run / BEST_FILE)
    assert meta[HELDOUT_STEP_KEY] == "4"
    assert meta["lozoo.heldout.selected_by"] == "heldout_valid_ratio"
    lines = [json.loads(x) for x in (run / CURVE_FILE).read_text().splitlines()]
    assert [x["heldout_valid_ratio"] for x in lines] == [1.0, 3.0, 0.8]


def test_the_held_out_curve_reports_the_valid_ratio(tmp_path):
    run = train(tiny_config(tmp_path / "r", heldout_tasks=1, heldout_steps=20, outer_steps=2,
                            checkpoint_every=2)).run_dir  # fmt: skip
    line = json.loads((run / CURVE_FILE).read_text().splitlines()[-1])
    assert line["heldout_valid_ratio"] == pytest.approx(
        line["heldout_valid_loss"] / line["heldout_adam_valid_loss"]
    )
