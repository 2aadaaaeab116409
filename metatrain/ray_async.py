"""Asynchronous mode of the Ray executor: workers never wait for the learner.

Design: docs/design/meta_training.md §7.

Every live actor always has one ``compute`` in flight. When one returns, its actor is at once
handed the newest θ the learner has published (so workers keep computing while the learner
updates) and its result is buffered if it is valid: computed at step s with
``0 <= current - s <= --staleness``. Stale gradients are dropped on arrival and the buffer is
re-filtered after every θ update. The learner blocks until a batch of valid gradients (as many
as there are live workers; a fast worker may contribute two) is buffered. The buffer holds at
most ``BUFFER_BATCHES`` batches; beyond that new gradients are dropped rather than blocking
workers. Buffered and in-flight gradients are not checkpointed: a resumed run starts afresh.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import ray

from .worker import WorkerResult

if TYPE_CHECKING:
    from .ray_executor import RayExecutor

BUFFER_BATCHES = 5
RETRY_PAUSE_S = 1.0  # how often down workers are pinged while waiting for results


class AsyncPipeline:
    def __init__(self, executor: RayExecutor) -> None:
        self.ex = executor
        self.pending: dict[ray.ObjectRef, tuple[int, float]] = {}  # ref → (worker, submitted)
        self.buffer: list[WorkerResult] = []
        self.theta_ref: ray.ObjectRef | None = None
        self.theta_step = -1

    def _submit(self, worker: int) -> None:
        ref = self.ex.actors[worker].compute.remote(self.theta_ref, self.theta_step)
        self.pending[ref] = (worker, time.monotonic())

    def _feed_idle(self) -> None:
        busy = {w for w, _ in self.pending.values()}
        for w in self.ex.live:
            if w not in busy:
                self._submit(w)

    def _restart_late(self, step: int) -> None:
        limit, now = self.ex.cfg.worker_timeout, time.monotonic()
        for ref, (w, t0) in list(self.pending.items()):
            if limit and now - t0 > limit:
                del self.pending[ref]
                self.ex.restart(w, step, now - t0)

    def _wait_timeout(self) -> float | None:
        """Until the oldest in-flight step times out, or the next ping of a down worker."""
        now, limit = time.monotonic(), self.ex.cfg.worker_timeout
        waits = [t0 + limit - now for _, t0 in self.pending.values()] if limit else []
        if self.ex.down:
            waits.append(RETRY_PAUSE_S)
        return max(0.05, min(waits)) if waits else None

    def gradients(
        self, theta_ref: ray.ObjectRef, step: int
    ) -> tuple[list[WorkerResult], dict[str, float]]:
        self.theta_ref, self.theta_step = theta_ref, step
        bound = self.ex.cfg.staleness
        kept = [r for r in self.buffer if step - r.step <= bound]
        dropped = len(self.buffer) - len(kept)
        self.buffer = kept
        window = max(self.ex.cfg.worker_timeout, 60.0)
        last_ok = time.monotonic()
        # a batch is one gradient per live worker; with every worker down, the first to return
        while len(self.buffer) < max(1, len(self.ex.live)):
            self.ex.poll_down(step)
            self._feed_idle()
            if time.monotonic() - last_ok > window:
                raise RuntimeError(
                    f"step {step}: no Ray worker returned a gradient for {window:g} s; check "
                    "the cluster (`ray status`) and continue with --resume RUN_DIR"
                )
            if not self.pending:
                self.ex.poll_down(step, wait_s=RETRY_PAUSE_S)
                continue
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=self._wait_timeout())
            if not ready:
                self._restart_late(step)
                continue
            worker, _ = self.pending.pop(ready[0])
            result = self.ex.fetch(worker, ready[0], step)
            if result is None:
                continue  # the worker is down now; poll_down brings it back
            last_ok = time.monotonic()
            self._submit(worker)  # keep it busy, with the newest θ
            age = step - result.step
            if 0 <= age <= bound and len(self.buffer) < BUFFER_BATCHES * max(1, len(self.ex.live)):
                self.buffer.append(result)
            else:
                dropped += 1
        batch = max(1, len(self.ex.live))
        out, self.buffer = self.buffer[:batch], self.buffer[batch:]
        ages = [step - r.step for r in out]
        return out, {
            "staleness_mean": sum(ages) / len(ages),
            "staleness_max": float(max(ages)),
            "dropped_gradients": float(dropped),
        }
