"""Fault tests on real Ray processes, driven through the CLI in subprocesses: the driver killed
with SIGKILL and resumed, and a second Ray node on localhost stopped mid-run. Every process a
test starts is killed in a ``finally`` (whole sessions, so Ray's children go too)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import lopt
from metatrain import train
from metatrain.config import build_parser, config_from_args

# The `ray` CLI of the interpreter running the tests, also when its venv is not on PATH.
RAY_CLI = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY_ARGS = [
    "--task-family", "mlp_mnist",
    "--task-option", "image_sizes=[8]",
    "--task-option", "depth=1",
    "--task-option", "width=16",
    "--task-option", "batch_size=32",
    "--num-tasks", "2",
    "--truncation-length", "3",
    "--trajectory-length", "20",
    "--min-trajectory-length", "5",
    "--log-every", "1",
    "--num-estimators", "1",
    "--resample-every", "0",
    "--no-progress",
]  # fmt: skip


# ------------------------------------------------------------------------------------ helpers
def ray_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    return env


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (Ray workers change their group, not their session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp sid
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` and wait until they are gone."""
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.1)


def start(cmd: list[str], log: Path, **kw) -> subprocess.Popen:
    """A process in its own session, output to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=ray_env(), **kw
        )


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def metric_lines(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]


def latest_ckpt_step(run: Path) -> int:
    pointer = run / "checkpoints" / "latest"
    return int(pointer.read_text()[5:13]) if pointer.exists() else 0


def metatrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "metatrain", *args]


# ------------------------------------------------------------------------------------ tests
@pytest.mark.timeout(180)
def test_cli_quick_with_two_workers_on_embedded_ray_leaves_no_process(tmp_path):
    run = tmp_path / "run"
    cmd = metatrain_cmd("--task-family", "mlp_mnist", "--quick", "--workers", "2")
    cmd += ["--outer-steps", "3", "--out-dir", str(run), "--no-progress"]
    proc = start(cmd, tmp_path / "log")
    try:
        assert proc.wait(timeout=150) == 0, (tmp_path / "log").read_text()[-3000:]
        assert "final θ:" in (tmp_path / "log").read_text()
        assert [x["gradients"] for x in metric_lines(run)] == [2, 2, 2]
        wait_for(lambda: not session_pids(proc.pid), 20, "the embedded Ray to exit with the run")
    finally:
        kill_session(proc.pid)


@pytest.mark.timeout(60)
def test_unreachable_address_fails_fast_with_a_clear_error(tmp_path):
    port = free_port()  # nobody listens there
    cmd = metatrain_cmd(*TINY_ARGS, "--workers", "1", "--address", f"127.0.0.1:{port}")
    proc = subprocess.run(
        cmd + ["--out-dir", str(tmp_path / "r")], capture_output=True, text=True, timeout=50,
        env=ray_env(),
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"cannot reach a Ray cluster at 127.0.0.1:{port}" in proc.stderr
    assert "ray start --head" in proc.stderr


@pytest.mark.timeout(300)
def test_driver_sigkill_then_resume_loses_at_most_one_checkpoint_interval(tmp_path):
    run, every, steps = tmp_path / "run", 5, 30
    # 10 inner steps per outer step: slow enough that the kill lands well before the end
    args = [*TINY_ARGS, "--workers", "2", "--outer-steps", str(steps), "--truncation-length", "10"]
    args += ["--checkpoint-every", str(every), "--out-dir", str(run)]
    driver = start(metatrain_cmd(*args), tmp_path / "driver.log")
    resumed = None
    try:
        wait_for(lambda: latest_ckpt_step(run) >= every, 150, "a checkpoint", driver)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=10)
        done, ckpt = len(metric_lines(run)), latest_ckpt_step(run)
        assert done < steps, "the driver finished before it was killed"
        assert done - ckpt <= every
        kill_session(driver.pid)  # the embedded Ray's agents outlive a SIGKILLed driver briefly
        resumed = start(metatrain_cmd("--resume", str(run)), tmp_path / "resume.log")
        assert resumed.wait(timeout=150) == 0, (tmp_path / "resume.log").read_text()[-3000:]
        assert f"at outer step {ckpt}" in (tmp_path / "resume.log").read_text()
        assert [x["step"] for x in metric_lines(run)] == list(range(steps))
        # and nothing was lost beyond those steps: an in-process serial run gives the same θ
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the actors
        try:
            cfg = config_from_args(build_parser().parse_args(args))
            cfg.executor, cfg.out_dir = "serial", str(tmp_path / "serial")
            reference = train(cfg).theta
        finally:
            torch.set_num_threads(before)
        theta, _ = lopt.load_theta(run / "theta.safetensors")
        assert all(torch.equal(theta[k], reference[k]) for k in reference)
    finally:
        kill_session(driver.pid)
        if resumed is not None:
            kill_session(resumed.pid)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_start(
    tmp: Path, name: str, *args: str, env: dict[str, str], cpus: int = 2
) -> subprocess.Popen:
    """``ray start --block`` for one node; fixed-default ports are moved off their defaults so
    another Ray on this machine (a colleague's, CI's) cannot collide with this one."""
    with open(tmp / f"{name}.log", "w") as out:
        return subprocess.Popen(
            [RAY_CLI, "start", "--block", "--disable-usage-stats", f"--num-cpus={cpus}",
             f"--temp-dir={tmp / name}", f"--dashboard-agent-listen-port={free_port()}", *args],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )  # fmt: skip


def alive_nodes(address: str) -> int:
    status = subprocess.run(
        [RAY_CLI, "status", f"--address={address}"], capture_output=True, text=True, timeout=30,
        env=ray_env(),
    )  # fmt: skip
    active = status.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if "node_" in line)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def wait_lines(run: Path, predicate, count: int, timeout_s: float, what: str, proc):
    """Wait until ``count`` metric lines after the first one matching ``predicate``; returns
    that line's index."""

    def ready():
        lines = metric_lines(run)
        first = next((i for i, x in enumerate(lines) if predicate(i, x)), None)
        return None if first is None or len(lines) - first < count else (first,)

    return wait_for(ready, timeout_s, what, proc)[0]


