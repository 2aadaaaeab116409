"""``python -m metatrain.eval``: evaluate a learned optimizer against a tuned Adam.

Trains the learned optimizer and Adam (every LR of a log grid) on held-out tasks of a family,
several seeds each, and writes ``eval.json`` (metrics, best Adam per task, speedup over Adam,
curves), ``curves.png`` and ``speedup.png``; ``--publish NAME`` puts the weights with the
evaluation into the zoo. Protocol: docs/design/meta_training.md §10; the library:
:mod:`metatrain.evaluation`.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Any

import tasks
from metatrain.config import key_value_option
from metatrain.evaluation import DEFAULT_ADAM_LRS, EvalConfig, evaluate

__all__ = ["build_parser", "main"]

_DEFAULTS = EvalConfig(optimizer="")


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input in one line (exit code 2), without the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _lrs(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--adam-lrs takes numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = _DEFAULTS
    grid = ",".join(f"{lr:g}" for lr in DEFAULT_ADAM_LRS)
    p = _Parser(
        prog="python -m metatrain.eval",
        description="Evaluate a learned optimizer against Adam over a learning-rate grid on "
        "held-out tasks (seeds disjoint from meta-training); writes eval.json, curves.png and "
        "speedup.png to --out.",
    )
    add = p.add_argument
    add(
        "--suite",
        choices=["generalisation"],
        default=None,
        help="run the held-out generalisation benchmark instead of a task-family evaluation "
        "(its flags: python -m metatrain.eval --suite generalisation --help)",
    )
    add(
        "--compare",
        nargs="+",
        default=None,
        metavar="DIR",
        help="compare finished generalisation-suite reports in one table with the goal checks "
        "(its flags: python -m metatrain.eval --compare DIR --help)",
    )
    add(
        "--optimizer",
        required=True,
        metavar="REF",
        help="meta-weights: a zoo reference (small_fc_lopt/mlp_mnist[:1.0.0]), a meta-training "
        "run directory, or a .safetensors file",
    )
    add(
        "--task-family",
        default=d.task_family,
        metavar="F",
        help=f"task family: {', '.join(tasks.FAMILY_NAMES)} (default: %(default)s)",
    )
    add(
        "--task-option",
        type=key_value_option("--task-option"),
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="family option, value as JSON (repeatable), e.g. --task-option image_sizes=[8]",
    )
    add(
        "--num-tasks",
        type=int,
        default=d.num_tasks,
        metavar="N",
        help="held-out tasks (default: %(default)s)",
    )
    add(
        "--steps",
        type=int,
        default=d.steps,
        metavar="K",
        help="inner training steps per run (default: %(default)s)",
    )
    add(
        "--seeds",
        type=int,
        default=d.seeds,
        metavar="S",
        help="runs per task and optimizer; "
        "a seed changes the init and the data order (default: %(default)s; >= 3 per protocol)",
    )
    add(
        "--adam-lrs",
        type=_lrs,
        nargs="+",
        default=None,
        metavar="LR",
        help=f"Adam learning-rate grid, space- or comma-separated (default: {grid})",
    )
    add(
        "--learned-lr",
        type=float,
        default=d.learned_lr,
        metavar="X",
        help="multiplier of the learned step, as the optimizer's lr=X (default: %(default)s)",
    )
    add(
        "--eval-every",
        type=int,
        default=d.eval_every,
        metavar="N",
        help="validation loss/accuracy (outer_valid split) every N steps; 0: only at the start "
        "and the end (default: %(default)s)",
    )
    add(
        "--val-batches",
        type=int,
        default=d.val_batches,
        metavar="N",
        help="outer_valid batches in the fixed validation set, capped at one epoch "
        "(default: %(default)s)",
    )
    add(
        "--out",
        default=None,
        metavar="DIR",
        help="output directory; never overwritten (default: runs/eval-<family>-<time>)",
    )
    add(
        "--seed",
        type=int,
        default=d.seed,
        help="evaluation seed: picks the held-out tasks, "
        "inits and data orders (default: %(default)s)",
    )
    add(
        "--publish",
        default=None,
        metavar="NAME",
        help="publish the weights with this evaluation to the zoo as NAME (family/name); if REF "
        "is a zoo entry of that name, the evaluation is added as its next patch version",
    )
    add(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar (--no-progress hides it)",
    )
    add(
        "--threads",
        type=int,
        default=d.threads,
        metavar="N",
        help="torch threads (default: %(default)s = torch's default)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    lrs = [lr for group in args.adam_lrs for lr in group] if args.adam_lrs else DEFAULT_ADAM_LRS
    return EvalConfig(
        optimizer=args.optimizer,
        task_family=args.task_family,
        task_option=dict(args.task_option),
        num_tasks=args.num_tasks,
        steps=args.steps,
        seeds=args.seeds,
        adam_lrs=tuple(lrs),
        learned_lr=args.learned_lr,
        eval_every=args.eval_every,
        val_batches=args.val_batches,
        seed=args.seed,
        out=args.out,
        publish=args.publish,
        progress=args.progress,
        threads=args.threads,
    )


def _summary(report: dict[str, Any]) -> str:
    agg = report["aggregate"]

    def pm(stat: dict[str, Any]) -> str:
        if stat["mean"] is None:
            return "n/a"
        return f"{stat['mean']:.4f}" + ("" if stat["se"] is None else f" ± {stat['se']:.4f}")

    lines = [f"{'metric':22s} {'learned':>20s} {'best Adam':>20s}"]
    for metric in agg["learned"]:
        lines.append(
            f"{metric:22s} {pm(agg['learned'][metric]):>20s} {pm(agg['adam_best'][metric]):>20s}"
        )
    wins = agg["win_rate"]
    lines.append(
        f"win rate vs best Adam (mean / last train loss): {wins['mean_train_loss']:.2f} / "
        f"{wins['last_train_loss']:.2f}"
    )
    points = ", ".join(f"@{p['step']} {pm(p)}" for p in agg["speedup"]["checkpoints"])
    lines.append(f"speedup over Adam: {points}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--compare" or a.startswith("--compare=") for a in argv):
        from metatrain.generalisation.cli import compare_main

        return compare_main(argv)
    if any(a == "--suite" or a.startswith("--suite=") for a in argv):
        from metatrain.generalisation.cli import main as suite_main

        return suite_main(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lozoo").setLevel(logging.INFO)
    import zoo

    try:
        cfg = config_from_args(args).validate()
        result = evaluate(cfg, command=shlex.join(["python", "-m", "metatrain.eval", *argv]))
        print(_summary(result.report))
        print(
            f"wrote {', '.join(str(p) for p in result.files.values())} "
            f"in {result.report['runtime_s']:.1f} s"
        )
        if result.entry is not None:
            print(f"published {result.entry.ref} to {result.entry.path}")
    except (ValueError, FileNotFoundError, zoo.ZooError) as err:
        message = " ".join(str(err).split())  # one line, whatever the source
        print(f"python -m metatrain.eval: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
