"""Generate ``notebooks/*.ipynb`` (without outputs) from the cell sources below.

    python scripts/make_notebooks.py            # rewrite the notebooks
    python scripts/make_notebooks.py --check    # exit 1 if a notebook differs from its source

Notebooks are written from here so that they stay reviewable as plain Python and never carry
outputs into git. Every notebook reads ``LOZOO_NB_SMALL=1`` (set by ``tests/test_notebooks.py``
in CI) to run the same code on smaller settings.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
    return new_code_cell(textwrap.dedent(text).strip())


SETTINGS = """
    import os

    # CI sets LOZOO_NB_SMALL=1: the same code on small settings (seconds, not minutes).
    SMALL = os.environ.get("LOZOO_NB_SMALL") == "1"
"""

QUICKSTART = [
    md("""
        # Quickstart: a learned optimizer from the zoo

        Load `small_fc_lopt/mlp_mnist` from the zoo, train a small MLP on real MNIST digits
        with it, next to AdamW, and compare the curves. `lopt.SmallFCLOpt` is a drop-in
        `torch.optim` optimizer: the training loop is the usual one.
    """),
    code(
        SETTINGS
        + """
    STEPS = 60 if SMALL else 500
    OPTIMIZER = "small_fc_lopt/mlp_mnist"  # a zoo reference or a .safetensors path
    """
    ),
    md("""
        ## The zoo entry

        Entries are versioned and hashed; the card says how the weights were trained and,
        when published with an evaluation, how they compare with a tuned Adam.
    """),
    code("""
        from IPython.display import Markdown

        import zoo

        entry = zoo.load(OPTIMIZER)  # verifies the hashes before anything is used
        print(entry.ref, "from", entry.path)
        card = entry.card.split("---\\n", 2)[-1]  # the card without its YAML front matter
        Markdown("\\n".join(line for line in card.splitlines() if not line.startswith("![")))
    """),
    md("""
        ## Data and model

        8×8 MNIST digits from the `mlp_mnist` task family (offline data), batches of 128.
        Both optimizers start from the same weights and see the same batches.
    """),
    code("""
        import torch
        from torch import nn

        import tasks
        from tasks.datasets import load_split

        family = tasks.get_family("mlp_mnist", image_sizes=8, depth=1, width=64, batch_size=128)
        task = family.make_task(family.sample_static(torch.Generator().manual_seed(0)))
        stream = task.batches("train", 1, 0)
        batches = [{k: v[0] for k, v in next(stream).items()} for _ in range(STEPS)]
        x_test, y_test = load_split("mnist", "test", 8)
        x_test = x_test.flatten(1)


        def make_model() -> nn.Module:
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    """),
    md("## Train with the learned optimizer and with AdamW"),
    code("""
        import lopt


        def train(make_optimizer):
            model = make_model()
            opt = make_optimizer(model.parameters())
            losses = []
            for batch in batches:
                loss = nn.functional.cross_entropy(model(batch["x"]), batch["y"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            with torch.no_grad():
                accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
            return losses, accuracy


        runs = {
            "learned (SmallFCLOpt)": train(lambda p: lopt.SmallFCLOpt(p, OPTIMIZER)),
            "AdamW lr=3e-3": train(lambda p: torch.optim.AdamW(p, lr=3e-3)),
        }
        for name, (losses, accuracy) in runs.items():
            tail = sum(losses[-20:]) / 20
            print(f"{name:22s} last-20 train loss {tail:.4f}   test accuracy {accuracy:.3f}")
    """),
    code("""
        import matplotlib.pyplot as plt

        from metatrain.evaluation import ema

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, (losses, _) in runs.items():
            ax.plot(ema(losses), label=name)
        ax.set(xlabel="step", ylabel="train loss (EMA 0.95)", yscale="log")
        ax.set_title(f"{entry.ref} vs AdamW, 8×8 MNIST MLP")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        plt.show()
    """),
    md("""
        One learning rate of AdamW on one task proves little. For a fair comparison — Adam
        tuned over a learning-rate grid, held-out tasks, several seeds, mean ± standard error —
        run

        ```bash
        python -m metatrain.eval --optimizer small_fc_lopt/mlp_mnist --task-family mlp_mnist
        ```

        or see `02_metatrain_publish_evaluate.ipynb`.
    """),
]

METATRAIN = [
    md("""
        # Meta-train a tiny optimizer with PES, evaluate it, publish it

        1. meta-train small_fc_lopt with PES on small 8×8 MNIST MLPs;
        2. evaluate it against Adam tuned over a learning-rate grid, on held-out tasks whose
           seeds are disjoint from meta-training;
        3. publish it to the zoo with the evaluation in its card, and use it.
    """),
    code(
        SETTINGS
        + """
    import time
    from pathlib import Path

    OUTER_STEPS = 6 if SMALL else 300
    GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # the default Adam grid
    EVAL = dict(
        num_tasks=2 if SMALL else 4,
        seeds=2 if SMALL else 3,
        steps=40 if SMALL else 500,
        adam_lrs=(1e-3, 1e-2, 1e-1) if SMALL else GRID,
    )
    # small MLPs: 8×8 digits, one hidden layer of 16-47 units, batches of 32-127
    TINY = {"image_sizes": [8], "depth": 1, "width": [16, 48], "batch_size": [32, 128]}
    WORK = Path("runs") / time.strftime("notebook-%Y%m%d-%H%M%S")
    NAME = "small_fc_lopt/notebook-demo"  # the zoo name to publish under
    """
    ),
    md("""
        ## 1. Meta-train

        PES over truncated unrolls: 4 task pairs, truncations of 10 inner steps, trajectory
        lengths log-uniform in [20, 200). From the command line:
        `python -m metatrain --task-family mlp_mnist --estimator pes ...`.
    """),
    code("""
        from metatrain import MetaTrainConfig, train

        cfg = MetaTrainConfig(
            task_family="mlp_mnist",
            task_option=TINY,
            estimator="pes",
            init_from="none",  # from scratch (the default, auto, starts from the bundled weights)
            num_estimators=1,
            resample_every=0,
            num_tasks=4,
            truncation_length=10,
            min_trajectory_length=20,
            trajectory_length=200,
            outer_steps=OUTER_STEPS,
            outer_lr=3e-3,
            checkpoint_every=0,
            progress=not SMALL,
            out_dir=str(WORK / "metatrain"),
        )
        run = train(cfg)
        print(f"{len(run.meta_losses)} outer steps in {run.wall_time:.0f} s -> {run.run_dir}")
    """),
    code("""
        import matplotlib.pyplot as plt

        from metatrain.evaluation import ema

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(run.meta_losses, alpha=0.4, label="meta-loss")
        ax.plot(ema(run.meta_losses, 0.9), label="EMA 0.9")
        ax.set(xlabel="outer step", ylabel="mean normalised inner loss")
        ax.set_title("PES meta-training")
        ax.legend()
        plt.show()
    """),
    md("""
        ## 2. Evaluate against a tuned Adam

        For each held-out task and seed, the learned optimizer and Adam at every grid learning
        rate train from the same init on the same batches. The best Adam per task is the LR
        with the lowest final smoothed train loss. From the command line:
        `python -m metatrain.eval --optimizer RUN_DIR ...`.
    """),
    code("""
        from metatrain.evaluation import EvalConfig, evaluate

        result = evaluate(
            EvalConfig(
                optimizer=str(run.run_dir),
                task_family="mlp_mnist",
                task_option=TINY,
                out=str(WORK / "eval"),
                progress=not SMALL,
                **EVAL,
            )
        )
        agg = result.report["aggregate"]


        def pm(stat):
            return f"{stat['mean']:.4f} ± {stat['se'] or 0:.4f}"


        for metric, stat in agg["learned"].items():
            print(f"{metric:20s} learned {pm(stat)}   best Adam {pm(agg['adam_best'][metric])}")
        print("win rate (mean train loss):", agg["win_rate"]["mean_train_loss"])
        print("held-out seeds:", result.report["seeds"]["disjoint"]["check"])
    """),
    code("""
        from IPython.display import Image, display

        display(Image(filename=str(result.files["curves"])))
        display(Image(filename=str(result.files["speedup"])))
    """),
    md("""
        A run this short rarely beats a tuned Adam. The `--quick` preset
        (`python -m metatrain --task-family mlp_mnist --quick`: 800 outer steps with 8 task
        pairs, about 10 CPU-minutes) reached a lower training loss than the best Adam on all 4
        held-out tasks of this family in our runs; evaluate it here by setting
        `optimizer=` to its run directory.

        ## 3. Publish with the evaluation, then use it

        `publish_with_evaluation` puts the weights into the zoo (`$LOZOO_ZOO`, else the user
        cache) with the metrics table in the card and the figures and `eval.json` attached —
        the same code path as `python -m metatrain.eval ... --publish NAME`.
    """),
    code("""
        from IPython.display import Markdown

        from metatrain.evaluation import publish_with_evaluation

        entry = publish_with_evaluation(result, NAME)
        print(entry.ref, "->", entry.path)
        card = entry.card
        section = card[card.index("## Evaluation") : card.index("## Optimizer config")]
        Markdown("\\n".join(line for line in section.splitlines() if not line.startswith("![")))
    """),
    code("""
        import torch

        import lopt

        model = torch.nn.Linear(64, 10)
        opt = lopt.SmallFCLOpt(model.parameters(), entry.ref)
        opt.meta_weights_info
    """),
]

INSIDE = [
    md("""
        # Inside a learned optimizer

        small_fc_lopt updates every parameter element with a tiny MLP. Its 39 inputs are 28
        per-element features (gradient, parameter, momenta at 3 decays, RMS, Adafactor row
        and column statistics, ...) normalised per tensor, plus 11 time features; its 2
        outputs, a direction d and a magnitude m, make the step
        `step_mult · d · exp(exp_mult · m)`. Here a small MLP is trained with the functional
        core while we watch the step sizes, the features and the outputs
        (`lopt.tensor_features`).
    """),
    code(
        SETTINGS
        + """
    STEPS = 40 if SMALL else 400
    OPTIMIZER = os.environ.get("LOZOO_NB_OPTIMIZER", "small_fc_lopt/mlp_mnist")
    SNAPSHOTS = sorted({0, STEPS // 10, STEPS - 1})  # steps whose full features are kept
    """
    ),
    code("""
        import torch

        import lopt

        theta, cfg, source = lopt.resolve_weights(OPTIMIZER, None)
        momentum, rms, adafactor = lopt.effective_decays(theta, cfg)
        print(source["source"], f"hidden={cfg.hidden_size}, step_mult={cfg.step_mult}")
        print("learned decays: momentum", momentum.numpy().round(4))
        print("                rms", rms.numpy().round(4), "adafactor", adafactor.numpy().round(4))
    """),
    md("""
        ## Train a 2-layer MNIST MLP with the functional core, recording as we go

        `lopt.tensor_features(θ, p, g, state, t, cfg)` returns, for one tensor, exactly what
        this step's update sees and does: the 39 normalised inputs, the direction, the
        magnitude and the step. `lopt.update` then applies the step.
    """),
    code("""
        import tasks

        family = tasks.get_family(
            "mlp_mnist", image_sizes=8, depth=2, width=32, batch_size=128, activations="relu"
        )
        gen = torch.Generator().manual_seed(0)
        static = family.sample_static(gen)
        lane = family.sample_lane(gen, static)
        task = family.make_task(static)
        params = task.init(gen, lane)
        state = lopt.init_state(params, cfg)
        stream = task.batches("train", 1, 0)
        grad_fn = torch.func.grad_and_value(task.loss)
        quantiles = torch.tensor([0.05, 0.5, 0.95])

        losses, step_q, snapshots = [], {name: [] for name in params}, {}
        for k in range(STEPS):
            batch = {key: v[0] for key, v in next(stream).items()}
            grads, loss = grad_fn(params, batch, lane)
            losses.append(loss.item())
            for name, p in params.items():
                tensor_state = state["tensors"][name]
                out = lopt.tensor_features(theta, p, grads[name], tensor_state, state["t"], cfg)
                step_q[name].append(torch.quantile(out["step"].abs().flatten(), quantiles))
                if k in SNAPSHOTS:
                    snapshots.setdefault(k, {})[name] = out
            params, state = lopt.update(theta, state, params, grads, cfg)
        print(f"train loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f} after {STEPS} steps")
    """),
    md("""
        ## Step sizes over training

        Median |step| per tensor with its 5–95 % range: how far the optimizer moves each
        weight, and how that changes as training goes on.
    """),
    code("""
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for name, qs in step_q.items():
            q = torch.stack(qs)
            (line,) = axes[0].plot(q[:, 1], label=name)
            color = line.get_color()
            axes[0].fill_between(range(len(q)), q[:, 0], q[:, 2], alpha=0.15, color=color)
        axes[0].set(yscale="log", xlabel="step", ylabel="|step| (median, 5-95 %)")
        axes[0].set_title("learned step sizes per tensor")
        axes[0].legend(fontsize=8)
        for k, tensors in snapshots.items():
            steps = torch.cat([o["step"].abs().flatten() for o in tensors.values()])
            log_steps = torch.log10(steps + 1e-12).numpy()
            axes[1].hist(log_steps, bins=60, alpha=0.5, label=f"step {k}")
        axes[1].set(xlabel="log10 |step|", ylabel="elements", title="step-size distribution")
        axes[1].legend()
        plt.show()
    """),
    md("""
        ## The 39 inputs of the MLP

        Distributions over all elements of all tensors at the first and the last snapshot.
        Per-element features are normalised per tensor to unit mean square; the 11 time
        features `tanh(t/τ − 1)` are the same for every element.
    """),
    code("""
        from lopt.config import TIME_SCALES


        def three(name: str) -> list[str]:  # one feature per decay
            return [f"{name}{i}" for i in range(3)]


        FEATURES = [
            *["g", "p", *three("m"), "v", *three("m/√v"), "1/√v", *three("g·fac")],
            *[*three("row"), *three("col"), *three("1/√row"), *three("1/√col"), *three("m·fac")],
            *[f"t/{tau:g}" for tau in TIME_SCALES],
        ]
        assert len(FEATURES) == 39

        first, last = min(snapshots), max(snapshots)
        fig, axes = plt.subplots(2, 1, figsize=(14, 7), sharex=True)
        for ax, k in zip(axes, (first, last)):
            x = torch.cat([o["features"].reshape(-1, 39) for o in snapshots[k].values()])
            ax.boxplot([x[:, j].numpy() for j in range(39)], showfliers=False)
            ax.axhline(0, color="gray", lw=0.5)
            ax.set(ylabel="normalised value", title=f"MLP inputs at step {k}")
        axes[-1].set_xticks(range(1, 40), FEATURES, rotation=90)
        fig.tight_layout()
        plt.show()
    """),
    md("""
        ## The two outputs

        Direction d and magnitude m of every element; the step is
        `step_mult · d · exp(exp_mult · m)`.
    """),
    code("""
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
        for ax, key in zip(axes, ("direction", "magnitude")):
            for k in (first, last):
                v = torch.cat([o[key].flatten() for o in snapshots[k].values()])
                ax.hist(v.numpy(), bins=60, alpha=0.5, label=f"step {k}")
            ax.set(xlabel=key, ylabel="elements")
            ax.legend()
        plt.show()
    """),
]

SUITE = [
    md("""
        # The generalisation suite: held-out problems, tuned baselines, the PyLO ablation

        `python -m metatrain.eval --suite generalisation --optimizer REF` tunes an optimizer
        and AdamW the same way on fixed real-data problems no lozoo optimizer was meta-trained
        on (scikit-learn digits, Fashion-MNIST MLP and convnet, a character-level transformer
        on Debian's fortunes, a 10× longer digits run) and reports final losses, accuracies,
        divergence, the speedup over tuned AdamW and IQMs with bootstrap confidence intervals.
        This notebook runs it from Python on a reduced setting (fewer problems and steps)
        for the bundled learned optimizer, with the schedule / weight-decay ablation.
    """),
    code(
        SETTINGS
        + """
    import tempfile
    from pathlib import Path

    OPTIMIZER = "small_fc_lopt/mlp_mnist"  # also: adamw, muon, sgd, a run dir, a .safetensors
    PROBLEMS = ("digits_mlp", "fmnist_mlp") + (() if SMALL else ("fmnist_conv",))
    STEPS_SCALE = 0.02 if SMALL else 0.25  # fraction of each problem's steps
    SEEDS = 2 if SMALL else 3
    LR_POINTS = 2 if SMALL else 3
    WORK = Path(tempfile.mkdtemp(prefix="lozoo-suite-"))
    """
    ),
    md("""
        ## Run it

        Every run is cached on disk (here in a temporary directory; by default under the
        user cache), keyed by problem, config, seed, steps and torch version, so a second
        evaluation, or another optimizer against the same AdamW, reuses them.
    """),
    code("""
        from metatrain.generalisation import SuiteConfig, evaluate_suite

        cfg = SuiteConfig(
            OPTIMIZER,
            problems=PROBLEMS,
            seeds=SEEDS,
            lr_points=LR_POINTS,
            steps_scale=STEPS_SCALE,
            ablate=("schedule", "weight_decay"),
            out=str(WORK / "report"),
            cache_dir=str(WORK / "cache"),
            progress=False,
            # one torch thread per run: these models are too small to gain from more, and
            # OpenMP threads that wait on a busy core slowed this cell 9x on a shared machine
            threads=1,
        )
        result = evaluate_suite(cfg)
        runs = result.report["runs"]
        print(f"{runs['computed']} runs in {result.report['runtime_s']:.0f} s -> {result.out_dir}")
    """),
    md("""
        ## The table

        Per problem: the best (lr, schedule, weight decay) of each optimizer, the smoothed
        train loss at 25/50/75/100 % of the steps, final train/test loss and accuracy,
        diverged seeds and the speedup over tuned AdamW; then the IQMs and the ablation.
    """),
    code("""
        from IPython.display import Image, Markdown, display

        display(Markdown((result.out_dir / "table.md").read_text()))
    """),
    md("""
        ## Figures

        The summary (each seed's loss relative to AdamW and speedup, the IQM with its 95 %
        CI, the ablation) and one learning-curve figure per problem.
    """),
    code("""
        display(Image(filename=str(result.out_dir / "summary.png")))
        for name in PROBLEMS:
            display(Image(filename=str(result.out_dir / f"curves_{name}.png")))
    """),
    md("""
        ## The same from the command line

        ```bash
        python -m metatrain.eval --suite generalisation --optimizer small_fc_lopt/mlp_mnist \\
            --ablate schedule,weight_decay --out runs/suite-lopt
        ```
    """),
    code("""
        agg = result.report["aggregate"]
        for key in ("normalised_final_loss", "speedup"):
            lo, hi = agg[key]["ci95"]
            print(f"IQM {key}: {agg[key]['iqm']:.3g} [{lo:.3g}, {hi:.3g}]")
    """),
]

NOTEBOOKS_SPEC = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_metatrain_publish_evaluate.ipynb": METATRAIN,
    "03_inside_the_optimizer.ipynb": INSIDE,
    "04_generalisation_suite.ipynb": SUITE,
}


def build(cells: list) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids: regenerating changes nothing
    nbformat.validate(nb)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for name, cells in NOTEBOOKS_SPEC.items():
        text = nbformat.writes(build(cells)) + "\n"
        path = NOTEBOOKS / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python scripts/make_notebooks.py")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
