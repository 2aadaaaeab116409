"""Inner steps/s of the vectorised unroll, where its time goes, and how close it is to the roofline.

    PYTHONPATH=. python benchmarks/bench_unroll.py [--lanes 8,16,64] [--lopt all] [--threads 2]

For each lane count and learned optimizer (``--lopt``: ``ARCH`` or ``ARCH:PRESET``, comma-separated;
``all`` = both small_fc_lopt presets and every other registered architecture's default preset) it
times one slot (every lane one inner step) of these paths on the same task, interleaved round by
round, best round kept, so that the ratios come from one run on one (possibly shared, noisy)
machine:

- ``lanes``: the fast path (``--lopt-backend cpp``): the task's batched forward/backward
  (``Task.lanes_grad_and_value``) and the architecture's lane-batched update, in place; for an
  architecture without a lane kernel, the vmapped-core fallback (``vmapped_lane_update``);
- ``fused (per-lane op)`` (small_fc_lopt only): the previous fast path, kept here as the baseline:
  vmapped inner gradients and the fused op called once per (lane, tensor) on cloned lane state;
- ``vmap``: the reference (``--lopt-backend torch``), one ``torch.func.vmap`` of grad + update;
- ``loop``: the same math lane by lane in Python.

The ``lanes`` slot is split into inner forward/backward, lopt update and the rest (batch draw,
normaliser, resets, counters). The roofline counts the matrix-multiply FLOPs of one lane's inner
forward/backward and lopt update (``torch.utils.flop_counter``: GEMMs and convolutions; the
elementwise work is not counted) and divides them by the GEMM rate measured in the same run on
the inner problem's first-layer ``bmm``; the fraction is that time over the measured slot time.
Design notes: docs/design/lanes.md.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

import lopt
import tasks
from lopt import core
from lopt.kernels import ops
from lopt.kernels.lanes import vmapped_lane_update
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


class FallbackLanes(TaskLanes):
    """The fast path for an architecture without a lane kernel: batched inner gradients and the
    vmapped-core update written back in place (what registering ``vmapped_lane_update`` gives)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "lopt_backend": "torch"})
        self.lopt_backend = "cpp"
        self.lane_update = vmapped_lane_update(self.arch.update, lopt.unflatten_theta)


# -- FLOPs ----------------------------------------------------------------------------------------
def gemm_flops(fn: Callable[[], object]) -> int:
    """Matrix-multiply FLOPs of ``fn()`` (2 per multiply-add; GEMMs and convolutions only)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def lane_flops(task, family, static, arch, cfg) -> tuple[int, int]:
    """``(inner forward + backward, lopt update)`` GEMM FLOPs of one lane's inner step."""
    gen = torch.Generator().manual_seed(0)
    lane_cfg = family.sample_lane(gen, static)
    params = task.init(gen, lane_cfg)
    batch = {k: v[0] for k, v in next(task.batches("train", 1, 0)).items()}
    out = {}
    inner = gemm_flops(
        lambda: out.update(zip(("grads", "loss"), torch.func.grad_and_value(task.loss)(
            params, batch, lane_cfg
        )))
    )  # fmt: skip
    theta = arch.init_theta(cfg, gen)
    state = arch.init_state(params, cfg)
    update = gemm_flops(
        lambda: arch.update(theta, state, params, out["grads"], cfg, loss=out["loss"])
    )
    return inner, update


def gemm_rate(lanes: int, static, rounds: int) -> float:
    """FLOP/s of ``bmm`` on the inner problem's first layer, ``[L, B, in] × [L, in, out]``.

    Many short rounds, best kept: the rate is the machine's, so a round that lost the CPU to
    another process must not lower it (that would inflate the roofline fraction).
    """
    fan_in, fan_out = static.image_size**2, (static.hidden or (10,))[0]
    a = torch.randn(lanes, static.batch_size, fan_in)
    b = torch.randn(lanes, fan_in, fan_out)
    seconds = interleaved({"bmm": (lambda: torch.bmm(a, b), 3)}, 2 * rounds)["bmm"]
    return 2 * lanes * static.batch_size * fan_in * fan_out / seconds


