"""``python -m metatrain.eval --suite generalisation --optimizer REF ...``: the front door.

``python -m metatrain.eval --compare DIR [DIR ...]`` compares finished suite reports
(:mod:`.compare`); its parser lives here too.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import textwrap

from tasks.heldout import PROBLEMS

from .config import ABLATION_AXES, SCHEDULES, SuiteConfig

__all__ = ["build_compare_parser", "build_parser", "compare_main", "main"]

_D = SuiteConfig(optimizer="")
SUITES = ("generalisation",)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _list(kind):
    def parse(text: str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            return [kind(p) for p in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated values, got {text!r}"
            ) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    problems = "\n".join(f"  {p.name}: {p.title}, {p.steps} steps" for p in PROBLEMS.values())
    p = _Parser(
        prog="python -m metatrain.eval --suite generalisation",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Tune an optimizer and AdamW the same way on held-out real problems (lr grid × "
            "{constant, cosine} × weight decay {0, 0.01}, best by final train loss, re-run on "
            "every seed) and report losses, accuracies, divergence, the speedup over AdamW and "
            "IQMs with bootstrap CIs (rliable). Runs are cached on disk.",
            78,
        )
        + "\n\nproblems:\n"
        + problems,
    )
    add = p.add_argument
    add("--suite", choices=SUITES, required=True, help="the benchmark suite to run")
    add(
        "--optimizer",
        required=True,
        metavar="REF",
        help="adamw, muon, sgd, a zoo reference (small_fc_lopt/mlp_mnist[:1.0.0]), a "
        "meta-training run directory or a .safetensors file",
    )
    add(
        "--problems",
        type=_list(str),
        default=None,
        metavar="P,..",
        help="subset of problems (default: all)",
    )
    add(
        "--seeds",
        type=int,
        default=_D.seeds,
        metavar="S",
        help="seeds of the tuned config (default: %(default)s)",
    )
    add(
        "--lr-points",
        type=int,
        default=_D.lr_points,
        metavar="N",
        help="lr grid size: N half-decade values around the optimizer's centre (AdamW and Muon "
        "3e-3, SGD 0.03, learned 1.0) (default: %(default)s)",
    )
    add(
        "--lrs",
        type=_list(float),
        default=None,
        metavar="LR,..",
        help="explicit lr grid of the evaluated optimizer (overrides --lr-points for it; "
        "AdamW, the reference, keeps its own grid unless it is the one evaluated)",
    )
    add(
        "--schedules",
        type=_list(str),
        default=None,
        metavar="S,..",
        help=f"schedules to tune over (default: {','.join(SCHEDULES)})",
    )
    add(
        "--weight-decays",
        type=_list(float),
        default=None,
        metavar="WD,..",
        help="weight decays to tune over (default: 0,0.01)",
    )
    add(
        "--steps-scale",
        type=float,
        default=_D.steps_scale,
        metavar="X",
        help="multiply every problem's steps (reduced settings; default: %(default)s)",
    )
    add(
        "--ablate",
        type=_list(str),
        default=None,
        metavar="AXES",
        help=f"report the best config per value of these axes too: {','.join(ABLATION_AXES)}",
    )
    add(
        "--max-time",
        type=float,
        default=_D.max_time,
        metavar="SEC",
        help="stop after SEC seconds and report the problems finished (0: no limit; finished "
        "runs stay cached, so a rerun continues)",
    )
    add(
        "--out",
        default=None,
        metavar="DIR",
        help="output directory, never overwritten (default: runs/suite-<time>)",
    )
    add(
        "--publish",
        default=None,
        metavar="NAME",
        help="add the results to the zoo card of NAME (learned optimizers)",
    )
    add("--cache-dir", default=None, metavar="DIR", help="run cache (default: $LOZOO_CACHE/suite)")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    add(
        "--threads",
        type=int,
        default=_D.threads,
        metavar="N",
        help="torch threads (default: torch's)",
    )
    return p


def build_compare_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m metatrain.eval",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Compare finished generalisation-suite reports: one Markdown table (per problem the "
            "tuned AdamW reference, then every report's optimizer: best config, final train and "
            "test loss mean ± sd over seeds, test accuracy, diverged seeds, losses over AdamW's) "
            "and, for every optimizer that is not a --baseline, the goal checks: never diverges; "
            "final train loss below tuned AdamW's on >= 3 of the 4 core problems; test loss "
            "within 5 % of AdamW's on all; wins against each --baseline. Refuses reports run "
            "with different settings unless --allow-mixed.",
            78,
        ),
    )
    add = p.add_argument
    add(
        "--compare",
        nargs="+",
        required=True,
        metavar="DIR",
        help="suite report directories (the --out of --suite generalisation runs) or their "
        "suite.json files, in the order of the table's rows",
    )
    add(
        "--suite",
        choices=SUITES,
        default="generalisation",
        help="the benchmark the reports come from (default: %(default)s)",
    )
    add(
        "--baseline",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME",
        help="optimizers compared against rather than judged (e.g. muon): an optimizer name "
        "of a compared report or its directory",
    )
    add(
        "--problems",
        type=_list(str),
        default=None,
        metavar="P,..",
        help="the problems to show (default: every problem all reports have); the goals count "
        "only the core four",
    )
    add(
        "--allow-mixed",
        action="store_true",
        help="compare reports with different steps, seeds, tuning axes or AdamW reference "
        "(the differences are listed under the table)",
    )
    add("--out", default=None, metavar="FILE.md", help="also write the Markdown to FILE.md")
    add(
        "--check",
        action="store_true",
        help="exit 1 (after printing the table) when any judged optimizer misses or leaves open "
        "a goal, including fewer than 2 wins against a --baseline; list them on stderr",
    )
    return p


def compare_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_compare_parser().parse_args(argv)
    from lopt.files import atomic_write

    from .compare import compare_reports

    try:
        result = compare_reports(
            args.compare,
            baselines=args.baseline,
            problems=args.problems,
            allow_mixed=args.allow_mixed,
        )
        if args.out:
            atomic_write(args.out, result.markdown)
    except (ValueError, FileNotFoundError, ImportError, OSError) as err:
        message = " ".join(str(err).split())
        print(f"python -m metatrain.eval: error: {message}", file=sys.stderr)
        return 2
    print(result.markdown, end="")
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    unmet = result.unmet() if args.check else []
    if unmet:
        print(f"python -m metatrain.eval: goals not met: {'; '.join(unmet)}", file=sys.stderr)
        return 1
    return 0


def config_from_args(args: argparse.Namespace) -> SuiteConfig:
    return SuiteConfig(
        optimizer=args.optimizer,
        problems=tuple(args.problems or ()),
        seeds=args.seeds,
        lr_points=args.lr_points,
        lrs=tuple(args.lrs or ()),
        schedules=tuple(args.schedules) if args.schedules else SCHEDULES,
        weight_decays=tuple(args.weight_decays)
        if args.weight_decays is not None
        else _D.weight_decays,
        steps_scale=args.steps_scale,
        ablate=tuple(args.ablate or ()),
        max_time=args.max_time,
        out=args.out,
        publish=args.publish,
        cache_dir=args.cache_dir,
        progress=args.progress,
        threads=args.threads,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lozoo").setLevel(logging.INFO)
    import zoo

    from .report import markdown
    from .suite import evaluate_suite

    try:
        result = evaluate_suite(
            config_from_args(args),
            command=shlex.join(["python", "-m", "metatrain.eval", *argv]),
        )
    except (ValueError, FileNotFoundError, ImportError, zoo.ZooError) as err:
        message = " ".join(str(err).split())
        print(f"python -m metatrain.eval: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (finished runs are cached)", file=sys.stderr)
        return 130
    report = result.report
    print(markdown(report))
    runs = report["runs"]
    print(
        f"wrote {result.out_dir} ({len(result.files)} files) in {report['runtime_s']:.1f} s; "
        f"{runs['computed']} runs computed, {runs['reused_from_cache']} from the cache"
    )
    if result.entry is not None:
        print(f"published {result.entry.ref} to {result.entry.path}")
    return 0
