"""Inner steps/s of the vectorised unroll, where its time goes, and how close it is to the roofline.

    PYTHONPATH=. python benchmarks/bench_unroll.py [--lanes 8,16,64] [--rounds 5] [--threads 2]

For each lane count and learned-optimizer configuration it times one slot (every lane one inner
step) of five paths on the same task, interleaved round by round, best round kept, so that the
ratios come from one run on one (possibly shared, noisy) machine:

- ``lanes``: the fast path (``--lopt-backend cpp``): the task's batched forward/backward
  (``Task.lanes_grad_and_value``) and the lane-batched lopt update, in place;
- ``fused (per-lane op)``: the previous fast path, kept here as the baseline: vmapped inner
  gradients and the fused op called once per (lane, tensor) on cloned lane state;
- ``vmap``: the reference (``--lopt-backend torch``), one ``torch.func.vmap`` of grad + update;
- ``loop``: the same math lane by lane in Python.

The ``lanes`` slot is split into inner forward/backward, lopt update and the rest (batch draw,
normaliser, resets, counters). The roofline counts the slot's floating-point operations (the
inner GEMMs exactly, the lopt update per element, see :func:`lopt_flops_per_element`) and
divides by the GEMM rate measured in the same run on the inner problem's own first-layer
``bmm``; ``roofline`` is that time over the measured slot time. Docs: docs/design/lanes.md.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch

import lopt
import tasks
from lopt import core
from lopt.kernels import ops
from metatrain.schedules import Constant
from metatrain.unroll import TaskLanes, VectorizedUnroll

TRAJECTORY = 100  # constant trajectories with staggered starts: ~1 % of lane-slots reset


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Mean seconds per call over ``repeats`` calls (one round)."""
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def interleaved(paths: dict[str, tuple[Callable[[], object], int]], rounds: int) -> dict:
    """Best-of-``rounds`` seconds per call of each path, the paths taking turns every round."""
    for fn, _ in paths.values():
        fn()  # warm-up
    best = {name: float("inf") for name in paths}
    for _ in range(rounds):
        for name, (fn, repeats) in paths.items():
            best[name] = min(best[name], best_time(fn, repeats))
    return best


# -- the previous fast path, reproduced as the baseline ------------------------------------------
@torch.no_grad()
def per_lane_op_update(theta_lanes, state, params, grads, cfg):
    """The fused op once per (lane, tensor) on cloned lane state (the path this one replaces)."""
    op = ops.step_op()
    decays, stacked = ops.theta_args(lopt.unflatten_theta(theta_lanes, cfg), cfg)
    layers = [[w[lane] for w in stacked] for lane in range(len(decays))]
    new_params = {k: v.detach().clone().contiguous() for k, v in params.items()}
    tensors = {
        name: {k: v.clone().contiguous() for k, v in st.items()}
        for name, st in state["tensors"].items()
    }
    ts = state["t"].tolist()
    for name, p in new_params.items():
        d1, d0 = core.factored_dims(p.shape[1:], cfg.tie_break) or (-1, -1)
        g, st = grads[name].contiguous(), tensors[name]
        for lane in range(p.shape[0]):
            op(
                p[lane], g[lane], st["m"][lane], st["v"][lane],
                st["r"][lane] if "r" in st else None, st["c"][lane] if "c" in st else None,
                st["vd"][lane] if "vd" in st else None, decays[lane], layers[lane], d1, d0,
                float(ts[lane]), 1.0, 0.0, cfg.step_mult, cfg.exp_mult, False,
            )  # fmt: skip
    return new_params, {"t": state["t"] + 1, "tensors": tensors}


class PerLaneOpLanes(TaskLanes):
    """TaskLanes with the previous fast path: vmapped gradients, the op per (lane, tensor)."""

    def step(self, theta_lanes, state, batch):
        grads_all = torch.func.vmap(torch.func.grad_and_value(self.task.loss))
        grads, loss = grads_all(state["params"], batch, state["task_cfg"])
        params, opt_state = per_lane_op_update(
            theta_lanes, state["opt_state"], state["params"], grads, self.lopt_config
        )
        return {"params": params, "opt_state": opt_state, "task_cfg": state["task_cfg"]}, loss


