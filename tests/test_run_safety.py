"""Nothing lost, nothing silently wrong in a meta-training run: a run dir is never reused by
another run, SIGINT/SIGTERM leave a checkpoint, and every CLI argument is checked before any
work starts (each case names the problem and the fix)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metatrain import train
from metatrain.cli import main as cli_main
from tests.tiny_runs import TINY_MNIST, tiny_config

REPO = Path(__file__).resolve().parents[1]


def tiny_argv(run: Path, *extra: str) -> list[str]:
    argv = ["--task-family", "mlp_mnist", "--out-dir", str(run), "--no-progress"]
    for k, v in TINY_MNIST.items():
        argv += ["--task-option", f"{k}={json.dumps(v)}"]
    argv += ["--num-tasks", "2", "--truncation-length", "2", "--trajectory-length", "8"]
    argv += ["--min-trajectory-length", "3", "--log-every", "1"]
    argv += ["--num-estimators", "1", "--resample-every", "0"]
    return argv + list(extra)


def steps_of(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ run dirs
def test_run_killed_before_its_first_checkpoint_is_not_overwritten_by_another_run(tmp_path):
    # --checkpoint-every larger than the run: before the fix such a dir had no checkpoint and a
    # second run with another config silently replaced config.json and metrics.jsonl.
    run = tmp_path / "run"
    first = tiny_config(run, outer_steps=2, checkpoint_every=1000)
    (run / "tb").mkdir(parents=True)  # what a run killed during its first steps leaves
    (run / "config.json").write_text(json.dumps({"metatrain": first.to_dict()}))
    (run / "metrics.jsonl").write_text('{"step": 0, "meta_loss": 1.0}\n')
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    other = tiny_config(run, outer_steps=2, seed=7)
    with pytest.raises(ValueError, match=f"{run} already holds a run; continue it with --resume"):
        train(other)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert not any((run / "tb").iterdir())
    # its own resume is the way back in: no checkpoint yet, so it starts over at step 0
    result = train(first, resume=True)
    assert steps_of(result.run_dir) == [0, 1]


def test_new_run_refuses_a_non_empty_directory_that_holds_no_run(tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match=r"is not empty \(it holds notes.txt\); a new run needs"):
        train(tiny_config(run, outer_steps=1))
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_checkpoint_every_zero_still_checkpoints_at_the_end(tmp_path):
    result = train(tiny_config(tmp_path / "run", outer_steps=2, checkpoint_every=0))
    assert (result.run_dir / "checkpoints" / "latest").read_text() == "ckpt-00000002.pt"


# ------------------------------------------------------------------------------------ signals
@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_writes_a_checkpoint_and_the_run_resumes_from_it(tmp_path, sig):
    run = tmp_path / "run"
    argv = tiny_argv(run, "--outer-steps", "100000", "--checkpoint-every", "100000")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "metatrain", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (run / "metrics.jsonl").exists() or len(steps_of(run)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    done = len(steps_of(run))
    assert (run / "checkpoints" / "latest").read_text() == f"ckpt-{done:08d}.pt"
    assert f"stopped after outer step {done} with a checkpoint" in err
    assert f"--resume {run}" in err
    assert cli_main(["--resume", str(run), "--outer-steps", str(done + 2), "--no-progress"]) == 0
    assert steps_of(run) == list(range(done + 2))


# ------------------------------------------------------------------------------------ CLI args
def read_only_dir(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses everyone
        return Path("/sys/lozoo-run")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    return ro / "run"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--publish", "Bad Name"], "--publish: zoo name 'Bad Name'"),
        (["--outer-steps", "0"], "--outer-steps must be positive, got 0"),
        (["--log-every", "0"], "--log-every must be positive, got 0"),
        (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0, got -1"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1, got 0"),
        (["--max-time", "-1"], "--max-time must be >= 0 seconds"),
        (["--max-time", "nan"], "--max-time must be >= 0 seconds"),
        (["--threads", "-2"], "--threads must be >= 0, got -2"),
        (["--truncation-length", "9", "--schedule", "constant"], "--truncation-length 9 is longer"),
        (["--truncation-length", "8"], "the loguniform schedule's longest is 7 steps"),
        (["--task-option", "width=-3"], "width"),
    ],
)
def test_cli_arguments_are_checked_before_any_work(extra, message, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(tiny_argv(run, "--outer-steps", "1", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not run.exists(), "no work (not even the run dir) before the arguments are checked"


def test_truncation_longer_than_trajectories_is_fine_for_full_es(tmp_path):
    cfg = tiny_config(tmp_path / "r", estimator="full_es", truncation_length=50)
    assert cfg.validate() is cfg


@pytest.mark.parametrize("where", ["under_a_file", "read_only"])
def test_unwritable_out_dir_is_a_clear_error(where, tmp_path, capsys):
    if where == "under_a_file":
        (tmp_path / "file").write_text("x")
        run = tmp_path / "file" / "run"
    else:
        run = read_only_dir(tmp_path)
    assert cli_main(tiny_argv(run, "--outer-steps", "1")) == 2
    err = capsys.readouterr().err
    assert f"--out-dir {run}: cannot create or write the directory" in err
    assert "choose a writable --out-dir" in err and "Traceback" not in err


def test_eval_out_under_a_file_is_refused_before_the_evaluation(tmp_path, capsys):
    from metatrain.eval import main as eval_main

    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "eval"
    argv = ["--optimizer", "small_fc_lopt/mlp_mnist", "--task-family", "quadratic", "--out"]
    assert eval_main([*argv, str(out), "--steps", "5", "--num-tasks", "1", "--seeds", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: cannot create or write the directory" in err and "Traceback" not in err


def test_resume_with_no_steps_left_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(tiny_argv(run, "--outer-steps", "2")) == 0
    capsys.readouterr()
    assert cli_main(["--resume", str(run), "--outer-steps", "2"]) == 2
    assert "the run already did 2 outer steps; pass --outer-steps N with N > 2" in (
        capsys.readouterr().err
    )
