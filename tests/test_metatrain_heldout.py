"""Held-out quality at every checkpoint (metatrain.heldout): curve, Adam, best θ, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lopt
import tasks
from metatrain import train
from metatrain.heldout import BASELINE_FILE, BEST_FILE, CURVE_FILE, HeldoutMonitor, final_score
from tests.tiny_runs import TINY_MNIST, tiny_config


def heldout_config(out_dir, **overrides):
    values = dict(heldout_tasks=1, heldout_steps=20, outer_steps=4, checkpoint_every=2)
    values.update(overrides)
    return tiny_config(out_dir, **values)


def test_final_score_is_the_mean_of_the_last_tenth():
    losses = torch.arange(20, dtype=torch.float32)
    assert final_score(losses) == pytest.approx((18 + 19) / 2)
    assert final_score(torch.tensor([3.0])) == 3.0
    assert final_score(torch.tensor([1.0, float("nan")])) == math.inf


def test_curve_at_start_and_every_checkpoint_with_adam_and_best_theta(tmp_path):
    result = train(heldout_config(tmp_path / "r", task_family="mlp_mnist,mlp_digits"))
    run = result.run_dir
    lines = [json.loads(x) for x in (run / CURVE_FILE).read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 2, 4]
    assert lines[0]["elapsed_s"] == 0.0 and lines[-1]["elapsed_s"] > 0
    for line in lines:
        for key in ("train_loss", "valid_loss", "adam_train_loss", "ratio", "diverged"):
            assert math.isfinite(line[f"heldout_{key}"]), key
        assert math.isfinite(line["heldout_mlp_digits_ratio"])
        assert line["heldout_ratio"] == pytest.approx(
            (line["heldout_mlp_mnist_ratio"] + line["heldout_mlp_digits_ratio"]) / 2
        )
    baseline = json.loads((run / BASELINE_FILE).read_text())
    assert len(baseline["tasks"]) == 2 and baseline["steps"] == 20
    assert {t["lr"] for t in baseline["tasks"]} <= {1e-3, 3e-3, 1e-2}
    assert lines[0]["heldout_adam_train_loss"] == pytest.approx(
        sum(t["train_loss"] for t in baseline["tasks"]) / 2
    )
    best, _ = lopt.load_theta(run / BEST_FILE)
    best_ratio = min(x["heldout_ratio"] for x in lines if x["heldout_diverged"] == 0)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["heldout_best_ratio"] == pytest.approx(best_ratio)
    assert summary["heldout_final"]["heldout_ratio"] == lines[-1]["heldout_ratio"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert {"heldout/ratio", "heldout/train_loss"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("heldout/ratio")) == 3


def test_resume_continues_the_curve_without_duplicates(tmp_path):
    part = heldout_config(tmp_path / "r", outer_steps=2)
    train(part)
    first = json.loads((tmp_path / "r" / CURVE_FILE).read_text().splitlines()[-1])
    baseline = (tmp_path / "r" / BASELINE_FILE).read_text()
    train(heldout_config(tmp_path / "r"), resume=True)
    lines = [json.loads(x) for x in (tmp_path / "r" / CURVE_FILE).read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 2, 4]
    assert lines[1] == first
    assert (tmp_path / "r" / BASELINE_FILE).read_text() == baseline  # cached, not recomputed


def test_heldout_tasks_drop_the_augmentation_and_are_deterministic(tmp_path):
    cfg = heldout_config(tmp_path / "r", task_option={**TINY_MNIST, "reparam_scale": [1e-3, 1e3]})
    (tmp_path / "r").mkdir()
    monitor = HeldoutMonitor(cfg, tmp_path / "r")
    assert all(tasks.REPARAM_KEY not in item.lane for item in monitor.tasks)
    theta = lopt.flatten_theta(lopt.init_theta(cfg.lopt_config()), cfg.lopt_config())
    a = monitor.evaluate(theta, cfg.lopt_config())
    b = monitor.evaluate(theta, cfg.lopt_config())
    assert {k: v for k, v in a.items() if k != "heldout_eval_s"} == {
        k: v for k, v in b.items() if k != "heldout_eval_s"
    }
    adam = monitor.adam[0]
    assert a["heldout_ratio"] == pytest.approx(a["heldout_train_loss"] / adam["train_loss"])


def test_a_diverging_theta_is_flagged_and_never_kept_as_best(tmp_path):
    cfg = heldout_config(tmp_path / "r")
    (tmp_path / "r").mkdir()
    monitor = HeldoutMonitor(cfg, tmp_path / "r")
    config = cfg.lopt_config()
    theta = lopt.init_theta(config)
    theta["b2"] = torch.tensor([0.0, 30.0])  # magnitude head: steps of exp(30·exp_mult)…
    big = lopt.SmallFCConfig.from_dict({**config.to_dict(), "step_mult": 1e3})
    metrics = monitor.record(1, 0.0, lopt.flatten_theta(theta, big), big)
    assert metrics["heldout_diverged"] == 1
    assert not (tmp_path / "r" / BEST_FILE).exists()


def test_bad_heldout_settings():
    with pytest.raises(ValueError, match=r"--heldout-tasks must be >= 0 and --heldout-steps >= 10"):
        heldout_config("unused", heldout_steps=3).validate()


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_lane_step_training_matches_the_evaluation_runner(tmp_path, backend):
    from metatrain.evaluation.optimizers import LearnedOptimizer
    from metatrain.evaluation.runner import train_task

    cfg = heldout_config(tmp_path / "r", lopt_backend=backend, heldout_steps=15)
    (tmp_path / "r").mkdir()
    monitor = HeldoutMonitor(cfg, tmp_path / "r")
    entry_theta = lopt.init_theta(cfg.lopt_config(), torch.Generator().manual_seed(4))
    flat = lopt.flatten_theta(entry_theta, cfg.lopt_config())
    item = monitor.tasks[0]
    losses, valid = monitor._train_learned(item, flat, cfg.lopt_config())
    curves = train_task(
        item.task,
        item.lane,
        item.inits,
        item.data_seed,
        item.val_batch,
        [LearnedOptimizer(entry_theta, cfg.lopt_config())],
        15,
        [15],
    )
    torch.testing.assert_close(losses, curves.train_loss[0, 0], rtol=1e-4, atol=1e-5)
    assert valid == pytest.approx(float(curves.val_loss[0, 0, -1]), rel=1e-4)


def test_curve_cli_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    from metatrain.heldout import main

    lines = []
    for step, ratio in ((0, 2.0), (50, 1.5)):
        lines.append(
            {
                "step": step,
                "elapsed_s": step * 6.0,
                "heldout_train_loss": ratio * 0.1,
                "heldout_adam_train_loss": 0.1,
                "heldout_ratio": ratio,
                "heldout_diverged": 0.0,
                "heldout_mlp_digits_ratio": ratio,
            }
        )
    (tmp_path / CURVE_FILE).write_text("".join(json.dumps(x) + "\n" for x in reversed(lines)))
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "   50      5.0      0.1500     0.1000  1.500" in out  # sorted by step, minutes
    assert (tmp_path / "heldout.png").stat().st_size > 1000
    assert main([str(tmp_path / "none")]) == 2
    assert "no heldout.jsonl" in capsys.readouterr().out


def test_curve_cli_shows_the_validation_ratio_when_the_curve_has_it(tmp_path, capsys, monkeypatch):
    import matplotlib.axes

    from metatrain.heldout import main

    line = {
        "step": 0, "elapsed_s": 0.0, "heldout_train_loss": 0.2, "heldout_adam_train_loss": 0.1,
        "heldout_ratio": 2.0, "heldout_valid_ratio": 0.875, "heldout_diverged": 0.0,
        "heldout_mlp_digits_ratio": 2.0,
    }  # fmt: skip
    (tmp_path / CURVE_FILE).write_text(json.dumps(line) + "\n")
    labels = []
    plot = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    assert main([str(tmp_path)]) == 0
    assert "2.000        0.875" in capsys.readouterr().out
    assert "mean, validation loss" in labels
