"""CPU benchmark of VeLO's step against AdamW on the 4M and 25M parameter sets.

    python benchmarks/bench_velo.py                      # both sets, 3 rounds, 1 thread
    python benchmarks/bench_velo.py --sets 4M --reps 2 --threads 2

One process, methods interleaved round by round, best of ``--reps`` (on a shared machine other
work only ever slows a run down); only the ratios are meant to be compared. Each method steps every
tensor of the set once through the ``lopt.VeLO`` optimizer (LSTM, hypernetwork, accumulators and
per-element MLP) with random θ:

- AdamW: ``torch.optim.AdamW(foreach=True)``.
- VeLO torch: ``backend="torch"``, the functional core (the n×30 feature matrix per tensor).
- VeLO fused: ``backend="cpp"``, the ``lozoo::velo_mlp_step_`` kernel for the per-element part.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from param_sets import PARAM_SETS, numel  # noqa: E402

from lopt import velo  # noqa: E402

METHODS = ("adamw", "velo_torch", "velo_fused")


def make_method(name: str, set_name: str, seed: int = 0) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) * 0.02 for s in PARAM_SETS[set_name]()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True).step
    theta = velo.init_theta(velo.VELO, gen)
    backend = "torch" if name == "velo_torch" else "cpp"
    opt = velo.VeLO(params, theta, num_steps=1000, backend=backend)
    return lambda: opt.step(loss=1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="4M,25M")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m for m in METHODS if m in args.methods.split(",")]
    if "adamw" not in methods:
        parser.error("--methods must include adamw (the reference of every ratio)")
    results = {}
    for set_name in args.sets.split(","):
        runs = {m: make_method(m, set_name) for m in methods}
        for run in runs.values():  # warm-up: lazy state, kernel load
            run()
        best = dict.fromkeys(methods, float("inf"))
        for _ in range(args.reps):
            for m, run in runs.items():
                start = time.perf_counter()
                run()
                best[m] = min(best[m], time.perf_counter() - start)
        n = numel(PARAM_SETS[set_name]())
        results[set_name] = {
            "params": n,
            "ms": {m: round(1e3 * t, 2) for m, t in best.items()},
            "ratio_to_adamw": {m: round(t / best["adamw"], 2) for m, t in best.items()},
        }
        row = results[set_name]
        print(f"{set_name} ({n / 1e6:.1f}M params, {args.threads} thread(s)):")
        for m in methods:
            print(f"  {m:<11} {row['ms'][m]:>9.1f} ms   {row['ratio_to_adamw'][m]:>6.2f}× AdamW")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
