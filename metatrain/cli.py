"""``python -m metatrain``: meta-train a learned optimizer from the command line."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

from .config import MetaTrainConfig, build_parser, config_from_args
from .trainer import RunInterrupted, load_run_config, merge_resume_config, train


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = shlex.join(["python", "-m", "metatrain", *argv])
    try:
        requested = config_from_args(args)
        if args.resume:
            run_dir = Path(args.resume)
            given = {
                k
                for k, v in vars(args).items()
                if v is not None and k in MetaTrainConfig.__dataclass_fields__
            }
            cfg = merge_resume_config(load_run_config(run_dir), requested, given)
            result = train(cfg, run_dir, resume=True, command=command)
        else:
            result = train(requested, command=command)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as stop:
        print(f"interrupted by {stop}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("interrupted; resume with --resume RUN_DIR from the last checkpoint", file=sys.stderr)
        return 130
    losses = result.meta_losses
    window = max(1, min(10, len(losses) // 4))
    if losses:
        first = sum(losses[:window]) / window
        last = sum(losses[-window:]) / window
        print(f"meta-loss: first {window} steps {first:.4f} → last {window} steps {last:.4f}")
    print(f"final θ: {result.run_dir / 'theta.safetensors'}  (run dir: {result.run_dir})")
    return 0
