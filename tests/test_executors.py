"""The executor seam without Ray: serial runs are bit-reproducible, ``--executor``/``--workers``
pick the backend, and inconsistent execution flags fail early with a clear message."""

from __future__ import annotations

import json

import pytest
import torch

from metatrain import MetaTrainConfig, train
from metatrain.cli import main as cli_main
from metatrain.executors import SerialExecutor, make_executor
from tests.tiny_runs import tiny_config


def tiny(out_dir, **overrides) -> MetaTrainConfig:
    settings = dict(
        trajectory_length=20, min_trajectory_length=5, outer_steps=5, checkpoint_every=0
    )
    return tiny_config(out_dir, **{**settings, **overrides})


def untimed(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(x).items() if k not in ("inner_steps_per_s", "outer_step_s")}
        for x in lines
    ]


def test_serial_runs_with_several_workers_are_bit_reproducible(tmp_path):
    a = train(tiny(tmp_path / "a", workers=2, executor="serial"))
    b = train(tiny(tmp_path / "b", workers=2, executor="serial"))
    one = train(tiny(tmp_path / "one"))
    for k in a.theta:
        assert torch.equal(a.theta[k], b.theta[k]), k
    assert untimed(a.run_dir) == untimed(b.run_dir)
    # a second worker brings its own tasks and seeds: a different (averaged) trajectory
    assert any(not torch.equal(a.theta[k], one.theta[k]) for k in a.theta)
    assert len(json.loads((a.run_dir / "config.json").read_text())["task_configs"]) == 2


@pytest.mark.parametrize(
    "overrides,workers",
    [({}, 1), ({"workers": 3, "executor": "serial"}, 3), ({"executor": "serial"}, 1)],
)
def test_make_executor_stays_serial_unless_ray_is_asked_for(tmp_path, overrides, workers):
    executor = make_executor(tiny(tmp_path, **overrides).validate())
    assert isinstance(executor, SerialExecutor)
    assert [w.worker_id for w in executor.workers] == list(range(workers))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--executor", "ray"], "--executor ray needs --workers N with N >= 1"),
        (["--mode", "async"], "--mode async needs Ray workers; add --workers N"),
        (["--address", "auto"], "--address auto joins a Ray cluster, but this run is serial"),
        (["--workers", "2", "--staleness", "-1"], "must be >= 0"),
    ],
)
def test_inconsistent_execution_flags_fail_early(argv, message, capsys, tmp_path):
    assert cli_main([*argv, "--out-dir", str(tmp_path / "r"), "--outer-steps", "1"]) == 2
    assert message in capsys.readouterr().err


def test_resume_drops_a_metrics_line_torn_by_a_killed_driver(tmp_path):
    # A SIGKILLed driver can leave half a line: its file buffer is flushed in fixed-size chunks.
    train(tiny(tmp_path / "run", outer_steps=3, checkpoint_every=3))
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "meta_lo')
    result = train(tiny(tmp_path / "run", outer_steps=5, checkpoint_every=3), resume=True)
    assert [x["step"] for x in untimed(result.run_dir)] == list(range(5))


def test_a_checkpoint_of_another_worker_count_is_refused(tmp_path):
    two = SerialExecutor(tiny(tmp_path).validate(), 2)
    one = SerialExecutor(tiny(tmp_path).validate(), 1)
    with pytest.raises(ValueError, match="checkpoint has 2 workers but this run has 1; resume wi"):
        one.load_state_dict(two.state_dict())


def test_counts_add_up_and_other_metrics_average_within_and_across_workers():
    from metatrain.trainer import _average
    from metatrain.worker import SUMMED_METRICS, WorkerResult, aggregate_metrics

    est = [
        {"meta_loss": 1.0, "resets": 2.0, "nonfinite_grad": 1.0, "inner_steps": 10.0},
        {"meta_loss": 3.0, "resets": 1.0, "nonfinite_grad": 0.0, "inner_steps": 10.0},
    ]
    worker = aggregate_metrics(est)  # within a worker (its estimators)
    assert worker == {"meta_loss": 2.0, "resets": 3.0, "nonfinite_grad": 1.0, "inner_steps": 20.0}
    other = {"meta_loss": 4.0, "resets": 4.0, "nonfinite_grad": 2.0, "inner_steps": 20.0}
    results = [WorkerResult(torch.zeros(1), 0, i, m) for i, m in enumerate((worker, other))]
    across = _average(results)  # across workers: the same rule
    assert across == {"meta_loss": 3.0, "resets": 7.0, "nonfinite_grad": 3.0, "inner_steps": 40.0}
    counts = {"inner_steps", "nonfinite_grad", "inner_nonfinite_skips", "resets"}
    assert set(SUMMED_METRICS) == counts
