"""Typed meta-training configuration with CLI overrides.

Every field of :class:`MetaTrainConfig` is a command-line flag (``outer_lr`` → ``--outer-lr``);
its ``help`` metadata is the flag's documentation. ``--quick`` applies :data:`QUICK` first, so
explicit flags still win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .estimators import ESTIMATOR_NAMES
from .shaping import SHAPINGS
from .unroll import LOPT_BACKENDS, check_meta_split

EXECUTORS = ("auto", "serial", "ray")
RAY_MODES = ("sync", "async")


def lopt_architecture(config: Any):
    """The registry record of a learned-optimizer config (``lopt.architecture_of``)."""
    import lopt

    return lopt.architecture_of(config)


def parse_families(task_family: str) -> tuple[str, ...]:
    """The families of ``--task-family`` (a name or a comma-separated mixture), in order;
    raises ``ValueError`` naming an unknown or repeated family."""
    import tasks

    names = tuple(part.strip() for part in task_family.split(","))
    unknown = [n for n in names if n not in tasks.FAMILY_NAMES]
    if unknown or not all(names):
        raise ValueError(
            f"unknown task family {(unknown or [''])[0]!r}; valid names: "
            f"{', '.join(tasks.FAMILY_NAMES)} (a mixture is a comma-separated list of them, "
            f"got --task-family {task_family!r})"
        )
    if len(set(names)) != len(names):
        raise ValueError(
            f"--task-family {task_family!r} names a family twice; a mixture weights "
            "its families equally, so list each once"
        )
    return names


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class MetaTrainConfig:
    # -- what to meta-train on ------------------------------------------------------------------
    task_family: str = _f(
        "mlp_mnist",
        "task family to meta-train on, or a comma-separated mixture meta-trained with equal "
        "weight (e.g. mlp_mnist,mlp_fashion_mnist,mlp_digits): each worker then holds "
        "--num-estimators estimators per family",
    )
    task_option: dict[str, Any] = _f(
        {},
        "family option KEY=VALUE (repeatable), e.g. --task-option image_sizes=[8]; in a mixture "
        "KEY applies to every family and FAMILY.KEY to one; reparam_scale=[LO,HI] adds the "
        "weight-rescaling augmentation",
    )
    lopt: str = _f(
        "small_fc_lopt",
        "learned-optimizer architecture to meta-train (its default preset), ARCH:PRESET, or a "
        "preset name that one architecture has (e.g. original, mulo)",
    )
    lopt_option: dict[str, Any] = _f(
        {},
        "override a field of the optimizer's config, KEY=VALUE (repeatable), e.g. step_mult=0.01",
    )
    init_from: str | None = _f(
        "auto",
        "starting θ: auto (the bundled default weights of the --lopt architecture when it has "
        "them, e.g. small_fc_lopt/mlp_mnist, so a run specialises the default; else fresh), "
        "none (a fresh random θ), or meta-weights: a zoo reference, a run directory (final "
        "weights, else its latest checkpoint) or a .safetensors file; the architecture must "
        "match --lopt",
    )
    lopt_backend: str = _f(
        "auto",
        "lopt update in the unroll: torch (vmapped pure-torch core, the reference), cpp (fused "
        "CPU kernel per lane, parity-tested) or auto (cpp when the kernel loads)",
        choices=LOPT_BACKENDS,
    )
    meta_loss_split: str = _f(
        "train",
        "what the meta-objective scores per inner step: train (the pre-update loss on the "
        "training batch; every published recipe), or a split (outer_valid) on which the "
        "post-update params are scored with a fresh batch, so θ is rewarded for what "
        "generalises; test is refused (final reports only)",
    )
    # -- estimator --------------------------------------------------------------------------------
    estimator: str = _f("pes", "gradient estimator", choices=ESTIMATOR_NAMES)
    num_tasks: int = _f(8, "N perturbation pairs per estimator (2N lanes)")
    num_estimators: int = _f(
        2, "estimators per worker (per family of a mixture), each with its own sampled task config"
    )
    sigma: float = _f(0.01, "perturbation std σ")
    shaping: str = _f("none", "loss shaping", choices=tuple(SHAPINGS))
    truncation_length: int = _f(10, "T: inner steps per outer step (PES/TES)")
    schedule: str = _f(
        "loguniform", "trajectory length schedule", choices=("constant", "loguniform")
    )
    trajectory_length: int = _f(
        1000, "trajectory length (constant) or upper bound (loguniform, exclusive)"
    )
    min_trajectory_length: int = _f(100, "lower bound of the loguniform schedule")
    random_offset: int = _f(-1, "staggered start offsets K (−1: the trajectory length)")
    pes_reset_rule: str = _f("exact", "PES accumulator reset rule", choices=("exact", "reference"))
    full_es_reduce: str = _f("avg", "full ES loss reduction", choices=("avg", "last"))
    resample_every: int = _f(50, "replace each estimator with probability 1/F per step (0: never)")
    # -- outer optimisation -----------------------------------------------------------------------
    # Defaults of the bare command (docs/design/mixture.md): from the bundled weights (init_from
    # auto), 2 estimators resampled every ~50 steps so a short run sees many architectures of the
    # family, T 10 and a small outer lr so it specialises the default without undoing it.
    outer_steps: int = _f(1200, "number of outer (meta) steps")
    outer_lr: float = _f(3e-4, "Adam learning rate on θ")
    outer_weight_decay: float = _f(
        0.0, "decoupled weight decay on θ (AdamW, decay lr·wd·θ per step; 0: plain Adam)"
    )
    grad_clip: float = _f(3.0, "elementwise clip of the meta-gradient before Adam (0: no clip)")
    seed: int = _f(0, "run seed (tasks, perturbations, data)")
    max_time: float = _f(
        0.0, "stop after this many seconds of meta-training, with a checkpoint (0: no limit)"
    )
    # -- execution --------------------------------------------------------------------------------
    workers: int = _f(
        0, "workers, each with --num-estimators estimators (0: one serial in-process worker)"
    )
    executor: str = _f(
        "auto",
        "who runs the workers: auto (Ray when --workers >= 1, else serial), ray (Ray actors), "
        "serial (all --workers in this process; reproduces a Ray sync run bit for bit)",
        choices=EXECUTORS,
    )
    address: str | None = _f(
        None,
        "Ray cluster to join: auto | HOST:PORT | local (embedded Ray even if RAY_ADDRESS is set); "
        "unset: RAY_ADDRESS, else an embedded local Ray",
    )
    mode: str = _f(
        "sync",
        "Ray mode: sync (one gradient per worker per step) or async (staleness-bounded)",
        choices=RAY_MODES,
    )
    staleness: int = _f(1, "async mode: max age in outer steps of an accepted gradient")
    threads: int = _f(0, "torch threads per process (0: torch default; Ray actors then use 1)")
    worker_timeout: float = _f(
        300.0, "Ray: seconds a worker may take for one step before it is restarted (0: no limit)"
    )
    worker_restarts: int = _f(10, "Ray: restarts allowed per worker actor (-1: unlimited)")
    # -- outputs ----------------------------------------------------------------------------------
    out_dir: str | None = _f(None, "run directory (default runs/<family>-<estimator>-<time>)")
    heldout_tasks: int = _f(
        1,
        "held-out tasks per family trained with θ at the start and at every checkpoint, "
        "against Adam on the same tasks (heldout.jsonl, TensorBoard heldout/*; 0: off)",
    )
    heldout_steps: int = _f(200, "inner steps of each held-out training run")
    checkpoint_every: int = _f(
        250, "checkpoint (and evaluate held-out tasks) every N outer steps (0: only at the end)"
    )
    keep_checkpoints: int = _f(3, "checkpoints to keep")
    log_every: int = _f(10, "TensorBoard/console summary every N outer steps")
    publish: str | None = _f(None, "publish the final θ to the zoo under this name")
    progress: bool = _f(True, "show a progress bar")

    def validate(self) -> MetaTrainConfig:
        import tasks

        for name in self.families:
            tasks.get_family(name, **self.family_options(name))  # bad names/options fail here
        try:
            check_meta_split(self.meta_loss_split, tasks.Task.splits)
        except ValueError as err:
            raise ValueError(f"--meta-loss-split: {err}") from None
        if self.estimator not in ESTIMATOR_NAMES:
            raise ValueError(
                f"unknown estimator {self.estimator!r}; valid: {', '.join(ESTIMATOR_NAMES)}"
            )
        positive = (
            "num_tasks",
            "num_estimators",
            "truncation_length",
            "trajectory_length",
            "min_trajectory_length",
            "outer_steps",
            "log_every",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
        at_least = {
            "checkpoint_every": 0,
            "keep_checkpoints": 1,
            "resample_every": 0,
            "threads": 0,
            "random_offset": -1,
            "worker_restarts": -1,
        }
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}"
                )
        if not (math.isfinite(self.max_time) and self.max_time >= 0):
            raise ValueError(f"--max-time must be >= 0 seconds (0: no limit), got {self.max_time}")
        if self.schedule == "loguniform" and self.min_trajectory_length >= self.trajectory_length:
            raise ValueError(
                "--min-trajectory-length must be below --trajectory-length for the loguniform "
                f"schedule (got {self.min_trajectory_length} >= {self.trajectory_length})"
            )
        if not (self.sigma > 0 and self.outer_lr > 0):
            raise ValueError("--sigma and --outer-lr must be > 0")
        if not (self.grad_clip >= 0 and self.outer_weight_decay >= 0):
            raise ValueError("--grad-clip and --outer-weight-decay must be >= 0 (0: off)")
        if self.heldout_tasks < 0 or (self.heldout_tasks > 0 and self.heldout_steps < 10):
            raise ValueError(
                "--heldout-tasks must be >= 0 and --heldout-steps >= 10 "
                f"(got {self.heldout_tasks} and {self.heldout_steps}); --heldout-tasks 0 disables "
                "the held-out evaluation"
            )
        self._validate_truncation()
        if self.publish is not None:
            from zoo import validate_name

            try:
                validate_name(self.publish)  # before training, not after it
            except ValueError as err:
                raise ValueError(f"--publish: {err}") from None
        try:
            arch = lopt_architecture(self.lopt_config())
        except (ValueError, TypeError) as err:
            raise ValueError(f"--lopt {self.lopt} / --lopt-option: {err}") from None
        if self.lopt_backend not in LOPT_BACKENDS:
            raise ValueError(
                f"--lopt-backend must be one of {', '.join(LOPT_BACKENDS)}, "
                f"got {self.lopt_backend!r}"
            )
        if self.lopt_backend == "cpp" and arch.lanes_update is None:
            raise ValueError(
                f"--lopt-backend cpp: {arch.name} has no fused lane kernel; use --lopt-backend "
                "torch (or auto)"
            )
        self._validate_execution()
        return self

    @property
    def families(self) -> tuple[str, ...]:
        """The task families of this run, in the order given (one unless a mixture)."""
        return parse_families(self.task_family)

    def family_options(self, name: str) -> dict[str, Any]:
        """The options of family ``name``: every plain KEY, then its own ``name.KEY`` entries."""
        families = self.families
        plain = {k: v for k, v in self.task_option.items() if "." not in k}
        own = {}
        for key, value in self.task_option.items():
            if "." not in key:
                continue
            prefix, option = key.split(".", 1)
            if prefix not in families:
                raise ValueError(
                    f"--task-option {key}: {prefix!r} is not a family of this run "
                    f"({', '.join(families)}); use FAMILY.KEY with one of them, or plain KEY"
                )
            if prefix == name:
                own[option] = value
        return {**plain, **own}

    def longest_trajectory(self) -> int:
        """The most inner steps any trajectory of this run's schedule can last."""
        if self.schedule == "loguniform":
            return self.trajectory_length - 1  # lengths are drawn in [min, max)
        return self.trajectory_length

    def _validate_truncation(self) -> None:
        # A truncation window longer than every trajectory would cross a reset in each unroll:
        # the run would not do what --truncation-length says. Full ES unrolls whole trajectories.
        if self.estimator != "full_es" and self.truncation_length > self.longest_trajectory():
            raise ValueError(
                f"--truncation-length {self.truncation_length} is longer than every trajectory "
                f"(the {self.schedule} schedule's longest is {self.longest_trajectory()} steps); "
                "lower --truncation-length or raise --trajectory-length"
            )

    def lopt_config(self):
        """The learned optimizer's config: ``--lopt``'s preset with ``lopt_option`` applied."""
        import lopt

        return lopt.resolve_config(self.lopt, self.lopt_option)

    def _validate_execution(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(
                f"--executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}"
            )
        if self.mode not in RAY_MODES:
            raise ValueError(f"--mode must be one of {', '.join(RAY_MODES)}, got {self.mode!r}")
        if self.workers < 0 or self.staleness < 0 or self.worker_timeout < 0:
            raise ValueError("--workers, --staleness and --worker-timeout must be >= 0")
        if self.executor == "ray" and self.workers < 1:
            raise ValueError("--executor ray needs --workers N with N >= 1 (one actor per worker)")
        if not self.uses_ray and self.address not in (None, "", "local"):
            raise ValueError(
                f"--address {self.address} joins a Ray cluster, but this run is serial; "
                "add --workers N (N >= 1)"
            )
        if not self.uses_ray and self.mode == "async":
            raise ValueError("--mode async needs Ray workers; add --workers N (N >= 1)")

    @property
    def uses_ray(self) -> bool:
        """Whether the workers run as Ray actors (else in this process)."""
        return self.executor == "ray" or (self.executor == "auto" and self.workers >= 1)

    @property
    def offset(self) -> int:
        return self.trajectory_length if self.random_offset < 0 else self.random_offset

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaTrainConfig:
        """The config of ``data``; unknown keys are refused (a typo must not be dropped)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"unknown meta-training config keys {unknown}; valid keys: {sorted(names)}"
            )
        return cls(**data)


QUICK: dict[str, Any] = {
    "init_from": "none",
    "num_estimators": 1,
    "resample_every": 0,
    "task_option": {"image_sizes": [8], "depth": 1, "width": [16, 48], "batch_size": [32, 128]},
    "num_tasks": 8,
    "truncation_length": 10,
    "schedule": "loguniform",
    "min_trajectory_length": 50,
    "trajectory_length": 300,
    "outer_steps": 800,
    "outer_lr": 3e-3,
    "checkpoint_every": 100,
    "log_every": 10,
}
"""``--quick``: a few minutes on 2 cores, small 8×8 MLPs; already lowers the meta-loss."""

CELO2_MIXTURE = "mlp_mnist,mlp_fashion_mnist,mlp_digits"
CELO2_RECIPE: dict[str, Any] = {
    "init_from": "none",
    "task_family": CELO2_MIXTURE,
    "task_option": {
        "image_sizes": [8],
        "depth": 1,
        "width": 32,
        "batch_size": 64,
        "activations": ["relu"],
        "init_scale": 1.0,
        "reparam_scale": [1e-3, 1e3],
    },
    "estimator": "pes",
    "num_tasks": 8,
    "num_estimators": 1,
    "resample_every": 0,
    "sigma": 0.01,
    "truncation_length": 50,
    "schedule": "loguniform",
    "min_trajectory_length": 100,
    "trajectory_length": 2000,
    "random_offset": 2000,
    "outer_lr": 5e-5,
    "outer_weight_decay": 1e-4,
    "grad_clip": 0.0,
    "outer_steps": 100_000,
    "checkpoint_every": 100,
}
"""``--preset celo2``: the Celo2 meta-training recipe on lozoo's offline substitutes.

PES with truncation 50, trajectories LogUniform(100, 2000) with starts staggered over 2,000
steps, 8 antithetic pairs per estimator, σ 0.01; one estimator per family of the 8×8 mixture
(MNIST, Fashion-MNIST, scikit-learn digits), each task a 64 → 32 → 10 ReLU MLP at batch 64 with
the weight-rescaling augmentation over [1e-3, 1e3]; outer AdamW at 5e-5 with weight decay 1e-4
and no gradient clipping. The recipe's 100,000 outer steps took 4.5 GPU-hours; on CPU bound a
run with ``--max-time`` (and consider a larger ``--outer-lr`` for short budgets).
"""

PRESETS: dict[str, dict[str, Any]] = {"quick": QUICK, "celo2": CELO2_RECIPE}
"""``--preset NAME``: named bundles of flag values; flags given explicitly still win."""


def parse_key_value(text: str, flag: str = "") -> tuple[str, Any]:
    """``KEY=VALUE`` of a repeatable option (``--task-option``, ``--lopt-option``, ...).

    VALUE is read as JSON (``3``, ``0.1``, ``[8]``, ``true``) and kept as a string otherwise.
    A missing ``=`` raises ``argparse.ArgumentTypeError`` naming ``flag``.
    """
    if "=" not in text:
        who = f"{flag} " if flag else ""
        raise argparse.ArgumentTypeError(f"{who}needs KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def key_value_option(flag: str):
    """An argparse ``type=`` that parses ``flag``'s KEY=VALUE with :func:`parse_key_value`."""

    def parse(text: str) -> tuple[str, Any]:
        return parse_key_value(text, flag)

    parse.__name__ = "KEY=VALUE"  # argparse names the type in its own messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m metatrain",
        description="Meta-train a learned optimizer with ES / truncated ES / PES.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="small preset: minutes on 2 cores (--preset quick)"
    )
    parser.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help="apply a named bundle of settings first (explicit flags still win): quick, or "
        "celo2 (the Celo2 PES recipe on the 8×8 MNIST/Fashion-MNIST/digits mixture)",
    )
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint"
    )
    for f in dataclasses.fields(MetaTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.name in ("task_option", "lopt_option"):
            parser.add_argument(flag, type=key_value_option(flag), action="append", help=help_text)
        elif f.type in ("bool", bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, help=help_text, default=None
            )
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(
                flag, type=kind, choices=f.metadata.get("choices"), help=help_text, default=None
            )
    import lopt

    defaults = MetaTrainConfig()
    for action in parser._actions:
        if action.dest == "lopt":
            action.help += f"; registered architectures: {', '.join(lopt.architecture_names())}"
        if action.dest in defaults.__dataclass_fields__ and action.help:
            action.help += f" (default: {getattr(defaults, action.dest)!r})"
            action.default = None
    parser.formatter_class = argparse.HelpFormatter
    return parser


def config_from_args(
    args: argparse.Namespace, base: MetaTrainConfig | None = None
) -> MetaTrainConfig:
    """Defaults (or ``base``), then ``--quick``, then every flag given explicitly."""
    values = (base or MetaTrainConfig()).to_dict()
    preset = getattr(args, "preset", None)
    if getattr(args, "quick", False):
        if preset not in (None, "quick"):
            raise ValueError(
                f"--quick is --preset quick; it cannot be combined with --preset {preset}"
            )
        preset = "quick"
    if preset is not None:
        values.update(PRESETS[preset])
    for f in dataclasses.fields(MetaTrainConfig):
        given = getattr(args, f.name, None)
        if given is None:
            continue
        if f.name in ("task_option", "lopt_option"):
            values[f.name] = {**values.get(f.name, {}), **dict(given)}
        else:
            values[f.name] = given
    if preset is not None and "task_option" in PRESETS[preset]:
        scoped = scope_task_options(PRESETS[preset]["task_option"], values["task_family"])
        values["task_option"] = {**scoped, **dict(getattr(args, "task_option", None) or {})}
    return MetaTrainConfig.from_dict(values).validate()


def scope_task_options(options: dict[str, Any], task_family: str) -> dict[str, Any]:
    """A preset's task options fitted to the families a run names.

    A preset is written for its own families (``--preset celo2``: 8×8 MLPs), but a run may mix
    in others (``conv_mnist``, which has no ``width``). A plain KEY stays plain when every family
    of the run takes it; otherwise it becomes ``FAMILY.KEY`` for each family that does, and the
    rest keep their own defaults.
    """
    import tasks

    names = parse_families(task_family)
    out: dict[str, Any] = {}
    for key, value in options.items():
        if "." in key:  # already scoped
            out[key] = value
            continue
        takers = [n for n in names if key in tasks.family_option_names(n)]
        if len(takers) == len(names):
            out[key] = value
        else:
            out.update({f"{n}.{key}": value for n in takers})
    return out
