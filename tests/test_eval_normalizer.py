"""Speedup-over-Adam normaliser, EMA, best-LR selection and the report statistics, on curves made
by hand so every expected number can be worked out on paper (docs/design/meta_training.md §10);
and diverged runs still give strict, schema-valid JSON and plots."""

from __future__ import annotations

import json
import math

import jsonschema
import numpy as np
import pytest
import torch

from metatrain.evaluation import REPORT_SCHEMA, write_outputs
from metatrain.evaluation.normalizer import SpeedupNormalizer, best_index, ema, lower_envelope
from metatrain.evaluation.report import (
    SCHEMA,
    aggregate,
    describe_task,
    dumps,
    mean_se,
    per_seed_metrics,
    summarize_task,
)
from metatrain.evaluation.runner import TaskCurves
from metatrain.evaluation.seeds import make_eval_seeds


def test_ema_starts_at_the_first_point_and_propagates_nan():
    np.testing.assert_allclose(ema([1.0, 0.0, 0.0], alpha=0.5), [1.0, 0.5, 0.25])
    np.testing.assert_allclose(ema([[2.0, 2.0], [4.0, 0.0]], alpha=0.95), [[2, 2], [4, 3.8]])
    out = ema([1.0, math.nan, 1.0])
    assert out[0] == 1.0 and np.isnan(out[1:]).all()


def test_lower_envelope_ignores_nan_and_inf():
    curves = np.array([[3.0, np.nan, 1.0], [2.0, 2.5, np.inf], [np.nan, np.nan, np.nan]])
    np.testing.assert_array_equal(lower_envelope(curves), [2.0, 2.5, 1.0])
    assert lower_envelope(np.full((2, 2), np.nan)).tolist() == [math.inf, math.inf]


def test_envelope_is_monotone_and_the_lower_envelope_of_the_grid():
    k = np.arange(200)
    fast_then_up = 1.0 - 0.004 * k + 0.00003 * k**2  # Adam at a high LR: down, then diverging
    slow = 1.0 - 0.002 * k
    norm = SpeedupNormalizer.from_curves(np.stack([fast_then_up, slow]), alpha=0.0)
    assert len(norm.x) == 512 and norm.x[0] == 0 and norm.x[-1] == 199
    assert (np.diff(norm.y) <= 0).all()  # monotone non-increasing
    envelope = np.minimum(fast_then_up, slow)
    expected = np.minimum.accumulate(np.interp(norm.x, k, envelope))
    np.testing.assert_allclose(norm.y, expected)
    assert norm.y[-1] == pytest.approx(min(envelope.min(), slow[-1]))


def test_inversion_is_exact_linear_interpolation():
    steps = 101
    k = np.arange(steps)
    norm = SpeedupNormalizer.from_curves(1.0 - 0.009 * k, alpha=0.0)  # y(x) = 1 − 0.009·x
    losses = np.array([1.0, 0.91, 0.55, 0.1, 0.2345])
    np.testing.assert_allclose(norm.adam_steps(losses), (1.0 - losses) / 0.009, atol=1e-9)
    assert norm.speedup(0.55, 25) == pytest.approx(50.0 / 25)
    with pytest.raises(ValueError, match="positive step"):
        norm.speedup(0.5, 0)


def test_losses_outside_the_envelope_and_non_finite_losses():
    norm = SpeedupNormalizer.from_curves(np.linspace(2.0, 1.0, 50), alpha=0.0)
    below, above, start = norm.adam_steps([0.5, 3.0, 2.0])
    assert below == 49.0  # better than anything Adam reached: the last step
    assert above == 0.0 and start == 0.0  # worse than (or equal to) Adam's start: zero steps
    assert norm.adam_steps([math.nan, math.inf]).tolist() == [0.0, 0.0]


