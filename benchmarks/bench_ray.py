"""Outer steps/s of meta-training on 1 vs 2 Ray workers, and what Ray costs per outer step.

    python benchmarks/bench_ray.py [--steps 40] [--rounds 3] [--pairs 8] [--truncation 10]

Every configuration does the same work per outer step: two PES estimators of ``--pairs``
antithetic pairs, ``--truncation`` inner steps each, on one fixed 8×8 MNIST MLP (fixed width and
batch so that every estimator's task costs the same). Only where the estimators run changes:

* serial, 1 worker × 2 estimators, 1 or 2 torch threads (in-process, no Ray);
* Ray, 1 actor × 2 estimators, 1 thread;
* Ray, 2 actors × 1 estimator, 1 thread each (sync mode).

A step is ``executor.gradients`` + the outer Adam update, as in the trainer (logging excluded).
Each configuration is timed ``--rounds`` times, interleaved, and the best round is kept: other
processes on the machine only ever slow a round down. Also reported: a Ray round trip with no
work (``ray.put`` θ, one actor call, the result back) and gathering both workers' checkpoint
state. All numbers come from one machine; the machine's load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import time

import ray
import torch

import lopt
from metatrain import MetaTrainConfig
from metatrain.executors import SerialExecutor
from metatrain.learner import OuterLearner
from metatrain.ray_executor import RayExecutor
from metatrain.ray_runtime import connect
from metatrain.worker import WorkerResult


@ray.remote(num_cpus=1)
class Echo:
    """Returns a zero gradient of θ's size at once: what a worker costs Ray, without the work."""

    def compute(self, theta: torch.Tensor, step: int) -> WorkerResult:
        return WorkerResult(torch.zeros_like(theta), step, 0, {"meta_loss": 0.0})


def config(args, workers: int, estimators: int, executor: str, threads: int) -> MetaTrainConfig:
    return MetaTrainConfig(
        task_family="mlp_mnist",
        task_option={"image_sizes": [8], "depth": 1, "width": args.width, "batch_size": 128},
        num_tasks=args.pairs,
        num_estimators=estimators,
        truncation_length=args.truncation,
        trajectory_length=300,
        min_trajectory_length=50,
        workers=workers,
        executor=executor,
        threads=threads,
        progress=False,
    ).validate()


def steps_per_s(executor, steps: int, warmup: int) -> float:
    lc = lopt.preset("original")
    theta = lopt.flatten_theta(lopt.init_theta(lc, torch.Generator().manual_seed(0)), lc)
    learner = OuterLearner(theta, 1e-3)
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        results = executor.gradients(learner.theta, step)
        learner.apply([r.grad for r in results])
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed outer steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many rounds")
    parser.add_argument("--pairs", type=int, default=8, help="antithetic pairs per estimator")
    parser.add_argument("--truncation", type=int, default=10, help="inner steps per outer step")
    parser.add_argument("--width", type=int, default=32, help="hidden width of the MNIST MLP")
    args = parser.parse_args()
    load_before = os.getloadavg()
    runtime = connect(None, num_cpus=2)  # one embedded Ray, shared by every Ray executor below
    rows = {
        "serial, 1 worker × 2 estimators, 1 thread": (1, 2, "serial", 1),
        "serial, 1 worker × 2 estimators, 2 threads": (1, 2, "serial", 2),
        "Ray sync, 1 actor × 2 estimators, 1 thread": (1, 2, "ray", 1),
        "Ray sync, 2 actors × 1 estimator, 1 thread each": (2, 1, "ray", 1),
    }
    best = dict.fromkeys(rows, 0.0)
    try:
        for _ in range(args.rounds):
            for name, (workers, estimators, kind, threads) in rows.items():
                cfg = config(args, workers, estimators, kind, threads)
                torch.set_num_threads(threads)
                ex = RayExecutor(cfg) if kind == "ray" else SerialExecutor(cfg, workers)
                try:
                    best[name] = max(best[name], steps_per_s(ex, args.steps, args.warmup))
                finally:
                    ex.close()
        torch.set_num_threads(1)
        ex = RayExecutor(config(args, 2, 1, "ray", 1))
        steps_per_s(ex, args.steps, args.warmup)  # lanes mid-trajectory, as in a real run
        t0 = time.perf_counter()
        ex.state_dict()
        gather_ms = 1e3 * (time.perf_counter() - t0)
        ex.close()
        echo, lc = Echo.remote(), lopt.ORIGINAL
        theta = torch.zeros(lopt.flatten_theta(lopt.init_theta(lc, torch.Generator()), lc).numel())
        ray.get(echo.compute.remote(ray.put(theta), 0))
        t0 = time.perf_counter()
        for step in range(200):
            ray.get(echo.compute.remote(ray.put(theta), step))
        echo_ms = 1e3 * (time.perf_counter() - t0) / 200
    finally:
        runtime.close()
    one_ray = best["Ray sync, 1 actor × 2 estimators, 1 thread"]
    print(
        f"\nper outer step: 2 estimators × {args.pairs} pairs × {args.truncation} inner steps, "
        f"8×8 MNIST MLP width {args.width}; best of {args.rounds} rounds × {args.steps} steps"
    )
    print(
        f"load average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} cores\n"
    )
    print("| configuration | outer steps/s | ms / step | vs Ray 1 actor |")
    print("|---|---:|---:|---:|")
    for name, value in best.items():
        print(f"| {name} | {value:.2f} | {1e3 / value:.1f} | {value / one_ray:.2f}× |")
    serial_one = best["serial, 1 worker × 2 estimators, 1 thread"]
    print(
        f"\nRay overhead per outer step (Ray 1 actor − serial 1 thread): "
        f"{1e3 / one_ray - 1e3 / serial_one:.1f} ms"
    )
    print(f"Ray round trip with no work (ray.put θ, 1 actor call, result back): {echo_ms:.2f} ms")
    print(f"checkpoint gather of 2 worker states (ray.get): {gather_ms:.1f} ms")


if __name__ == "__main__":
    main()