# -- FLOPs ----------------------------------------------------------------------------------------
def mlp_task_flops(static, batch: int) -> int:
    """Forward + backward FLOPs of one image-MLP inner step (GEMMs only; 2 per multiply-add).

    Forward ``2·B·in·out`` per layer; backward the weight gradient (same) and, except for the
    first layer (no input gradient needed), the input gradient (same again).
    """
    sizes = [static.image_size**2, *static.hidden, 10]
    total = 0
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        total += (2 if i == 0 else 3) * 2 * batch * fan_in * fan_out
    return total


def lopt_flops_per_element(cfg: lopt.SmallFCConfig) -> int:
    """small_fc_lopt work per parameter element: the MLP plus the feature arithmetic.

    The MLP with the normalisation folded into its first layer: ``2·(28·h + (L−2)·h² + 2·h)``;
    the accumulators and 28 features, counted one FLOP per arithmetic operation and rsqrt:
    moments 3·3 + 3, accumulators 3·3, features ≈ 40, normalisation sums 2·28, step 5.
    """
    h, hidden = cfg.hidden_size, cfg.hidden_layers
    mlp = 2 * (28 * h + (hidden - 1) * h * h + 2 * h)
    return mlp + 12 + 9 + 40 + 56 + 5


def gemm_rate(lanes: int, static, rounds: int) -> float:
    """FLOP/s of ``bmm`` on the inner problem's first layer, ``[L, B, in] × [L, in, out]``."""
    fan_in, fan_out = static.image_size**2, (static.hidden or (10,))[0]
    a = torch.randn(lanes, static.batch_size, fan_in)
    b = torch.randn(lanes, fan_in, fan_out)
    seconds = interleaved({"bmm": (lambda: torch.bmm(a, b), 50)}, rounds)["bmm"]
    return 2 * lanes * static.batch_size * fan_in * fan_out / seconds