def test_plateau_maps_to_the_first_step_that_reaches_the_loss():
    norm = SpeedupNormalizer.from_curves([1.0, 0.5, 0.5, 0.5, 0.2], alpha=0.0, num_points=5)
    assert norm.adam_steps(0.5) == 1.0
    assert norm.adam_steps(0.75) == 0.5
    assert norm.adam_steps(0.35) == pytest.approx(3.5)


def test_diverged_lrs_are_ignored_and_smoothing_is_applied_before_the_envelope():
    good = np.linspace(1.0, 0.5, 20)
    diverged = np.full(20, np.nan)
    norm = SpeedupNormalizer.from_curves(np.stack([good, diverged]), num_points=20)
    np.testing.assert_allclose(norm.y, np.minimum.accumulate(ema(good)))
    nothing = SpeedupNormalizer.from_curves(np.stack([diverged, diverged]), num_points=8)
    assert nothing.adam_steps(0.1) == 19.0  # every Adam diverged: any finite loss is "below"
    with pytest.raises(ValueError, match=">= 2 steps"):
        SpeedupNormalizer.from_curves([[1.0]])


def test_best_lr_is_chosen_by_the_smoothed_final_loss_not_the_raw_last_value():
    k = 50
    spiky = np.full((3, k), 1.0)
    spiky[:, -1] = 0.1  # lowest raw last value, smoothed final 0.955
    steady = np.full((3, k), 0.5)
    diverged = np.full((3, k), np.nan)
    finals = [
        per_seed_metrics(c, np.ones((3, 1)), None)["final_smoothed_train_loss"]
        for c in (spiky, steady, diverged)
    ]
    assert finals[0] == pytest.approx([0.955] * 3)
    assert best_index(np.stack(finals)) == 1
    assert best_index(np.stack([finals[2], finals[0]])) == 1  # NaN never wins
    # the mean over seeds decides, not one lucky seed
    assert best_index(np.array([[0.1, 0.9, 0.9], [0.5, 0.5, 0.5]])) == 1


def test_per_seed_metrics_and_mean_se():
    loss = np.array([[3.0, 1.0, 2.0], [4.0, 2.0, 0.0]])
    val = np.array([[9.0, 0.7], [9.0, 0.9]])
    acc = np.array([[0.0, 0.8], [0.0, 0.6]])
    m = per_seed_metrics(loss, val, acc)
    assert m["mean_train_loss"].tolist() == [2.0, 2.0]
    assert m["last_train_loss"].tolist() == [2.0, 0.0]
    assert m["min_train_loss"].tolist() == [1.0, 0.0]
    assert m["final_val_loss"].tolist() == [0.7, 0.9]
    assert m["final_val_accuracy"].tolist() == [0.8, 0.6]
    assert mean_se([1.0, 2.0, 3.0]) == {"mean": 2.0, "se": pytest.approx(1 / math.sqrt(3)), "n": 3}
    assert mean_se([1.0, math.nan, 3.0]) == {"mean": 2.0, "se": pytest.approx(1.0), "n": 2}
    assert mean_se([5.0]) == {"mean": 5.0, "se": None, "n": 1}
    assert mean_se([math.inf]) == {"mean": None, "se": None, "n": 0}


def _task(learned: float | None, adam: float | None, ratio: float) -> dict:
    def block(v):
        stat = {"mean": v, "se": None, "n": 1}
        return {
            "metrics": {
                m: stat
                for m in (
                    "mean_train_loss",
                    "last_train_loss",
                    "min_train_loss",
                    "final_val_loss",
                    "final_val_accuracy",
                )
            }
        }

    points = [{"step": 5, "ratio": 2 * ratio}, {"step": 10, "ratio": ratio}]
    speedup = {"ratio": ratio, "checkpoints": points}
    return {"learned": block(learned), "adam_best": block(adam), "speedup": speedup}


