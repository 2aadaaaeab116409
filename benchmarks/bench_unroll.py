"""Inner steps/s of the vectorised unroll vs a per-lane Python loop, and where the time goes.

    python benchmarks/bench_unroll.py [--pairs 8] [--slots 50] [--threads 2]

All numbers come from one run on one machine; compare the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import time

import torch

import lopt
import tasks
from metatrain.schedules import Constant
from metatrain.unroll import TaskLanes, VectorizedUnroll


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--slots", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--lopt", default="original")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    family = tasks.get_family(
        "mlp_mnist", image_sizes=args.image_size, depth=1, width=args.width, batch_size=args.batch
    )
    gen = torch.Generator().manual_seed(0)
    static = family.sample_static(gen)
    task = family.make_task(static)
    cfg = lopt.preset(args.lopt)
    n, lanes = args.pairs, 2 * args.pairs
    problem = TaskLanes(task, family, static, cfg, n, stream_seed=1)
    unroll = VectorizedUnroll(problem, n, Constant(10**9), seed=0)
    theta = lopt.flatten_theta(lopt.init_theta(cfg, gen), cfg)
    theta_lanes = theta.expand(lanes, -1).clone()

    # 1. the full vectorised slot (batch draw, vmapped grad + lopt step, bookkeeping)
    t_vmap = timed(lambda: unroll.run(theta_lanes, 1), args.slots)
    # 1b. the same slot with the lopt update on the fused CPU kernel, lane by lane
    fused = VectorizedUnroll(
        TaskLanes(task, family, static, cfg, n, stream_seed=1, lopt_backend="cpp"),
        n, Constant(10**9), seed=0,
    )  # fmt: skip
    t_fused = timed(lambda: fused.run(theta_lanes, 1), args.slots)

    # 2. its parts: inner forward/backward alone, lopt update alone (both vmapped)
    state = unroll.state
    batch = {k: torch.cat([v, v]) for k, v in next(problem.stream).items()}
    grad_fn = torch.func.vmap(torch.func.grad_and_value(task.loss))

    def inner():
        with torch.no_grad():
            return grad_fn(state["params"], batch, state["task_cfg"])

    grads, _ = inner()

    def lopt_step(theta_flat, opt_state, params, g):
        return lopt.update(lopt.unflatten_theta(theta_flat, cfg), opt_state, params, g, cfg)

    step_fn = torch.func.vmap(lopt_step)

    def lopt_only():
        with torch.no_grad():
            return step_fn(theta_lanes, state["opt_state"], state["params"], grads)

    t_inner = timed(inner, args.slots)
    t_lopt = timed(lopt_only, args.slots)
    t_batch = timed(lambda: next(problem.stream), args.slots)

    # 3. the per-lane loop: the same math lane by lane, no vmap
    lane_states = [
        (
            {k: v[i] for k, v in state["params"].items()},
            {
                "t": state["opt_state"]["t"][i],
                "tensors": {
                    k: {sk: sv[i] for sk, sv in s.items()}
                    for k, s in state["opt_state"]["tensors"].items()
                },
            },
            {k: v[i] for k, v in state["task_cfg"].items()},
        )
        for i in range(lanes)
    ]
    theta_dicts = [lopt.unflatten_theta(theta_lanes[i], cfg) for i in range(lanes)]
    single_grad = torch.func.grad_and_value(task.loss)

    def loop():
        b = next(problem.stream)
        with torch.no_grad():
            for i, (params, opt_state, lane_cfg) in enumerate(lane_states):
                lane_batch = {k: v[i % n] for k, v in b.items()}
                g, _ = single_grad(params, lane_batch, lane_cfg)
                lopt.update(theta_dicts[i], opt_state, params, g, cfg)

    t_loop = timed(loop, max(5, args.slots // 5))

    steps_vmap, steps_loop, steps_fused = lanes / t_vmap, lanes / t_loop, lanes / t_fused
    overhead = t_vmap - t_inner - t_lopt
    print(f"task: {static}, lopt={args.lopt}, lanes={lanes}, threads={args.threads}\n")
    print("| path | ms / slot | inner steps/s |")
    print("|---|---|---|")
    print(f"| vectorised unroll (vmap) | {1e3 * t_vmap:.2f} | {steps_vmap:,.0f} |")
    print(
        f"| vectorised unroll, lopt on the fused kernel (--lopt-backend cpp) | "
        f"{1e3 * t_fused:.2f} | {steps_fused:,.0f} |"
    )
    print(f"| per-lane Python loop | {1e3 * t_loop:.2f} | {steps_loop:,.0f} |")
    print(
        f"\nspeed-up over the loop: vmap **{steps_vmap / steps_loop:.1f}×**, vmap + fused lopt "
        f"**{steps_fused / steps_loop:.1f}×** (goal ≥ 10×)\n"
    )
    print("| part of a vectorised slot | ms | share |")
    print("|---|---|---|")
    for name, t in (
        ("inner forward + backward (vmap grad)", t_inner),
        ("small_fc_lopt step (vmap)", t_lopt),
        ("  of which: batch draw", t_batch),
        ("overhead: batch, resets, counters, copies", overhead),
    ):
        print(f"| {name} | {1e3 * t:.2f} | {100 * t / t_vmap:.0f} % |")


if __name__ == "__main__":
    main()
