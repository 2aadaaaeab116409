"""Held-out quality during meta-training: a cheap evaluation of θ at every checkpoint.

Meta-loss curves say how well θ does on the tasks it trains on, with resets and staggered
trajectories mixed in; they do not say whether the optimizer got better on tasks it never saw.
At the start of a run and after every checkpoint, :class:`HeldoutMonitor` trains a few held-out
tasks per family with the current θ for ``--heldout-steps`` steps and compares the result with
Adam on the same tasks, inits and batches (Adam's best of a 3-point learning-rate grid, computed
once per run and cached in ``heldout_adam.json``). One line per evaluation goes to
``RUN_DIR/heldout.jsonl`` and to TensorBoard under ``heldout/``, so "quality against
meta-training time" is a curve of every run. The θ with the best held-out ratio so far is kept
as ``RUN_DIR/theta_best.safetensors`` (by the validation-loss ratio instead when the run
meta-trains on a validation split, ``--meta-loss-split``).

Held-out tasks are drawn from the run's families with the run's task options, except the
weight-rescaling augmentation (``reparam_scale``): quality is measured on the tasks as a user
meets them. Their seeds come from the evaluation namespace with their own evaluation seed
(:data:`HELDOUT_EVAL_SEED`), checked disjoint from the run's seeds and different from those
``python -m metatrain.eval`` uses by default.

Per task the score is the final train loss smoothed over the last tenth of the steps; the
reported ratio is the mean over tasks of learned / Adam (below 1: better than Adam). A task
counts as diverged when its score is non-finite or more than 5 % above its first loss.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import lopt
import tasks
from lopt.tree import tree_map

from .config import MetaTrainConfig

__all__ = [
    "HELDOUT_ADAM_LRS",
    "HELDOUT_EVAL_SEED",
    "HELDOUT_STEP_KEY",
    "HeldoutMonitor",
    "final_score",
    "plot_curve",
    "read_curve",
]

HELDOUT_EVAL_SEED = 0x68656C64  # "held": differs from metatrain.eval's default seeds
HELDOUT_ADAM_LRS = (1e-3, 3e-3, 1e-2)
BASELINE_FILE = "heldout_adam.json"
CURVE_FILE = "heldout.jsonl"
BEST_FILE = "theta_best.safetensors"
HELDOUT_STEP_KEY = "lozoo.heldout.step"
"""Metadata key of :data:`BEST_FILE`: the outer step of the evaluation that kept it."""


def final_score(train_loss: torch.Tensor) -> float:
    """Mean train loss over the last tenth of the steps (at least one); inf if non-finite."""
    k = train_loss.shape[-1]
    tail = train_loss[..., k - max(1, k // 10) :]
    value = float(tail.mean())
    return value if math.isfinite(value) else math.inf


@dataclass
class _HeldoutTask:
    family: str
    label: str
    task: Any
    lane: dict[str, torch.Tensor]
    inits: dict[str, torch.Tensor]
    data_seed: int
    val_batch: dict[str, torch.Tensor]


class HeldoutMonitor:
    """Evaluates θ on ``cfg.heldout_tasks`` held-out tasks per family; see the module doc."""

    def __init__(self, cfg: MetaTrainConfig, run_dir: Path) -> None:
        from .evaluation.runner import validation_batch
        from .evaluation.seeds import make_eval_seeds

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.steps = cfg.heldout_steps
        families = cfg.families
        seeds = make_eval_seeds(
            HELDOUT_EVAL_SEED, cfg.heldout_tasks * len(families), 1, cfg.to_dict()
        )
        self.tasks: list[_HeldoutTask] = []
        for i, task_seeds in enumerate(seeds.tasks):
            name = families[i % len(families)]
            options = dict(cfg.family_options(name))
            options.pop(tasks.REPARAM_KEY, None)  # measure the tasks as a user meets them
            family = tasks.get_family(name, **options)
            gen = torch.Generator().manual_seed(task_seeds.task)
            static = family.sample_static(gen)
            lane = family.sample_lane(gen, static)
            task = family.make_task(static)
            init = task.init(torch.Generator().manual_seed(task_seeds.inits[0]), lane)
            self.tasks.append(
                _HeldoutTask(
                    family=name,
                    label=f"{name}#{i // len(families)}",
                    task=task,
                    lane=lane,
                    inits={k: v.unsqueeze(0) for k, v in init.items()},
                    data_seed=task_seeds.data,
                    val_batch=validation_batch(task, task_seeds.valid, 4),
                )
            )
        self.eval_seconds = 0.0
        self.best_ratio = math.inf
        # θ is kept by the quantity the run meta-trains for: train loss, or validation loss
        # under a validation meta-objective (--meta-loss-split)
        self.selection_key = (
            "heldout_ratio" if cfg.meta_loss_split == "train" else "heldout_valid_ratio"
        )
        self.adam = self._adam_baseline()

    # -- one held-out training run per task ---------------------------------------------------
    def _train(self, item: _HeldoutTask, optimizer) -> tuple[torch.Tensor, torch.Tensor]:
        from .evaluation.runner import train_task

        curves = train_task(
            item.task,
            item.lane,
            item.inits,
            item.data_seed,
            item.val_batch,
            [optimizer],
            self.steps,
            [self.steps],
        )
        return curves.train_loss, curves.val_loss[..., -1]

    def _adam_baseline(self) -> list[dict[str, float]]:
        """Best Adam of :data:`HELDOUT_ADAM_LRS` per task, computed once and cached."""
        from .evaluation.optimizers import AdamGrid

        path = self.run_dir / BASELINE_FILE
        labels = [t.label for t in self.tasks]
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("labels") == labels and cached.get("steps") == self.steps:
                return cached["tasks"]
        start = time.perf_counter()
        out = []
        for item in self.tasks:
            train_loss, val_loss = self._train(item, AdamGrid(HELDOUT_ADAM_LRS))
            scores = [final_score(train_loss[i, 0]) for i in range(len(HELDOUT_ADAM_LRS))]
            best = min(range(len(scores)), key=scores.__getitem__)
            out.append(
                {
                    "lr": HELDOUT_ADAM_LRS[best],
                    "train_loss": scores[best],
                    "valid_loss": float(val_loss[best, 0]),
                    "first_loss": float(train_loss[best, 0, 0]),
                }
            )
        record = {"labels": labels, "steps": self.steps, "lrs": HELDOUT_ADAM_LRS, "tasks": out}
        path.write_text(json.dumps(record, indent=2))
        self.eval_seconds += time.perf_counter() - start
        return out

    # -- the per-checkpoint evaluation ----------------------------------------------------------
    @torch.no_grad()
    def _train_learned(
        self, item: _HeldoutTask, theta_flat: torch.Tensor, lopt_config: Any
    ) -> tuple[torch.Tensor, float]:
        """θ's train losses ``[K]`` and final validation loss on one task.

        Runs through the meta-trainer's own lane step (one lane), so an architecture's fused
        lane kernel serves here too (``--lopt-backend``); the batches are the ones Adam saw.
        """
        from .unroll import TaskLanes

        arch = lopt.architecture_of(lopt_config)
        lanes = TaskLanes(
            item.task, None, item.task.static, lopt_config, 1, item.data_seed,
            lopt_backend=self.cfg.lopt_backend,
        )  # fmt: skip
        params = {k: v.clone() for k, v in item.inits.items()}  # [1, ...]
        zeros = arch.init_state({k: v[0] for k, v in params.items()}, lopt_config)
        state = {
            "params": params,
            "opt_state": tree_map(lambda x: x.unsqueeze(0).clone(), zeros),
            "task_cfg": {k: v.unsqueeze(0) for k, v in item.lane.items()},
        }
        theta_lanes = theta_flat.detach().reshape(1, -1).float()
        losses = torch.empty(self.steps)
        for k in range(self.steps):
            state, loss = lanes.step(theta_lanes, state, lanes.next_batch())
            losses[k] = loss[0]
        final = {k: v[0] for k, v in state["params"].items()}
        valid = float(item.task.metrics(final, item.val_batch, item.lane)["loss"])
        return losses, valid

    def evaluate(self, theta_flat: torch.Tensor, lopt_config: Any) -> dict[str, float]:
        """Held-out metrics of θ: means over tasks, per family, and the ratio to Adam."""
        start = time.perf_counter()
        rows = []
        for item, adam in zip(self.tasks, self.adam):
            train_loss, valid = self._train_learned(item, theta_flat, lopt_config)
            score = final_score(train_loss)
            # diverged: non-finite, or clearly above where it started (noise-level ties are not)
            diverged = not math.isfinite(score) or score > 1.05 * float(train_loss[0])
            rows.append((item.family, score, valid, adam, diverged))
        ratios = [min(s / max(a["train_loss"], 1e-12), 1e6) for _, s, _, a, _ in rows]
        valid_ratios = [
            min(v / max(a["valid_loss"], 1e-12), 1e6) if math.isfinite(v) else 1e6
            for _, _, v, a, _ in rows
        ]
        metrics = {
            "heldout_train_loss": _mean([s for _, s, _, _, _ in rows]),
            "heldout_valid_loss": _mean([v for _, _, v, _, _ in rows]),
            "heldout_adam_train_loss": _mean([a["train_loss"] for _, _, _, a, _ in rows]),
            "heldout_adam_valid_loss": _mean([a["valid_loss"] for _, _, _, a, _ in rows]),
            "heldout_ratio": _mean(ratios),
            "heldout_valid_ratio": _mean(valid_ratios),
            "heldout_diverged": float(sum(d for *_, d in rows)),
        }
        for name in self.cfg.families:
            mine = [r for r in rows if r[0] == name]
            metrics[f"heldout_{name}_train_loss"] = _mean([s for _, s, _, _, _ in mine])
            metrics[f"heldout_{name}_ratio"] = _mean(
                [min(s / max(a["train_loss"], 1e-12), 1e6) for _, s, _, a, _ in mine]
            )
        self.eval_seconds += time.perf_counter() - start
        metrics["heldout_eval_s"] = self.eval_seconds
        return metrics

    def record(
        self,
        step: int,
        elapsed: float,
        theta_flat: torch.Tensor,
        lopt_config: Any,
        writer: Any = None,
    ) -> dict[str, float]:
        """Evaluate, append to ``heldout.jsonl`` (and TensorBoard), keep the best θ."""
        metrics = self.evaluate(theta_flat, lopt_config)
        line = {"step": step, "elapsed_s": elapsed, **metrics}
        with open(self.run_dir / CURVE_FILE, "a") as fh:
            fh.write(json.dumps(line) + "\n")
        if writer is not None:
            for key, value in metrics.items():
                if math.isfinite(value):
                    writer.add_scalar("heldout/" + key.removeprefix("heldout_"), value, step)
        ratio = metrics[self.selection_key]
        if metrics["heldout_diverged"] == 0 and ratio < self.best_ratio:
            self.best_ratio = ratio
            theta = lopt.unflatten_theta(theta_flat.detach().clone(), lopt_config)
            lopt.save_theta(
                self.run_dir / BEST_FILE,
                {k: v.clone() for k, v in theta.items()},
                lopt_config,
                {
                    HELDOUT_STEP_KEY: str(step),
                    "lozoo.heldout.ratio": f"{ratio:.6g}",
                    "lozoo.heldout.selected_by": self.selection_key,
                },
            )
        return metrics

    def resume(self, start: int) -> None:
        """Drop curve lines past ``start`` (the resumed run redoes them) and recover the best."""
        path = self.run_dir / CURVE_FILE
        if not path.exists():
            return
        kept = []
        for raw in path.read_text().splitlines():
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if line["step"] <= start:
                kept.append(line)
        path.write_text("".join(json.dumps(x) + "\n" for x in kept))
        key = self.selection_key
        clean = [x[key] for x in kept if x.get("heldout_diverged", 1) == 0 and key in x]
        self.best_ratio = min(clean, default=math.inf)
        if kept:
            self.eval_seconds = kept[-1].get("heldout_eval_s", 0.0)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def read_curve(run_dir: str | Path) -> list[dict[str, float]]:
    """The held-out curve of a run: one dict per evaluation, in step order."""
    path = Path(run_dir) / CURVE_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir}: no {CURVE_FILE}; was the run made with --heldout-tasks 0?")
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return sorted(lines, key=lambda x: x["step"])


def plot_curve(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """``heldout.png``: held-out train loss (learned and Adam) and their ratio against
    meta-training wall time, one line per family plus the mean, and the mean ratio of the
    final validation losses (what a ``--meta-loss-split`` run keeps its best θ by)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = read_curve(run_dir)
    minutes = [x["elapsed_s"] / 60 for x in curve]
    families = sorted(
        k.removeprefix("heldout_").removesuffix("_ratio")
        for k in curve[0]
        if k.endswith("_ratio") and k != "heldout_ratio"
    )
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(minutes, [x["heldout_train_loss"] for x in curve], "o-", label="learned θ")
    left.plot(minutes, [x["heldout_adam_train_loss"] for x in curve], "--", label="best Adam")
    left.set(xlabel="meta-training wall time (min)", ylabel="held-out final train loss")
    left.set_yscale("log")
    left.legend()
    for name in families:
        right.plot(minutes, [x[f"heldout_{name}_ratio"] for x in curve], ".-", label=name)
    right.plot(minutes, [x["heldout_ratio"] for x in curve], "ko-", label="mean")
    if all("heldout_valid_ratio" in x for x in curve):  # curves of before 2026-11-30 lack it
        valid = [x["heldout_valid_ratio"] for x in curve]
        right.plot(minutes, valid, "k--", label="mean, validation loss")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set(xlabel="meta-training wall time (min)", ylabel="learned / Adam (lower is better)")
    right.set_yscale("log")
    right.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "heldout.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m metatrain.heldout RUN_DIR``: print the curve and write RUN_DIR/heldout.png."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m metatrain.heldout", description=main.__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/heldout.png)")
    args = parser.parse_args(argv)
    try:
        curve = read_curve(args.run_dir)
    except ValueError as err:
        print(f"error: {err}")
        return 2
    print("step  minutes  train_loss  adam_loss  ratio  valid_ratio  diverged")
    for x in curve:
        print(
            f"{x['step']:>5} {x['elapsed_s'] / 60:8.1f} {x['heldout_train_loss']:11.4f} "
            f"{x['heldout_adam_train_loss']:10.4f} {x['heldout_ratio']:6.3f} "
            f"{x.get('heldout_valid_ratio', math.nan):12.3f} {int(x['heldout_diverged']):>9}"
        )
    print(f"wrote {plot_curve(args.run_dir, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
