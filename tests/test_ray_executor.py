"""The Ray executor on a real embedded Ray (the session's ``ray_session``): sync runs equal serial
runs bit for bit, checkpoints move between the two, a worker killed mid-step is survived, and
async mode never uses a gradient older than the staleness bound."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import pytest
import torch

from metatrain import MetaTrainConfig, train
from metatrain.executors import SerialExecutor, make_executor
from metatrain.ray_executor import RayExecutor
from tests.tiny_runs import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

TIMING = ("inner_steps_per_s", "outer_step_s")
RAY_ONLY = ("gradients", "worker_failures", "workers_live")


def tiny(out_dir, **overrides) -> MetaTrainConfig:
    settings = dict(trajectory_length=20, min_trajectory_length=5, workers=2)
    return tiny_config(out_dir, **{**settings, **overrides})


def metric_lines(run_dir, drop=TIMING + RAY_ONLY) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in lines]


@pytest.fixture
def one_thread():
    """Ray actors run torch with 1 thread; give in-process runs the same so bits can match."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def serial_reference(tmp_path_factory):
    """Two in-process workers, 6 steps: what every sync Ray run below must reproduce exactly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny(tmp_path_factory.mktemp("serial") / "run", executor="serial")
        assert isinstance(make_executor(cfg), SerialExecutor)
        return train(cfg)
    finally:
        torch.set_num_threads(before)


def assert_same_run(a, b) -> None:
    for k in a.theta:
        assert torch.equal(a.theta[k], b.theta[k]), k
    assert metric_lines(a.run_dir) == metric_lines(b.run_dir)


def test_sync_ray_run_equals_serial_run_bit_for_bit(
    ray_session, serial_reference, tmp_path, one_thread
):
    # Stronger than Ray-vs-Ray: the seeds depend only on (run seed, step, worker, estimator) and
    # results are averaged in worker-id order, so the process a worker runs in must not matter.
    cfg = tiny(tmp_path / "run")
    executor = make_executor(cfg)
    assert isinstance(executor, RayExecutor)
    assert {i["pid"] for i in executor.worker_info()}.isdisjoint({os.getpid()})
    result = train(cfg, executor=executor)
    assert_same_run(serial_reference, result)
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(x["gradients"] == 2 and x["worker_failures"] == 0 for x in lines)
    assert ray_session.is_initialized(), "an executor must not shut down a Ray it did not start"


@pytest.mark.parametrize("first_leg", ["ray", "serial"])
def test_ray_resume_is_bit_identical(
    ray_session, serial_reference, tmp_path, first_leg, one_thread
):
    # Checkpoints hold every worker's lanes and PES state, gathered from the actors, in the same
    # layout as the serial executor's: a run can stop on one and continue on the other.
    train(tiny(tmp_path / "run", outer_steps=3, executor=first_leg))
    resumed = train(tiny(tmp_path / "run", executor="ray"), resume=True)
    assert_same_run(serial_reference, resumed)


class KillWorkerDuringStep(RayExecutor):
    """A real Ray executor whose worker 0 process gets SIGKILLed while step ``at`` computes.

    After the kill every step is paced to take at least ``pace_s`` on the driver: an actor
    restart takes seconds while the fast lane path makes a tiny step take ~0.1 s, so without a
    floor the run could end before the restarted worker is back, whatever the machine's load.
    """

    def __init__(self, cfg: MetaTrainConfig, at: int, delay_s: float, pace_s: float = 0.75):
        super().__init__(cfg)
        self.at, self.delay_s, self.pace_s = at, delay_s, pace_s

    def gradients(self, theta, step):
        if step == self.at:
            pid = self.worker_info()[0]["pid"]
            threading.Timer(self.delay_s, os.kill, (pid, signal.SIGKILL)).start()
        started = time.monotonic()
        result = super().gradients(theta, step)
        if step > self.at:
            time.sleep(max(0.0, self.pace_s - (time.monotonic() - started)))
        return result


def run_with_worker_0_killed_at_step_3(tmp_path, caplog, **overrides):
    """A run whose worker 0 is killed mid-step 3; its result and per-step metrics."""
    # 100 inner steps (0.3-1 s of work) per outer step: a kill 0.05 s in lands mid-computation.
    cfg = tiny(
        tmp_path / "run",
        truncation_length=100,
        trajectory_length=400,
        min_trajectory_length=100,
        **overrides,
    )
    executor = KillWorkerDuringStep(cfg, at=3, delay_s=0.05)
    with caplog.at_level(logging.WARNING, logger="lozoo.metatrain.ray"):
        result = train(cfg, executor=executor)
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, lines


def test_worker_killed_mid_step_is_restarted_and_the_run_continues(ray_session, tmp_path, caplog):
    result, lines = run_with_worker_0_killed_at_step_3(
        tmp_path, caplog, outer_steps=16, checkpoint_every=4
    )
    assert [x["step"] for x in lines] == list(range(16))
    by_step = {x["step"]: (x["gradients"], x["worker_failures"]) for x in lines}
    assert by_step[3] == (1, 1), "the killed worker's in-flight result must be dropped"
    # While its actor restarts the run goes on with the live worker, and says so; then it is back.
    assert all(x["gradients"] == x["workers_live"] for x in lines)
    back = next(s for s in range(4, 16) if by_step[s][0] == 2)
    assert all(by_step[s] == (1, 0) for s in range(4, back))
    assert all(by_step[s] == (2, 0) for s in range(back, 16)), "the actor must come back"
    assert "Ray worker 0 failed; result dropped" in caplog.text
    assert "Ray worker 0 is back" in caplog.text
    assert all(torch.isfinite(v).all() for v in result.theta.values())


@pytest.mark.slow
def test_async_mode_goes_on_while_a_killed_worker_is_down(ray_session, tmp_path, caplog):
    # The async pipeline must not wait for a down worker either, and must take it back.
    result, lines = run_with_worker_0_killed_at_step_3(
        tmp_path,
        caplog,
        mode="async",
        outer_steps=40,  # one live worker does ~0.3 s steps; its peer restarts in seconds
        checkpoint_every=0,
    )
    assert [x["step"] for x in lines] == list(range(40))
    assert any(x["workers_live"] == 1 for x in lines), "the down worker must leave workers_live"
    assert all(x["gradients"] == x["workers_live"] for x in lines)
    assert lines[-1]["workers_live"] == 2 and "Ray worker 0 is back" in caplog.text
    assert all(torch.isfinite(v).all() for v in result.theta.values())


@pytest.mark.parametrize("staleness", [0, 2])
def test_async_mode_never_uses_a_gradient_staler_than_the_bound(ray_session, tmp_path, staleness):
    cfg = tiny(tmp_path / "run", mode="async", staleness=staleness, outer_steps=25)
    result = train(cfg)
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(25))
    assert max(x["staleness_max"] for x in lines) <= staleness
    assert all(x["gradients"] == 2 for x in lines)
    if staleness:
        # workers keep computing while θ updates, so most gradients arrive one step old
        assert sum(x["staleness_mean"] for x in lines) / len(lines) > 0.2
    else:
        assert sum(x["dropped_gradients"] for x in lines) > 0
    assert all(torch.isfinite(v).all() for v in result.theta.values())
