"""Publish a meta-training run, with one or more evaluations, as a zoo entry with a full card.

    python scripts/publish_bundled.py RUN_DIR EVAL_DIR [EVAL_DIR ...] \\
        --name small_fc_lopt/mlp_mnist --root zoo/bundled --description NOTES.md

This is how the bundled default optimizer was published: ``metatrain.eval --publish`` records one
evaluation; this script records several (e.g. held-out tasks of the training family and a
transfer family) in one entry, next to the run's exact command, seed, config and wall time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lopt
import zoo
from metatrain.evaluation.publish import card_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("eval_dirs", type=Path, nargs="+")
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", default=None)
    parser.add_argument("--root", type=Path, default=None, help="zoo root (default: user zoo)")
    parser.add_argument("--description", type=Path, help="markdown put at the top of the card")
    args = parser.parse_args()

    theta, cfg = lopt.load_theta(args.run_dir / "theta.safetensors")
    record = json.loads((args.run_dir / "config.json").read_text())
    summary = json.loads((args.run_dir / "summary.json").read_text())
    metrics: dict[str, dict[str, str]] = {}
    evaluations, attachments = [], {}
    for eval_dir in args.eval_dirs:
        report = json.loads((eval_dir / "eval.json").read_text())
        if report["config"]["optimizer"]["theta_sha256"] != lopt.theta_sha256(theta):
            raise SystemExit(f"error: {eval_dir} evaluated other weights than {args.run_dir}")
        family = report["config"]["task_family"]
        label = family + ("_canonical" if report["config"]["task_options"].get("canonical") else "")
        if any(name.startswith(label + "_") for name in attachments):
            raise SystemExit(f"error: two evaluations of {label}; pass each setting once")
        for row, values in card_metrics(report).items():
            metrics[f"{label}: {row}"] = values
        evaluations.append({**report["config"], "aggregate": report["aggregate"]})
        for kind in ("curves", "speedup"):
            attachments[f"{label}_{kind}.png"] = eval_dir / f"{kind}.png"
        attachments[f"{label}_eval.json"] = eval_dir / "eval.json"
    meta = {
        "task_family": record["metatrain"]["task_family"],
        "command": record["command"],
        "seed": record["metatrain"]["seed"],
        "outer_steps": summary["outer_steps"],
        "wall_time_s": round(summary["wall_time_s"], 1),
        "total_inner_steps": summary["total_inner_steps"],
        "final_meta_loss": summary["final_meta_loss"],
        # what actually ran: --max-time may stop a run before its planned --outer-steps
        "meta_training": {
            **record["metatrain"],
            "outer_steps": summary["outer_steps"],
            "outer_steps_planned": summary["outer_steps_planned"],
        },
        "metrics": metrics,
        "evaluations": evaluations,
    }
    if args.description:
        meta["description"] = args.description.read_text()
    entry = zoo.publish(
        theta, cfg, args.name, version=args.version, meta=meta, attachments=attachments,
        root=args.root,
    )  # fmt: skip
    print(f"published {entry.ref} to {entry.path}")


if __name__ == "__main__":
    main()
