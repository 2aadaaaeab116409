"""Publish a meta-training run with its held-out curve and generalisation-suite reports.

    python scripts/publish_suite_entry.py RUN_DIR SUITE_DIR [SUITE_DIR ...] \\
        --name celo2/mixture_8x8 --version 1.0.0 --root zoo/bundled --description NOTES.md

One entry, one card: the run's exact command, seed, wall time and config (from the run dir),
the quality-against-meta-training-time curve (``heldout.jsonl``, ``heldout.png``, written by
``python -m metatrain.heldout RUN_DIR``), and every suite report given (the first is the main
one; e.g. a reduced-setting run and a long-horizon run). Each suite report must have evaluated
exactly these weights: the same θ and, when the report records it, the same config.

``--weights FILE`` publishes another weights file of the run dir than its final θ, e.g.
``theta_best.safetensors`` (the θ of the best held-out evaluation; the entry records its step).

``--lopt-option KEY=VALUE`` (repeatable) publishes the run's θ under a changed config, for fields
that change how the rule is applied rather than what was learned (e.g. ``conv_mode=matrix`` for
Celo2: the meta-training tasks had no convolutions); the suites must have evaluated that config.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lopt
import zoo
from metatrain.config import key_value_option
from metatrain.evaluation.source import resolve_optimizer
from metatrain.generalisation.write import suite_card_metrics
from metatrain.heldout import BEST_FILE, HELDOUT_STEP_KEY, plot_curve, read_curve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("suite_dirs", type=Path, nargs="+")
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", default=None)
    parser.add_argument("--root", type=Path, default=None, help="zoo root (default: user zoo)")
    parser.add_argument("--description", type=Path, help="markdown put at the top of the card")
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="a weights file of the run dir to publish instead of its final θ, e.g. "
        f"{BEST_FILE} (the best held-out θ)",
    )
    parser.add_argument(
        "--lopt-option",
        type=key_value_option("--lopt-option"),
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="publish under the run's config with this field changed (repeatable)",
    )
    args = parser.parse_args(argv)

    try:
        source = resolve_optimizer(str(args.run_dir), args.weights)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    config = source.config
    if args.lopt_option:
        try:
            config = lopt.resolve_config(config, dict(args.lopt_option))
        except (TypeError, ValueError) as err:
            raise SystemExit(f"error: --lopt-option: {err}") from None
    meta = dict(source.provenance)
    if config != source.config:
        meta["config_changed_from_run"] = dict(args.lopt_option)
    record = json.loads((args.run_dir / "config.json").read_text())
    if record.get("init_from"):
        meta["init_from"] = record["init_from"]
    curve = read_curve(args.run_dir)
    if args.weights is not None:
        meta["weights_file"] = args.weights
        # the held-out monitor writes the step into the weights file it keeps
        step = lopt.weights.read_header(args.run_dir / args.weights).get(HELDOUT_STEP_KEY)
        if step is not None:
            meta["weights_step"] = int(step)
    metrics: dict[str, dict[str, str]] = {}
    for x in curve:
        row = {
            "learned final train loss": f"{x['heldout_train_loss']:.4g}",
            "best-Adam final train loss": f"{x['heldout_adam_train_loss']:.4g}",
            "learned / Adam": f"{x['heldout_ratio']:.3g}",
        }
        if "heldout_valid_ratio" in x:  # curves of before 2026-11-30 lack it
            row["learned / Adam, validation loss"] = f"{x['heldout_valid_ratio']:.3g}"
        row["diverged tasks"] = f"{int(x['heldout_diverged'])}"
        metrics[f"held-out at step {x['step']} ({x['elapsed_s'] / 60:.1f} min)"] = row
    attachments = {"heldout.jsonl": args.run_dir / "heldout.jsonl"}
    published = json.loads(config.to_json())  # as a suite's optimizer identity records it
    suites = []
    for i, suite_dir in enumerate(args.suite_dirs):
        report = json.loads((suite_dir / "suite.json").read_text())
        identity = report["config"]["optimizer_spec"]["identity"]
        if not isinstance(identity, dict) or identity.get("optimizer") != "lopt":
            raise SystemExit(
                f"error: {suite_dir} evaluated a baseline ({report['config']['optimizer']}), "
                f"not the learned weights of {args.run_dir}"
            )
        if identity.get("theta_sha256") != source.sha256:
            raise SystemExit(f"error: {suite_dir} evaluated other weights than {args.run_dir}")
        evaluated = identity.get("config")
        if evaluated is not None and evaluated != published:
            raise SystemExit(
                f"error: {suite_dir} evaluated these weights under another config than the one "
                f"published ({evaluated} vs {published}); pass the --lopt-option "
                "values that evaluation used"
            )
        label = "suite" if i == 0 else f"suite{i + 1}"
        metrics.update(suite_card_metrics(report, label, test_loss=True))
        suites.append(
            {
                "label": label,
                "command": report["command"],
                "steps_scale": report["config"]["steps_scale"],
                "seeds": report["config"]["seeds"],
                "report": f"{label}.json",
            }
        )
        attachments[f"{label}.json"] = suite_dir / "suite.json"
        for extra in ("table.md", "summary.png"):
            if (suite_dir / extra).is_file():
                attachments[f"{label}_{extra}"] = suite_dir / extra
        for png_path in sorted(suite_dir.glob("curves_*.png")):
            attachments[f"{label}_{png_path.name}"] = png_path
    # Drawn after every report passed its checks: a refused publish leaves the run dir as it was.
    attachments["heldout.png"] = plot_curve(args.run_dir)
    meta.update(metrics=metrics, generalisation_suite=suites)
    if args.description:
        meta["description"] = args.description.read_text()
    entry = zoo.publish(
        source.theta,
        config,
        args.name,
        version=args.version,
        meta=meta,
        attachments=attachments,
        root=args.root,
    )
    print(f"published {entry.ref} to {entry.path}")


if __name__ == "__main__":
    main()