# -- one configuration ----------------------------------------------------------------------------
def bench(task, family, static, arch, cfg, lanes: int, args) -> dict:
    n = lanes // 2
    gen = torch.Generator().manual_seed(0)
    theta = lopt.flatten_theta(arch.init_theta(cfg, gen), cfg)
    theta_lanes = (theta + 0.01 * torch.randn(lanes, theta.numel(), generator=gen)).contiguous()

    def unroll(problem_cls, backend):
        problem = problem_cls(task, family, static, cfg, n, stream_seed=1, lopt_backend=backend)
        return VectorizedUnroll(problem, n, Constant(TRAJECTORY), TRAJECTORY, seed=0)

    kernel = arch.lanes_update is not None
    fast = unroll(TaskLanes, "cpp") if kernel else unroll(FallbackLanes, "torch")
    fused = unroll(PerLaneOpLanes, "torch") if arch.name == "small_fc_lopt" else None
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
                g, loss = single_grad(params, {k: v[i % n] for k, v in b.items()}, lane_cfg)
                arch.update(theta_dicts[i], opt_state, params, g, cfg, loss=loss)

    # the parts of a fast slot, on a copy of its lane state
    batch = {k: torch.cat([v, v]) for k, v in next(stream).items()}
    grads, loss = task.lanes_grad_and_value(state["params"], batch, state["task_cfg"])
    update = fast.problem.lane_update
    prepared = update.prepare(theta_lanes, cfg)

    slots, loop_slots = args.slots, 1
    paths = {"lanes": (lambda: fast.run(theta_lanes, 1), slots)}
    if fused is not None:
        paths["fused (per-lane op)"] = (lambda: fused.run(theta_lanes, 1), slots)
    times = interleaved(
        {
            **paths,
            "vmap": (lambda: vmap.run(theta_lanes, 1), slots),
            "loop": (loop, loop_slots),
            "part: forward + backward": (
                lambda: task.lanes_grad_and_value(state["params"], batch, state["task_cfg"]),
                slots,
            ),
            "part: lopt update": (
                lambda: update.apply_(
                    prepared, state["opt_state"], state["params"], grads, cfg, loss=loss
                ),
                slots,
            ),
            "part: batch draw": (lambda: next(stream), slots),
        },
        args.rounds,
    )
    rate = gemm_rate(lanes, static, args.rounds)
    inner, update_flops = lane_flops(task, family, static, arch, cfg)
    return {
        "times": times, "gemm_rate": rate, "flops": lanes * (inner + update_flops),
        "inner_flops": inner, "update_flops": update_flops, "kernel": kernel,
    }  # fmt: skip


def report(name: str, lanes: int, result: dict) -> None:
    t = result["times"]
    order = ("lanes", "fused (per-lane op)", "vmap", "loop")
    steps = {p: lanes / t[p] for p in order if p in t}
    base = "fused (per-lane op)" if "fused (per-lane op)" in steps else "vmap"
    kind = "lane kernel" if result["kernel"] else "no lane kernel: vmapped-core fallback"
    print(f"\n### {name}, {lanes} lanes ({kind})\n", flush=True)
    print(f"| path | ms / slot | inner steps/s | × loop | × {base} |")
    print("|---|---|---|---|---|")
    for path, s in steps.items():
        print(
            f"| {path} | {1e3 * t[path]:.2f} | {s:,.0f} | {s / steps['loop']:.1f} | "
            f"{s / steps[base]:.2f} |"
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
        f"\nroofline: {result['inner_flops'] / 1e6:.2f} + {result['update_flops'] / 1e6:.2f} "
        f"MFLOP (forward/backward + lopt update GEMMs) per inner step, GEMM rate "
        f"{result['gemm_rate'] / 1e9:.1f} GFLOP/s (bmm, this run) → {1e3 * roof:.3f} ms per slot; "
        f"the `lanes` slot reaches **{100 * roof / slot:.0f} %** of it "
        f"({lanes / roof:,.0f} inner steps/s at the roofline)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lanes", default="8,16,64", help="comma-separated lane counts (even)")
    parser.add_argument("--slots", type=int, default=2, help="slots per path and round")
    parser.add_argument(
        "--rounds",
        type=int,
        default=40,
        help="interleaved rounds, best kept (many short rounds: on a shared machine some of "
        "them run undisturbed)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--task",
        choices=("mnist", "canonical"),
        default="mnist",
        help="mnist: mlp_mnist (--image-size, --width, --batch; lanes draw relu/tanh/gelu/silu); "
        "canonical: ImageMLP_FashionMnist8_Relu32 (64→32→10 ReLU, batch 128)",
    )
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument(
        "--lopt",
        default="all",
        help="comma-separated ARCH or ARCH:PRESET; all = small_fc_lopt:original, "
        "small_fc_lopt:mulo and every other registered architecture's default preset",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lane_counts = [int(x) for x in args.lanes.split(",")]
    if any(n < 2 or n % 2 for n in lane_counts):
        parser.error(f"--lanes must be even counts >= 2, got {args.lanes}")

    if args.task == "canonical":
        family = tasks.get_family("mlp_fashion_mnist", canonical=True)
    else:
        family = tasks.get_family(
            "mlp_mnist",
            image_sizes=args.image_size,
            depth=1,
            width=args.width,
            batch_size=args.batch,
        )
    static = family.sample_static(torch.Generator().manual_seed(0))
    task = family.make_task(static)
    print(f"task: {static}, threads={args.threads}, best of {args.rounds} interleaved rounds")
    if not ops.load_cpp().ok:
        raise SystemExit("the fused CPU kernel is needed: python -m lopt.kernels build")
    print(f"CPU kernel ISA: {torch.ops.lozoo.cpu_isa()}")
    for spec in optimizers(args.lopt):
        arch_name, _, preset_name = spec.partition(":")
        arch = lopt.get_architecture(arch_name)
        cfg = arch.preset(preset_name or None)
        for lanes in lane_counts:
            try:
                result = bench(task, family, static, arch, cfg, lanes, args)
            except Exception as err:  # an architecture the unroll cannot drive yet
                print(f"\n### {spec}, {lanes} lanes: skipped ({type(err).__name__}: {err})")
                break
            report(spec, lanes, result)


def optimizers(text: str) -> list[str]:
    if text != "all":
        return text.split(",")
    others = [n for n in lopt.architecture_names() if n != "small_fc_lopt"]
    return ["small_fc_lopt:original", "small_fc_lopt:mulo", *others]


if __name__ == "__main__":
    main()
