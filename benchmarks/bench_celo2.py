"""Step time of the Celo2 optimizer against AdamW and Muon on the benchmark parameter sets
(CPU, or CUDA with ``--device cuda``).

    python benchmarks/bench_celo2.py                      # 4M and 25M sets, 2 threads
    python benchmarks/bench_celo2.py --sets 4M --reps 3
    python benchmarks/bench_celo2.py --device cuda        # the CUDA kernel (gpu_check.sh)

Every method steps every tensor of the set once per call, through its ``torch.optim`` object:

- Celo2 fused: ``lopt.celo2.Celo2(backend="cpp")`` (``"cuda"`` with ``--device cuda``;
  accumulators in place, the compiled features + MLP op, Newton–Schulz as batched GEMMs), the
  default ``celo2`` config (rank <= 1 tensors on its Adam branch, every other tensor through the
  learned rule; ``--conv-mode matrix`` treats conv kernels as one matrix each).
- Celo2 foreach: the same with ``foreach=True`` (:mod:`lopt.celo2.multi_tensor`: the Adam
  branch as multi-tensor ops, same-shape tensors stacked through the kernel), the default for
  CUDA tensors; Celo2 fused is ``foreach=False``, the default on the CPU. Celo2 graphs adds
  ``cuda_graphs=True`` (each bucket's direction replayed from a CUDA graph; CUDA only).
- Celo2 torch: the same optimizer on the pure-torch backend.
- AdamW: ``torch.optim.AdamW(foreach=True)`` on every tensor.
- Muon: ``torch.optim.Muon`` on the 2-D tensors and ``AdamW(foreach=True)`` on the rest (Muon
  only takes matrices), as Muon is used in practice.

Times are the minimum over ``--reps`` rounds, methods interleaved round by round in one process
(other load on a shared machine only slows a run down); compare the ratios, not the times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from param_sets import PARAM_SETS, numel  # noqa: E402

import lopt  # noqa: E402
from lopt import celo2  # noqa: E402

METHODS = ("celo2_fused", "celo2_foreach", "celo2_graphs", "celo2_torch", "adamw", "muon")


def make_params(set_name: str, device: torch.device, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in PARAM_SETS[set_name]():
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
        params.append(p)
    return params


def make_step(method: str, params: list[torch.nn.Parameter], conv_mode: str = "slices"):
    if method.startswith("celo2"):
        arch = lopt.get_architecture("celo2")
        cfg = dataclasses.replace(arch.preset(), conv_mode=conv_mode)
        theta = arch.init_theta(cfg, torch.Generator().manual_seed(0))
        fused_backend = "cuda" if params[0].is_cuda else "cpp"
        backend = "torch" if method == "celo2_torch" else fused_backend
        foreach = method in ("celo2_foreach", "celo2_graphs")
        graphs = method == "celo2_graphs"
        opts = [celo2.Celo2(params, theta, config=cfg, backend=backend, foreach=foreach,
                            cuda_graphs=graphs)]  # fmt: skip
    elif method == "adamw":
        opts = [torch.optim.AdamW(params, lr=1e-3, foreach=True)]
    else:
        matrices = [p for p in params if p.dim() == 2]
        rest = [p for p in params if p.dim() != 2]
        opts = [torch.optim.Muon(matrices, lr=1e-3), torch.optim.AdamW(rest, foreach=True)]

    def step() -> None:
        for opt in opts:
            opt.step()

    return step


def time_set(
    set_name: str, reps: int, methods: tuple[str, ...], device: torch.device, conv_mode: str
) -> dict[str, float]:
    # On CUDA the clock stops only after the queued kernels have finished.
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps = {}
    for method in methods:
        steps[method] = make_step(method, make_params(set_name, device), conv_mode)
        steps[method]()  # warm-up: state allocation, kernel load
    sync()
    best = {m: float("inf") for m in methods}
    for _ in range(reps):
        for method in methods:
            start = time.perf_counter()
            steps[method]()
            sync()
            best[method] = min(best[method], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["4M", "25M"], choices=sorted(PARAM_SETS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--conv-mode",
        choices=["slices", "matrix"],
        default="slices",
        help="Celo2's treatment of conv kernels: per spatial slice (the reference) or one matrix",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print where one fused Celo2 step of the first set spends its time",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    methods = [m for m in args.methods if device.type == "cuda" or m != "celo2_graphs"]
    kernel_methods = {"celo2_fused", "celo2_foreach", "celo2_graphs"} & set(methods)
    if kernel_methods and not celo2.fused.op_is_available(device.type):
        reason = celo2.fused.unavailable_reason(device.type)
        sys.exit(f"the compiled Celo2 kernel is unavailable ({reason}); see python -m lopt.kernels")
    on_gpu = device.type == "cuda"
    where = torch.cuda.get_device_name() if on_gpu else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, best of {args.reps}, conv_mode={args.conv_mode}")
    results = []
    for set_name in args.sets:
        best = time_set(set_name, args.reps, tuple(methods), device, args.conv_mode)
        n = numel(PARAM_SETS[set_name]())
        row = {"set": set_name, "device": args.device, "conv_mode": args.conv_mode, "numel": n}
        row["seconds"] = best
        for base in ("muon", "adamw"):
            if base in best:
                row[f"ratio_to_{base}"] = {m: best[m] / best[base] for m in best}
        results.append(row)
        print(f"\n{set_name} ({n / 1e6:.1f}M parameters)")
        for m, t in best.items():
            ratios = "  ".join(f"{t / best[b]:6.2f}x {b}" for b in ("muon", "adamw") if b in best)
            print(f"  {m:14s} {t * 1e3:9.1f} ms   {ratios}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.profile:
        profile_step(args.sets[0], device, args.conv_mode)


def profile_step(set_name: str, device: torch.device, conv_mode: str, rows: int = 15) -> None:
    """The operators one fused Celo2 step (the device's default path) spends its time in."""
    from torch.profiler import ProfilerActivity, profile

    method = "celo2_graphs" if device.type == "cuda" else "celo2_fused"
    step = make_step(method, make_params(set_name, device), conv_mode)
    step()  # state allocation outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of one {method} step, {set_name}, sorted by {sort}:")
    print(prof.key_averages().table(sort_by=sort, row_limit=rows))


if __name__ == "__main__":
    main()