# -- one configuration ----------------------------------------------------------------------------
def bench(task, family, static, cfg, lanes: int, args) -> dict:
    n = lanes // 2
    gen = torch.Generator().manual_seed(0)
    theta = lopt.flatten_theta(lopt.init_theta(cfg, gen), cfg)
    theta_lanes = (theta + 0.01 * torch.randn(lanes, theta.numel(), generator=gen)).contiguous()

    def unroll(problem_cls, backend):
        problem = problem_cls(task, family, static, cfg, n, stream_seed=1, lopt_backend=backend)
        return VectorizedUnroll(problem, n, Constant(TRAJECTORY), TRAJECTORY, seed=0)

    fast = unroll(TaskLanes, "cpp")
    fused = unroll(PerLaneOpLanes, "torch")
    vmap = unroll(TaskLanes, "torch")

    # the per-lane loop: the same math lane by lane, no vmap
    state = copy.deepcopy(fast.state)
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
    stream = fast.problem.stream

    def loop():
        b = next(stream)
        with torch.no_grad():
            for i, (params, opt_state, lane_cfg) in enumerate(lane_states):
                g, _ = single_grad(params, {k: v[i % n] for k, v in b.items()}, lane_cfg)
                lopt.update(theta_dicts[i], opt_state, params, g, cfg)

    # the parts of a fast slot, on a copy of its lane state
    batch = {k: torch.cat([v, v]) for k, v in next(stream).items()}
    grads, _ = task.lanes_grad_and_value(state["params"], batch, state["task_cfg"])
    update = fast.problem.lane_update
    prepared = update.prepare(theta_lanes, cfg)

    slots, loop_slots = args.slots, max(1, args.slots // max(1, lanes // 4))
    times = interleaved(
        {
            "lanes": (lambda: fast.run(theta_lanes, 1), slots),
            "fused (per-lane op)": (lambda: fused.run(theta_lanes, 1), slots),
            "vmap": (lambda: vmap.run(theta_lanes, 1), slots),
            "loop": (loop, loop_slots),
            "part: forward + backward": (
                lambda: task.lanes_grad_and_value(state["params"], batch, state["task_cfg"]),
                slots,
            ),
            "part: lopt update": (
                lambda: update.apply_(prepared, state["opt_state"], state["params"], grads, cfg),
                slots,
            ),
            "part: batch draw": (lambda: next(stream), slots),
        },
        args.rounds,
    )
    rate = gemm_rate(lanes, static, args.rounds)
    flops = lanes * (
        mlp_task_flops(static, static.batch_size) + lopt_flops_per_element(cfg) * task.num_params
    )
    return {"times": times, "gemm_rate": rate, "flops": flops}


def report(name: str, lanes: int, result: dict) -> None:
    t = result["times"]
    steps = {p: lanes / t[p] for p in ("lanes", "fused (per-lane op)", "vmap", "loop")}
    print(f"\n### {name}, {lanes} lanes\n")
    print("| path | ms / slot | inner steps/s | × loop | × fused (per-lane op) |")
    print("|---|---|---|---|---|")
    for path, s in steps.items():
        print(
            f"| {path} | {1e3 * t[path]:.2f} | {s:,.0f} | {s / steps['loop']:.1f} | "
            f"{s / steps['fused (per-lane op)']:.2f} |"
        )
    slot = t["lanes"]
    fwd, upd = t["part: forward + backward"], t["part: lopt update"]
    rest = slot - fwd - upd
    print("\n| part of a `lanes` slot | ms | share |")
    print("|---|---|---|")
    for part, sec in (
        ("inner forward + backward (batched)", fwd),
        ("lopt update (lane-batched, in place)", upd),
        ("batch draw, normaliser, resets, counters", rest),
        ("  of which the batch draw", t["part: batch draw"]),
    ):
        print(f"| {part} | {1e3 * sec:.3f} | {100 * sec / slot:.0f} % |")
    roof = result["flops"] / result["gemm_rate"]
    print(
        f"\nroofline: {result['flops'] / lanes / 1e6:.2f} MFLOP per inner step, GEMM rate "
        f"{result['gemm_rate'] / 1e9:.1f} GFLOP/s (bmm, this run) → {1e3 * roof:.3f} ms per slot; "
        f"the `lanes` slot reaches **{100 * roof / slot:.0f} %** of it "
        f"({lanes / roof:,.0f} inner steps/s at the roofline)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lanes", default="8,16,64", help="comma-separated lane counts (even)")
    parser.add_argument("--slots", type=int, default=20, help="slots per path and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; best is kept")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument(
        "--lopt", default="original,mulo", help="comma-separated small_fc_lopt presets"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lane_counts = [int(x) for x in args.lanes.split(",")]
    if any(n < 2 or n % 2 for n in lane_counts):
        parser.error(f"--lanes must be even counts >= 2, got {args.lanes}")

    family = tasks.get_family(
        "mlp_mnist", image_sizes=args.image_size, depth=1, width=args.width, batch_size=args.batch
    )
    static = family.sample_static(torch.Generator().manual_seed(0))
    task = family.make_task(static)
    print(f"task: {static}, threads={args.threads}, best of {args.rounds} interleaved rounds")
    if not ops.load_cpp().ok:
        raise SystemExit("the fused CPU kernel is needed: python -m lopt.kernels build")
    print(f"CPU kernel ISA: {torch.ops.lozoo.cpu_isa()}")
    for preset in args.lopt.split(","):
        cfg = lopt.preset(preset)
        for lanes in lane_counts:
            report(
                f"small_fc_lopt ({preset})", lanes, bench(task, family, static, cfg, lanes, args)
            )


if __name__ == "__main__":
    main()