@pytest.mark.timeout(400)
def test_node_lost_without_spare_cpus_then_a_node_returns(tmp_path):
    # Head and worker node have one CPU each: when the node dies its worker cannot be restarted
    # anywhere until a node joins. The run must go on at the live worker's speed meanwhile, say
    # so in workers_live, and use the worker again once a new node takes its restarted actor.
    tmp = Path(tempfile.mkdtemp(prefix="lzr", dir="/tmp"))  # Ray's socket paths are short
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = ray_env() | {  # the cluster's own failure detector, tightened to seconds
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }
    run, phase = tmp_path / "run", 20  # outer steps measured per phase
    procs: list[subprocess.Popen] = []
    try:
        head = ray_start(tmp, "head", "--head", f"--port={port}", "--include-dashboard=false",
                         f"--dashboard-port={free_port()}",
                         f"--ray-client-server-port={free_port()}", env=env, cpus=1)  # fmt: skip
        procs.append(head)
        wait_for(lambda: alive_nodes(address) == 1, 90, "the head node", head)
        node = ray_start(tmp, "node", f"--address={address}", env=env, cpus=1)
        procs.append(node)
        wait_for(lambda: alive_nodes(address) == 2, 90, "the second node", node)
        cmd = metatrain_cmd(*TINY_ARGS, "--workers", "2", "--address", address)
        cmd += ["--truncation-length", "10", "--outer-steps", "1000000"]
        cmd += ["--checkpoint-every", "0", "--out-dir", str(run)]
        driver = start(cmd, tmp_path / "driver.log")
        procs.append(driver)
        wait_for(lambda: len(metric_lines(run)) >= phase + 5, 150, "healthy steps", driver)
        placement = [
            x for x in (tmp_path / "driver.log").read_text().splitlines() if " on node " in x
        ]
        assert len({line.split(" on node ")[1].split(",")[0] for line in placement}) == 2, placement

        killed_at = time.monotonic()
        kill_session(node.pid)  # the node's raylet, object store, agents and worker processes

        def after_loss(i, x):
            return x["workers_live"] == 1

        lost = wait_lines(run, after_loss, 1, 120, "the loss in the metrics", driver)
        detected_s = time.monotonic() - killed_at  # an upper bound: includes the 0.2 s polling
        wait_lines(run, after_loss, phase + 1, 120, "steps after the loss", driver)
        spare = ray_start(tmp, "spare", f"--address={address}", env=env, cpus=1)
        procs.append(spare)
        back = wait_lines(
            run, lambda i, x: i > lost and x["workers_live"] == 2, phase, 180, "the worker back",
            driver,
        )  # fmt: skip
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=60) == 128 + signal.SIGTERM, (
            tmp_path / "driver.log"
        ).read_text()[-3000:]
        lines = metric_lines(run)
        assert [x["step"] for x in lines] == list(range(len(lines)))
        assert latest_ckpt_step(run) == len(lines), "SIGTERM must leave a checkpoint"
        assert all(x["gradients"] == x["workers_live"] for x in lines), "workers_live must be true"
        during = lines[lost + 1 : back]
        assert during and all(x["workers_live"] == 1 for x in during)
        assert all(x["workers_live"] == 2 for x in lines[back:])
        healthy_s = median([x["outer_step_s"] for x in lines[5:lost]])
        during_s = median([x["outer_step_s"] for x in during])
        after_s = median([x["outer_step_s"] for x in lines[back + 2 :]])
        print(
            f"\nnode loss: healthy {healthy_s * 1e3:.0f} ms/step (2 workers), during "
            f"{during_s * 1e3:.0f} ms/step (1 live worker, {len(during)} steps), after "
            f"{after_s * 1e3:.0f} ms/step (2 workers); loss seen in the metrics within "
            f"{detected_s:.1f} s; worst step {max(x['outer_step_s'] for x in lines):.2f} s"
        )
        # Each live worker computes its own estimators as before: a step costs what it cost.
        assert during_s <= 1.5 * healthy_s, (healthy_s, during_s)
        assert after_s <= 1.5 * healthy_s, (healthy_s, after_s)
        assert detected_s < 10, detected_s
        ckpt = torch.load(sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True)
        assert torch.isfinite(ckpt["learner"]["theta"]).all()
    finally:
        for proc in reversed(procs):
            kill_session(proc.pid)
        shutil.rmtree(tmp, ignore_errors=True)
