"""GPU benchmark (issue 7): one small_fc_lopt step of ViT-B/16-sized parameters (86.6M) on CUDA.

    python benchmarks/bench_kernels_gpu.py [--hidden 32 4] [--reps 20]

Compares naive torch (``core.tensor_step`` per tensor), the chunked torch twin, the fused CUDA
kernel and ``torch.optim.AdamW(fused=True)``; times with CUDA events, median of ``--reps`` after
warm-up. Goal: fused ≥ 5.2× faster than naive (PyLO's published ViT-B/16 ratio). Also reports
the peak extra CUDA memory of one step (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import make_method  # noqa: E402
from param_sets import PARAM_SETS, numel  # noqa: E402

import lopt  # noqa: E402
from lopt.kernels import ops  # noqa: E402

GPU_METHODS = {"naive": "naive torch", "torch": "chunked torch", "fused": "fused CUDA"}


def problem(hidden: int, dev: torch.device):
    cfg = lopt.MULO if hidden == 32 else lopt.ORIGINAL
    gen = torch.Generator().manual_seed(0)
    theta = {k: v.to(dev) for k, v in lopt.init_theta(cfg, gen).items()}
    shapes = PARAM_SETS["vit_b16"]()
    params = [(torch.randn(s, generator=gen) * 0.02).to(dev) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(dev) for s in shapes]
    return cfg, theta, params, grads


def bench(fn, reps: int) -> tuple[float, int]:
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", nargs="+", type=int, default=[32, 4], choices=[4, 32])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible to torch (a CUDA build of torch is needed)")
    reason = ops.cuda_unavailable_reason()
    if reason is not None:
        sys.exit(f"the CUDA kernel is unavailable: {reason}")
    dev = torch.device("cuda")
    n = numel(PARAM_SETS["vit_b16"]())
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, ViT-B/16: {n / 1e6:.1f}M")
    print("\n| h | method | ms/step (median) | vs naive | peak extra memory, % of params |")
    print("|---:|---|---:|---:|---:|")
    for hidden in args.hidden:
        cfg, theta, params, grads = problem(hidden, dev)
        rows = {}
        for name in GPU_METHODS:
            fn = make_method(name, cfg, theta, [p.clone() for p in params], grads)
            rows[GPU_METHODS[name]] = bench(fn, args.reps if name != "naive" else 5)
        adam_params = [p.clone() for p in params]
        for p, g in zip(adam_params, grads):
            p.grad = g
        adamw = torch.optim.AdamW(adam_params, lr=1e-3, fused=True)
        rows["AdamW fused"] = bench(adamw.step, args.reps)
        naive = rows["naive torch"][0]
        for label, (ms, mem) in rows.items():
            pct = 100 * mem / (4 * n)
            print(f"| {hidden} | {label} | {ms:.2f} | {naive / ms:.2f}× | {pct:.1f}% |")
        ratio = naive / rows["fused CUDA"][0]
        verdict = "met" if ratio >= 5.2 else "MISSED"
        print(f"\nh={hidden}: fused CUDA {ratio:.2f}× faster than naive (goal ≥ 5.2×: {verdict})")


if __name__ == "__main__":
    main()
