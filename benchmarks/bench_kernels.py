"""CPU benchmark of the fused small_fc_lopt step against its targets (issue 7).

    python benchmarks/bench_kernels.py                 # 4M and 25M sets, h = 4 and 32
    python benchmarks/bench_kernels.py --sets 4M --hidden 4 --reps 3

All times come from one process, interleaved round by round, best of ``--reps`` (other work on a
shared machine only ever slows a run down, so the minimum is the least disturbed one); only the
ratios are meant to be compared. Methods, each stepping every tensor of the set once:

- naive torch: ``core.tensor_step`` per tensor (the N×39 feature matrix), state copied back.
- chunked torch: ``lopt.kernels.torch_backend`` (the pure-torch twin, 64K-element chunks).
- fused CPU: the compiled ``lozoo::small_fc_step_``.
- AdamW: ``torch.optim.AdamW(foreach=True)``.
- GEMM-only ceiling: just the MLP matmuls of the same shapes (n×28 @ 28×h, n×h @ h×h,
  n×h @ h×2, with ReLU) on a preallocated input, per tensor, both whole and in 16K-row chunks;
  the faster of the two is the ceiling.

Transient memory: each method runs in a fresh subprocess; after a warm-up step, free heap is
returned to the OS (``malloc_trim``) and the peak RSS is reset (``/proc/self/clear_refs``); the
reported number is peak RSS during one step minus RSS before it (everything the step touches:
allocator, kernel scratch, thread stacks), as a percentage of the fp32 parameter bytes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from param_sets import PARAM_SETS, numel  # noqa: E402

import lopt  # noqa: E402
from lopt import core  # noqa: E402
from lopt.kernels import ops, torch_backend  # noqa: E402

METHODS = ("naive", "torch", "fused", "adamw", "gemm")
LABELS = {
    "naive": "naive torch",
    "torch": "chunked torch",
    "fused": "fused CPU",
    "adamw": "AdamW foreach",
    "gemm": "GEMM-only",
}
CHUNK_ROWS = 16384


def make_problem(set_name: str, hidden: int, seed: int = 0):
    cfg = lopt.MULO if hidden == 32 else lopt.ORIGINAL
    gen = torch.Generator().manual_seed(seed)
    theta = lopt.init_theta(cfg, gen)
    theta["b0"] = 0.1 * torch.randn(theta["b0"].shape, generator=gen)
    shapes = PARAM_SETS[set_name]()
    params = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    return cfg, theta, params, grads


def _states(cfg, params):
    return [core.init_tensor_state(p, cfg) for p in params]


def make_method(name: str, cfg, theta, params, grads) -> Callable[[], None]:
    """A closure performing one optimizer step of the whole set with method ``name``."""
    decays_t = core.effective_decays(theta, cfg)
    decays, layers = ops.theta_args(theta, cfg)
    dims = [core.factored_dims(tuple(p.shape) or (1,), cfg.tie_break) or (-1, -1) for p in params]
    counter = [0]
    if name in ("torch", "fused"):
        states = _states(cfg, params)
        fn = ops.step_op() if name == "fused" else torch_backend.small_fc_step_

        def run() -> None:
            t = float(counter[0])
            for p, g, s, (d1, d0) in zip(params, grads, states, dims):
                fn(
                    p, g, s["m"], s["v"], s.get("r"), s.get("c"), s.get("vd"), decays, layers,
                    d1, d0, t, 1.0, 0.0, cfg.step_mult, cfg.exp_mult, False,
                )  # fmt: skip
            counter[0] += 1

        return run
    if name == "naive":
        states = _states(cfg, params)

        def run() -> None:
            t = float(counter[0])
            for p, g, s in zip(params, grads, states):
                step, new = core.tensor_step(theta, p, g, s, t, cfg, decays_t)
                for key, value in new.items():
                    s[key].copy_(value)
                p.sub_(step)
            counter[0] += 1

        return run
    if name == "adamw":
        for p, g in zip(params, grads):
            p.grad = g
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
        return opt.step
    if name == "gemm":
        return make_gemm(cfg, params)
    raise ValueError(name)


def make_gemm(cfg, params) -> Callable[[], None]:
    """The MLP matmuls alone, as fast as torch runs them: the ceiling of any fused kernel."""
    h = cfg.hidden_size
    gen = torch.Generator().manual_seed(1)
    w0, w1, w2 = (torch.randn(a, b, generator=gen) for a, b in ((28, h), (h, h), (h, 2)))
    biggest = max(max(p.numel() for p in params), 1)
    x = torch.randn(biggest, 28, generator=gen)
    h1, h2, out = torch.empty(biggest, h), torch.empty(biggest, h), torch.empty(biggest, 2)
    sizes = [max(p.numel(), 1) for p in params]

    def mlp(rows_from: int, rows: int) -> None:
        a, b = h1.narrow(0, rows_from, rows), h2.narrow(0, rows_from, rows)
        torch.mm(x.narrow(0, rows_from, rows), w0, out=a)
        a.relu_()
        torch.mm(a, w1, out=b)
        b.relu_()
        torch.mm(b, w2, out=out.narrow(0, rows_from, rows))

    def whole() -> None:
        for n in sizes:
            mlp(0, n)

    def chunked() -> None:
        for n in sizes:
            for start in range(0, n, CHUNK_ROWS):
                mlp(start, min(CHUNK_ROWS, n - start))

    whole.variants = {"whole": whole, "chunked": chunked}  # type: ignore[attr-defined]
    return whole


def time_methods(set_name: str, hidden: int, reps: int, naive_reps: int) -> dict[str, float]:
    cfg, theta, params, grads = make_problem(set_name, hidden)
    runs: dict[str, Callable[[], None]] = {}
    for name in METHODS:
        # Each method gets its own copy of the parameters, so none sees another's updates.
        fn = make_method(name, cfg, theta, [p.clone() for p in params], grads)
        runs.update(getattr(fn, "variants", {name: fn}))
    best = {name: math.inf for name in runs}
    for rnd in range(reps + 1):  # round 0 warms up (lazy init, page faults)
        for name, fn in runs.items():
            if name == "naive" and rnd > naive_reps:
                continue
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if rnd > 0:
                best[name] = min(best[name], elapsed)
    best["gemm"] = min(best.pop("whole"), best.pop("chunked"))
    return best


def _rss_kib() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) for k in ("VmRSS", "VmHWM")}


def memory_probe(set_name: str, hidden: int, method: str) -> int:
    """Bytes of RSS a step of ``method`` adds at its peak (run in a fresh process)."""
    cfg, theta, params, grads = make_problem(set_name, hidden)
    fn = make_method(method, cfg, theta, params, grads)
    fn()  # warm-up: one-time allocations are not transient memory of a step
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS watermark
    before = _rss_kib()["VmRSS"]
    fn()
    return (_rss_kib()["VmHWM"] - before) * 1024


def measure_memory(set_name: str, hidden: int, method: str) -> int | None:
    cmd = [sys.executable, __file__, "--memory-probe", set_name, str(hidden), method]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"memory probe {set_name}/{hidden}/{method} failed:\n{proc.stderr}", file=sys.stderr)
        return None
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["bytes"])


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def report(results: list[dict]) -> str:
    lines = [
        "| set | params | h | " + " | ".join(LABELS[m] + " (ms)" for m in METHODS) + " |",
        "|---|---:|---:|" + "---:|" * len(METHODS),
    ]
    for r in results:
        times = " | ".join(_ms(r["times"][m]) for m in METHODS)
        lines.append(f"| {r['set']} | {r['params'] / 1e6:.2f}M | {r['hidden']} | {times} |")
    lines += [
        "",
        "| set | h | fused vs naive | fused / AdamW | fused / GEMM-only | chunked torch vs naive "
        "| transient memory of a step, % of param bytes (naive / chunked / fused / AdamW) "
        "| targets |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        t = r["times"]
        speedup, vs_adamw, vs_gemm = t["naive"] / t["fused"], t["fused"] / t["adamw"], None
        vs_gemm = t["fused"] / t["gemm"]
        mem = r.get("memory", {})
        pct = " / ".join(
            "n/a" if mem.get(m) is None else f"{100 * mem[m] / (4 * r['params']):.1f}%"
            for m in ("naive", "torch", "fused", "adamw")
        )
        checks = []
        if r["hidden"] == 32:
            checks.append(f"fused ≤ 1.3× GEMM: {'met' if vs_gemm <= 1.3 else 'MISSED'}")
        else:
            checks.append(f"≥ 20× naive: {'met' if speedup >= 20 else 'MISSED'}")
            checks.append(f"≤ 15× AdamW: {'met' if vs_adamw <= 15 else 'MISSED'}")
        if mem.get("fused") is not None:
            ok = mem["fused"] <= 0.10 * 4 * r["params"]
            checks.append(f"memory ≤ 10%: {'met' if ok else 'MISSED'}")
        lines.append(
            f"| {r['set']} | {r['hidden']} | {speedup:.1f}× | {vs_adamw:.1f}× | {vs_gemm:.2f}× | "
            f"{t['naive'] / t['torch']:.1f}× | {pct} | {'; '.join(checks)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["4M", "25M"], choices=sorted(PARAM_SETS))
    parser.add_argument("--hidden", nargs="+", type=int, default=[4, 32], choices=[4, 32])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--naive-reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-probe", nargs=3, metavar=("SET", "H", "METHOD"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = ops.load_cpp()
    if not result.ok:
        sys.exit(f"the compiled CPU kernel is unavailable: {result.error}")
    if args.memory_probe:
        set_name, hidden, method = args.memory_probe
        print(json.dumps({"bytes": memory_probe(set_name, int(hidden), method)}))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU kernel ISA: {torch.ops.lozoo.cpu_isa()}; best of {args.reps} "
        f"({args.naive_reps} for naive)\n",
        flush=True,
    )
    results = []
    for set_name in args.sets:
        for hidden in args.hidden:
            times = time_methods(set_name, hidden, args.reps, args.naive_reps)
            entry = {"set": set_name, "hidden": hidden, "times": times}
            entry["params"] = numel(PARAM_SETS[set_name]())
            if not args.no_memory:
                entry["memory"] = {
                    m: measure_memory(set_name, hidden, m)
                    for m in ("naive", "torch", "fused", "adamw")
                }
            results.append(entry)
            print(f"{set_name} h={hidden}: " + ", ".join(
                f"{m} {_ms(t)} ms" for m, t in times.items()), flush=True)  # fmt: skip
    print()
    print(report(results))


if __name__ == "__main__":
    main()
