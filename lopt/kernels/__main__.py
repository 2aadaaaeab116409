"""``python -m lopt.kernels build | info``: build the compiled kernels ahead of first use.

``build`` compiles (or finds in the cache) the CPU kernel, and the CUDA kernel when torch sees a
CUDA device; it exits non-zero if the CPU kernel cannot be built, printing the compiler's log.
``info`` prints what is available without building anything.
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import build, ops


def _info() -> int:
    cpu = build.load(build.CPU_LIB, build=False)
    print(f"sources:    {build.source_dir()}")
    print(f"cache:      {build.cache_root()}")
    print(f"cpu kernel: {'ready ' + str(cpu.path) if cpu.ok else 'not available: ' + cpu.error}")
    if cpu.ok:
        print(f"cpu isa:    {torch.ops.lozoo.cpu_isa()}")
    reason = ops.cuda_unavailable_reason(build_if_needed=False)
    print(f"cuda:       {'ready' if reason is None else 'not available: ' + reason}")
    return 0


def _build(verbose: bool) -> int:
    cpu = build.load(build.CPU_LIB, build=True, verbose=verbose)
    if not cpu.ok:
        print(f"lozoo: building the CPU kernel failed: {cpu.error}", file=sys.stderr)
        return 1
    print(f"lozoo: CPU kernel ready ({torch.ops.lozoo.cpu_isa()}): {cpu.path}")
    if torch.version.cuda is not None and torch.cuda.is_available():
        cuda = build.load(build.CUDA_LIB, build=True, verbose=verbose)
        if not cuda.ok:
            print(f"lozoo: building the CUDA kernel failed: {cuda.error}", file=sys.stderr)
            return 1
        print(f"lozoo: CUDA kernel ready: {cuda.path}")
    else:
        print("lozoo: no CUDA device visible; the CUDA kernel is built on a machine with one")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lopt.kernels", description=__doc__)
    parser.add_argument("command", choices=("build", "info"))
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler output")
    args = parser.parse_args(argv)
    return _build(args.verbose) if args.command == "build" else _info()


if __name__ == "__main__":
    sys.exit(main())