def test_aggregate_win_rate_ties_and_divergence():
    tasks = [_task(1.0, 2.0, 2.0), _task(2.0, 1.0, 0.5), _task(1.0, 1.0, 1.0), _task(None, 1.0, 0)]
    agg = aggregate(tasks)
    assert agg["win_rate"]["mean_train_loss"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert agg["learned"]["mean_train_loss"]["n"] == 3  # the diverged task is counted out
    assert agg["learned"]["mean_train_loss"]["mean"] == pytest.approx(4 / 3)
    assert agg["speedup"]["mean"] == pytest.approx(3.5 / 4)
    assert agg["speedup"]["median"] == pytest.approx(0.75)
    assert [p["step"] for p in agg["speedup"]["checkpoints"]] == [5, 10]
    assert agg["speedup"]["checkpoints"][0]["mean"] == pytest.approx(3.5 / 2)


def test_diverged_runs_give_strict_json_valid_reports_and_plots(tmp_path):
    k = torch.arange(40.0)
    loss = torch.stack([torch.exp(-k / 10), torch.exp(-k / 20), torch.full_like(k, 2.0)])
    loss = loss.unsqueeze(1).repeat(1, 3, 1) + 0.01 * torch.rand(3, 3, 40)  # [O=3, S=3, K]
    loss[0, 1, 20:] = float("nan")  # one learned seed diverges half way
    loss[2, :, 5:] = float("inf")  # the large Adam LR diverges on every seed
    val = torch.rand(3, 3, 2)
    val[0, 1] = float("nan")
    curves = TaskCurves(["learned", "adam lr=0.01", "adam lr=1"], loss, [0, 40], val, val, 1.0)
    task = summarize_task(curves, [0.01, 1.0])
    assert task["learned"]["diverged_seeds"] == 1
    assert task["learned"]["metrics"]["mean_train_loss"]["n"] == 2
    assert task["adam_best"]["lr"] == 0.01 and task["adam_grid"][1]["diverged_seeds"] == 3
    assert task["curves"]["learned"]["mean"][-1] is None  # NaN seed → no mean, not NaN

    static = {"kind": "quadratic", "shapes": [["p", [10]]]}
    record = {"index": 0, "label": describe_task(static, {}), "static": static, "lane": {}}
    record.update(num_params=10, **task)
    report = {
        "schema": SCHEMA,
        "created": "2026-01-01T00:00:00Z",
        "command": None,
        "runtime_s": 1.0,
        "config": {
            "optimizer": {
                "ref": "x.safetensors",
                "kind": "file",
                "resolved": "/x.safetensors",
                "theta_sha256": "0" * 64,
                "architecture": "small_fc_lopt",
                "lopt_config": {},
            },
            "task_family": "quadratic",
            "task_options": {},
            "num_tasks": 1,
            "steps": 40,
            "seeds": 3,
            "adam_lrs": [0.01, 1.0],
            "adam": {},
            "learned_lr": 1.0,
            "eval_every": 0,
            "val_batches": 1,
            "splits": {},
            "ema_alpha": 0.95,
            "normalizer_points": 512,
            "eval_seed": 0,
            "metatrain_seed": None,
            "threads": 1,
        },
        "seeds": make_eval_seeds(0, 1, 3).to_dict(),
        "tasks": [record],
        "aggregate": aggregate([record]),
        "files": {"curves": "curves.png", "speedup": "speedup.png"},
    }
    files = write_outputs(report, tmp_path)
    written = json.loads(files["report"].read_text())  # allow_nan=False succeeded
    jsonschema.validate(written, REPORT_SCHEMA)
    assert files["curves"].stat().st_size > 1000 and files["speedup"].stat().st_size > 1000


def test_dumps_is_strict_compact_and_round_trips():
    data = {"curve": [1, None, 2.5], "cmd": "--opt [1,2]", "nested": [[1, 2], ["a"]], "e": []}
    text = dumps(data)
    assert json.loads(text) == data
    assert '"curve": [1, null, 2.5]' in text and '"cmd": "--opt [1,2]"' in text
    with pytest.raises(ValueError):
        dumps({"x": [math.nan]})
