"""Ray executor: each worker is an actor that owns its estimators and their PES lane states.

Per outer step the learner ``ray.put``s θ once and sends each actor ``(θ ref, step)``; the actor
re-creates its perturbations from seeds (``Worker.compute``) and returns a ``WorkerResult``
(ĝ, step, worker id, metrics). No noise tensor ever crosses the wire
(docs/design/meta_training.md §7).

* **sync** (default): one gradient per live worker per step, returned in worker-id order, so a
  fault-free run equals ``SerialExecutor(cfg, N)`` bit for bit (the seeds depend only on the run
  seed, the step, the worker id and the estimator).
* **async**: see ``ray_async.py``.

Faults. Actors are created with ``max_restarts=--worker-restarts`` and ``max_task_retries=0``:
Ray restarts a crashed actor (on another node if its node is gone, ``SPREAD`` placement), but
never silently re-runs a step. A restarted actor re-runs ``__init__``, i.e. rebuilds its worker
fresh from the run seed: its lanes and PES accumulators are lost, as in the reference, where
worker states are never checkpointed.

A worker whose call fails (process or node gone) or that exceeds ``--worker-timeout`` is *down*:
its in-flight result is dropped, it leaves ``live`` (so ``workers_live`` counts only workers that
are computing), and no step is sent to it or waits for it. Its estimators are dropped, not
re-placed: each step averages the live workers' gradients, so a step costs what one live worker's
estimators cost, as before the loss. One cheap ``ping`` stays in flight to a down actor; when it
answers (Ray restarted the actor, on a surviving node with a free CPU or on a node that joined)
the worker is live again from the next step. If every worker is down the step waits for the first
to return. An actor out of restarts leaves the run for good; the run fails (resumable) only when
none is left, or when no worker has answered for ``max(--worker-timeout, 60)`` seconds.

Checkpoints gather every actor's state (``ray.get`` at checkpoint steps only) in the same layout
as ``SerialExecutor``; an actor that cannot answer is stored as ``None`` and restarts fresh.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import ray
import torch
from ray.exceptions import (
    ActorDiedError,
    GetTimeoutError,
    ObjectLostError,
    OutOfMemoryError,
    RayActorError,
    WorkerCrashedError,
)

from .config import MetaTrainConfig
from .executors import checkpoint_workers
from .ray_runtime import connect
from .worker import Worker, WorkerResult

log = logging.getLogger("lozoo.metatrain.ray")

# A worker process or node went away (not a bug in the worker's code, which propagates).
FAULTS = (RayActorError, WorkerCrashedError, OutOfMemoryError, ObjectLostError, GetTimeoutError)
RETRY_PAUSE_S = 1.0  # between pings of a down worker whose last ping failed


@ray.remote
class WorkerActor:
    """One ``Worker`` in its own process; Ray re-runs ``__init__`` when it restarts the actor."""

    def __init__(self, cfg: dict[str, Any], worker_id: int, threads: int) -> None:
        torch.set_num_threads(threads)  # several actors share a machine's cores
        self.worker = Worker(MetaTrainConfig.from_dict(cfg), worker_id)

    def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {
            "worker_id": self.worker.worker_id,
            "pid": os.getpid(),
            "node_id": ctx.get_node_id(),
            "threads": torch.get_num_threads(),
            "task_configs": self.worker.task_configs(),
        }

    def ping(self) -> dict[str, Any]:
        """Where this actor runs now; answered once a restarted actor is back."""
        ctx = ray.get_runtime_context()
        return {
            "worker_id": self.worker.worker_id,
            "pid": os.getpid(),
            "node_id": ctx.get_node_id(),
        }

    def compute(self, theta: torch.Tensor, step: int) -> WorkerResult:
        return self.worker.compute(theta, step)

    def state_dict(self) -> dict[str, Any]:
        return self.worker.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.worker.load_state_dict(state)


def actor_threads(cfg: MetaTrainConfig) -> int:
    """torch threads per actor: ``--threads``, else 1 (workers, not threads, use the cores)."""
    return cfg.threads if cfg.threads > 0 else 1


class RayExecutor:
    """``cfg.workers`` Ray actors behind the ``Executor`` seam (sync or async per ``cfg.mode``)."""

    def __init__(self, cfg: MetaTrainConfig, num_workers: int | None = None) -> None:
        self.cfg = cfg
        self.num_workers = num_workers or max(1, cfg.workers)
        self._step_failures = 0
        self.threads = actor_threads(cfg)
        need = self.num_workers * self.threads
        self.runtime = connect(cfg.address, num_cpus=max(os.cpu_count() or 1, need))
        try:
            self._start(need)
        except BaseException:
            self.runtime.close()
            raise
        self.asynchronous = cfg.mode == "async"
        self._async = None
        if self.asynchronous:
            from .ray_async import AsyncPipeline

            self._async = AsyncPipeline(self)
        self._metrics: dict[str, float] = {}

    # -- actors ---------------------------------------------------------------------------------
    def _start(self, need: int) -> None:
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < need:
            raise ValueError(
                f"the Ray cluster has {cpus:g} CPUs but --workers {self.num_workers} with "
                f"{self.threads} thread(s) each needs {need}; lower --workers or add nodes"
            )
        actor = WorkerActor.options(
            num_cpus=self.threads,
            max_restarts=self.cfg.worker_restarts,
            max_task_retries=0,  # a crashed step is dropped, never recomputed behind our back
            scheduling_strategy="SPREAD",  # one node going down takes as few workers as possible
        )
        cfg = self.cfg.to_dict()
        self.actors = [actor.remote(cfg, i, self.threads) for i in range(self.num_workers)]
        self.live = list(range(self.num_workers))
        self.down: dict[int, ray.ObjectRef | None] = {}  # worker -> ping in flight (None: due)
        self._ping_due: dict[int, float] = {}
        self.failures = 0  # every dropped result or restart, over the run
        timeout = self.cfg.worker_timeout or None
        refs = [a.info.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if len(ready) < len(refs):
            raise ValueError(
                f"{len(refs) - len(ready)} of {len(refs)} Ray workers did not start within "
                f"{timeout:g} s (--worker-timeout); the cluster may lack free CPUs (`ray status`)"
            )
        self.infos = ray.get(refs)  # a worker that fails to build raises here, with its traceback
        for info in self.infos:
            log.info(
                "Ray worker %d: pid %d on node %s, %d thread(s)",
                info["worker_id"],
                info["pid"],
                info["node_id"][:12],
                info["threads"],
            )

    def worker_info(self) -> list[dict[str, Any]]:
        """Per worker: id, pid, node id and threads, as of startup (a restart changes the pid)."""
        return [{k: v for k, v in i.items() if k != "task_configs"} for i in self.infos]

    def task_configs(self) -> list[dict[str, Any]]:
        return [c for info in self.infos for c in info["task_configs"]]

    def fault(self, worker: int, step: int, err: BaseException | str) -> None:
        """Log a worker fault and take the worker out of ``live``: down until its actor answers
        a ping again, or gone for good once it is out of restarts."""
        self.failures += 1
        self._step_failures += 1
        reason = err if isinstance(err, str) else f"{type(err).__name__}: {str(err)[:200]}"
        if worker in self.live:
            self.live.remove(worker)
        if isinstance(err, ActorDiedError):
            self.down.pop(worker, None)
            self._ping_due.pop(worker, None)
            log.error(
                "step %d: Ray worker %d is dead for good (--worker-restarts %d exhausted or "
                "unrecoverable): %s; continuing with %d worker(s)",
                step,
                worker,
                self.cfg.worker_restarts,
                reason,
                len(self.live),
            )
            if not self.live and not self.down:
                raise RuntimeError(
                    f"step {step}: every Ray worker is dead ({self.failures} faults); fix the "
                    "cluster (`ray status`) and continue with --resume RUN_DIR"
                )
            return
        if worker not in self.down:
            self.down[worker] = None
            self._ping_due[worker] = time.monotonic()
        log.warning(
            "step %d: Ray worker %d failed; result dropped, continuing with %d live worker(s) "
            "until it is back: %s",
            step,
            worker,
            len(self.live),
            reason,
        )

    def restart(self, worker: int, step: int, waited: float) -> None:
        """A worker over ``--worker-timeout``: drop its result and restart its actor."""
        self.fault(worker, step, f"no result after {waited:.0f} s (--worker-timeout); restarting")
        ray.kill(self.actors[worker], no_restart=False)

    def poll_down(self, step: int, wait_s: float = 0.0) -> None:
        """Ping down workers (at most once per ``RETRY_PAUSE_S`` each); a worker whose actor
        answers is live again. Waits up to ``wait_s`` for one to answer."""
        now = time.monotonic()
        for w, ref in list(self.down.items()):
            if ref is None and self._ping_due.get(w, 0.0) <= now:
                self.down[w] = self.actors[w].ping.remote()
        pings = {ref: w for w, ref in self.down.items() if ref is not None}
        if not pings:
            if wait_s > 0:
                time.sleep(min(wait_s, RETRY_PAUSE_S))
            return
        if wait_s > 0:
            ray.wait(list(pings), num_returns=1, timeout=wait_s)
        ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=0)
        for ref in ready:
            w = pings[ref]
            try:
                where = ray.get(ref)
            except ActorDiedError as err:
                self.fault(w, step, err)
                continue
            except FAULTS:
                self.down[w] = None  # still down: ping again after a pause
                self._ping_due[w] = time.monotonic() + RETRY_PAUSE_S
                continue
            del self.down[w]
            self._ping_due.pop(w, None)
            self.live = sorted([*self.live, w])
            self.infos[w] = {**self.infos[w], **where}
            log.warning(
                "step %d: Ray worker %d is back (pid %d on node %s, rebuilt fresh); %d live",
                step,
                w,
                where["pid"],
                where["node_id"][:12],
                len(self.live),
            )

    def fetch(self, worker: int, ref: ray.ObjectRef, step: int) -> WorkerResult | None:
        """The result behind a ready ``ref``, or ``None`` after logging a fault."""
        try:
            return ray.get(ref)
        except FAULTS as err:
            self.fault(worker, step, err)
            return None

    # -- the Executor seam ------------------------------------------------------------------------
    def gradients(self, theta: torch.Tensor, step: int) -> list[WorkerResult]:
        self._step_failures = 0
        theta_ref = ray.put(theta.detach())  # broadcast once; every actor reads the same object
        if self._async is not None:
            results, extra = self._async.gradients(theta_ref, step)
        else:
            results, extra = self._sync_gradients(theta_ref, step), {}
        self._metrics = {
            "gradients": float(len(results)),
            "worker_failures": float(self._step_failures),
            "workers_live": float(len(self.live)),
            **extra,
        }
        return results

    def _sync_gradients(self, theta_ref: ray.ObjectRef, step: int) -> list[WorkerResult]:
        timeout = self.cfg.worker_timeout or None
        window = max(self.cfg.worker_timeout, 60.0)
        give_up = time.monotonic() + window
        while True:
            self.poll_down(step)
            if not self.live:  # every worker down: wait for the first to come back
                if time.monotonic() > give_up:
                    raise RuntimeError(
                        f"step {step}: no Ray worker returned a gradient for {window:g} s; check "
                        "the cluster (`ray status`) and continue with --resume RUN_DIR"
                    )
                self.poll_down(step, wait_s=RETRY_PAUSE_S)
                continue
            refs = {self.actors[i].compute.remote(theta_ref, step): i for i in self.live}
            t0 = time.monotonic()
            ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
            for ref in late:
                self.restart(refs[ref], step, time.monotonic() - t0)
            got = {refs[r]: self.fetch(refs[r], r, step) for r in ready}
            results = [got[i] for i in sorted(got) if got[i] is not None]  # worker-id order
            if results:
                return results
            log.warning("step %d: every live worker failed; retrying once one is back", step)

    def step_metrics(self) -> dict[str, float]:
        """Executor health for the last step, merged into the trainer's metrics."""
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        refs = [
            a.state_dict.remote() if i in self.live else None for i, a in enumerate(self.actors)
        ]
        states: list[dict[str, Any] | None] = []
        for i, ref in enumerate(refs):
            state = None
            if ref is not None:
                try:
                    state = ray.get(ref, timeout=self.cfg.worker_timeout or None)
                except FAULTS as err:
                    log.warning("checkpoint: worker %d did not answer (%s); saved as fresh", i, err)
            states.append(state)
        return {"workers": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = checkpoint_workers(state, self.num_workers)
        refs = [
            actor.load_state_dict.remote(ws)
            for actor, ws in zip(self.actors, states)
            if ws is not None
        ]
        ray.get(refs)

    def close(self) -> None:
        if ray.is_initialized():  # the owner of a shared Ray may have shut it down already
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
        self.runtime.close()
