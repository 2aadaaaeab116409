"""The meta-training loop: executor → gradients → outer learner, with logs and checkpoints.

Run directory layout::

    RUN_DIR/config.json          meta-training config, lopt config, command, task configs
    RUN_DIR/metrics.jsonl        one line of metrics per outer step
    RUN_DIR/tb/                  TensorBoard scalars
    RUN_DIR/checkpoints/         ckpt-<step>.pt (atomic) and a ``latest`` pointer
    RUN_DIR/theta.safetensors    final θ (its architecture and config in the metadata)
    RUN_DIR/summary.json         final metrics and wall time
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import lopt

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import MetaTrainConfig
from .executors import Executor, make_executor
from .learner import OuterLearner
from .seeding import TAG_THETA_INIT, derive_seed
from .worker import aggregate_metrics

log = logging.getLogger("lozoo.metatrain")

# Flags that may change when a run is resumed; anything else would break the trajectory.
RESUMABLE_CHANGES = {
    "outer_steps",
    "progress",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "publish",
    "threads",
    "address",
    "worker_timeout",
    "max_time",
    "worker_restarts",
}


@dataclass
class RunResult:
    run_dir: Path
    theta: dict[str, torch.Tensor]
    lopt_config: Any  # the config of the meta-trained architecture (lopt.architecture_of)
    meta_losses: list[float]
    wall_time: float


def default_run_dir(cfg: MetaTrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{'+'.join(cfg.families)}-{cfg.estimator}-{stamp}"


def load_run_config(run_dir: Path) -> MetaTrainConfig:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise ValueError(f"--resume {run_dir}: no config.json there; is it a metatrain run dir?")
    return MetaTrainConfig.from_dict(json.loads(path.read_text())["metatrain"])


def merge_resume_config(saved: MetaTrainConfig, requested: MetaTrainConfig, given: set[str]):
    """The saved config with the explicitly given, resume-safe flags applied."""
    bad = sorted(
        k
        for k in given
        if k not in RESUMABLE_CHANGES and getattr(saved, k) != getattr(requested, k)
    )
    if bad:
        flags = ", ".join("--" + k.replace("_", "-") for k in bad)
        raise ValueError(f"cannot change {flags} when resuming; only {sorted(RESUMABLE_CHANGES)}")
    values = saved.to_dict()
    values.update({k: getattr(requested, k) for k in given if k in RESUMABLE_CHANGES})
    return MetaTrainConfig.from_dict(values)


def _resolve_init(cfg: MetaTrainConfig):
    from .init_from import resolve_init

    return resolve_init(cfg.init_from, cfg.lopt_config(), cfg.lopt_option)


def _read_config_record(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _average(results) -> dict[str, float]:
    return aggregate_metrics([r.metrics for r in results])


def _read_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint of ``run_dir`` (older ones if the newest is torn), or
    ``None`` when the run died before its first checkpoint."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return None
    candidates = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"), reverse=True)
    for candidate in [path] + [c for c in candidates if c != path]:
        try:
            ckpt = load_checkpoint(candidate)
        except ValueError as err:
            warnings.warn(f"{err}; trying an older checkpoint", stacklevel=2)
            continue
        ckpt["path"] = str(candidate)
        return ckpt
    raise ValueError(f"--resume {run_dir}: every checkpoint is unreadable")


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to reuse a directory that is not this run's own (a run dir is never overwritten),
    and check it can be created and written before any work starts."""
    if resume:
        if not (run_dir / "config.json").is_file():
            raise ValueError(
                f"--resume {run_dir}: no config.json there; is it a metatrain run dir?"
            )
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        if (run_dir / "config.json").is_file():
            raise ValueError(
                f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                "or choose another --out-dir"
            )
        held = ", ".join(sorted(p.name for p in run_dir.iterdir())[:5])
        raise ValueError(
            f"--out-dir {run_dir} is not empty (it holds {held}); a new run needs a new or "
            "empty directory: choose another --out-dir"
        )
    make_writable_dir(run_dir, "--out-dir")


def make_writable_dir(path: Path, flag: str) -> None:
    """Create ``path`` and check a file can be written there, before any work that would end
    by writing into it; a clear ``ValueError`` naming ``flag`` otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise ValueError(
            f"{flag} {path}: cannot create or write the directory ({why}: "
            f"{err.filename or path}); choose a writable {flag}"
        ) from None


def _trim_metrics(path: Path, start: int) -> None:
    """Drop metric lines of steps the resumed run will redo (written after the checkpoint)."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if _metric_step(ln) < start]
    path.write_text("".join(ln + "\n" for ln in kept))


def _metric_step(line: str) -> float:
    """A metrics line's step; a line torn by a killed driver (partial buffer flush) is dropped."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def train(
    cfg: MetaTrainConfig,
    run_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    command: str | None = None,
    executor: Executor | None = None,
) -> RunResult:
    """Meta-train ``cfg.lopt`` per ``cfg``; returns the final θ and the meta-loss history."""
    cfg.validate()
    init = None
    if not resume:  # a bad reference fails before the run dir is made
        init = _resolve_init(cfg)
        if init is not None:
            cfg = dataclasses.replace(cfg, lopt_option=init.config.to_dict())
    run_dir = Path(run_dir or cfg.out_dir or default_run_dir(cfg))
    prepare_run_dir(run_dir, resume)
    ckpt = _read_checkpoint(run_dir) if resume else None
    if ckpt is not None and ckpt["step"] >= cfg.outer_steps:
        raise ValueError(
            f"--resume {run_dir}: the run already did {ckpt['step']} outer steps; pass "
            f"--outer-steps N with N > {ckpt['step']} to continue it"
        )
    if resume and ckpt is None:  # killed before its first checkpoint
        init = _resolve_init(cfg)  # the saved lopt_option already holds the source's config
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    lopt_cfg = cfg.lopt_config()
    arch = lopt.architecture_of(lopt_cfg)
    if init is not None:
        theta0 = init.theta
    else:
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, TAG_THETA_INIT))
        theta0 = arch.init_theta(lopt_cfg, generator)
    learner = OuterLearner(
        lopt.flatten_theta(theta0, lopt_cfg), cfg.outer_lr, cfg.grad_clip, cfg.outer_weight_decay
    )
    executor = executor or make_executor(cfg)
    start, elapsed, total_inner = 0, 0.0, 0
    metrics_path = run_dir / "metrics.jsonl"
    try:
        if ckpt is not None:
            learner.load_state_dict(ckpt["learner"])
            executor.load_state_dict(ckpt["executor"])
            log.info("resumed %s at outer step %d", ckpt["path"], ckpt["step"])
            start, elapsed, total_inner = ckpt["step"], ckpt["elapsed"], ckpt["total_inner_steps"]
            _trim_metrics(metrics_path, start)
        else:
            if resume:  # killed before its first checkpoint: its own resume starts it over
                log.info("resuming %s: no checkpoint yet, starting at outer step 0", run_dir)
            metrics_path.write_text("")
        record = {
            "metatrain": cfg.to_dict(),
            "lopt": {"architecture": arch.name, **lopt_cfg.to_dict()},
            "command": command,
            "task_configs": getattr(executor, "task_configs", lambda: [])(),
        }
        earlier = _read_config_record(run_dir) if resume else {}
        if earlier.get("command"):  # the command that made the run stays its command
            record["command"] = earlier["command"]
            record["resumed_with"] = [*earlier.get("resumed_with", []), command]
        init_record = (
            init.record
            if init is not None
            else _read_config_record(run_dir).get("init_from", {"ref": None, "kind": "fresh"})
        )
        if init_record is not None:
            record["init_from"] = init_record
        (run_dir / "config.json").write_text(json.dumps(record, indent=2))
        monitor = None
        if cfg.heldout_tasks > 0:
            from .heldout import HeldoutMonitor

            monitor = HeldoutMonitor(cfg, run_dir)
            monitor.resume(start)
        history = _loop(
            cfg, run_dir, learner, executor, start, elapsed, total_inner, monitor, lopt_cfg
        )
    finally:
        executor.close()
    theta = lopt.unflatten_theta(learner.theta.detach().clone(), lopt_cfg)
    theta = {k: v.clone() for k, v in theta.items()}
    lopt.save_theta(
        run_dir / "theta.safetensors", theta, lopt_cfg, {"lozoo.metatrain.command": command or ""}
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    if cfg.publish:
        _publish(cfg, run_dir, theta, lopt_cfg, command, summary)
    return RunResult(run_dir, theta, lopt_cfg, history, summary["wall_time_s"])


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run after ``step`` outer steps, with a checkpoint there."""

    def __init__(self, run_dir: Path, step: int, signum: int) -> None:
        self.run_dir, self.step, self.signum = run_dir, step, signum
        name = signal.Signals(signum).name
        super().__init__(
            f"{name}: stopped after outer step {step} with a checkpoint; continue with "
            f"--resume {run_dir}"
        )


class StopRequest:
    """SIGINT/SIGTERM ask the loop to finish the current outer step, checkpoint and stop; a
    second signal interrupts at once (the previous checkpoint stays valid). Signal handlers can
    only be set from the main thread; elsewhere (a notebook's worker thread) nothing changes."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # asked twice: stop now
            self.uninstall()
            raise KeyboardInterrupt
        self.signum = signum
        log.warning(
            "%s received: checkpointing after this outer step, then stopping "
            "(send it again to stop at once)",
            signal.Signals(signum).name,
        )


def _loop(
    cfg, run_dir, learner, executor, start, elapsed, total_inner, monitor=None, lopt_cfg=None
) -> list[float]:
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    writer = SummaryWriter(str(run_dir / "tb"), purge_step=start)
    history: list[float] = []
    metrics_file = open(run_dir / "metrics.jsonl", "a")
    bar = tqdm(
        total=cfg.outer_steps,
        initial=start,
        disable=not cfg.progress,
        desc="meta-train",
        unit="step",
        dynamic_ncols=True,
    )
    heldout: dict[str, float] = {}
    if monitor is not None and start == 0:  # quality of the initial θ: the curve's first point
        heldout = monitor.record(0, elapsed, learner.theta, lopt_cfg, writer)
    t_last = time.perf_counter()
    stop = StopRequest()
    try:
        stop.install()
        for step in range(start, cfg.outer_steps):
            t0 = time.perf_counter()
            results = executor.gradients(learner.theta, step)
            metrics = _average(results)
            # Ray: gradients averaged, worker faults, async staleness (none for serial)
            metrics.update(getattr(executor, "step_metrics", dict)())
            metrics.update(learner.apply([r.grad for r in results], metrics["meta_loss"]))
            dt = time.perf_counter() - t0
            total_inner += int(metrics["inner_steps"])
            metrics["inner_steps_per_s"] = metrics["inner_steps"] / max(dt, 1e-9)
            metrics["outer_step_s"] = dt
            history.append(metrics["meta_loss"])
            metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
            if step % cfg.log_every == 0 or step == cfg.outer_steps - 1:
                for key, value in metrics.items():
                    if math.isfinite(value):
                        writer.add_scalar(_tb_name(key), value, step)
                metrics_file.flush()
            bar.set_postfix(meta_loss=f"{metrics['meta_loss']:.4f}", refresh=False)
            bar.update(1)
            now = time.perf_counter()
            elapsed, t_last = elapsed + (now - t_last), now
            done = step + 1
            out_of_time = cfg.max_time > 0 and elapsed >= cfg.max_time
            # --checkpoint-every 0 still checkpoints at the end, so such a run is resumable
            periodic = cfg.checkpoint_every and done % cfg.checkpoint_every == 0
            if stop.signum is not None or out_of_time or periodic or done == cfg.outer_steps:
                save_checkpoint(
                    run_dir,
                    done,
                    {
                        "learner": learner.state_dict(),
                        "executor": executor.state_dict(),
                        "config": cfg.to_dict(),
                        "elapsed": elapsed,
                        "total_inner_steps": total_inner,
                    },
                    keep=cfg.keep_checkpoints,
                )
                if monitor is not None and stop.signum is None:
                    heldout = monitor.record(done, elapsed, learner.theta, lopt_cfg, writer)
                    log.info(
                        "step %d: held-out train loss %.4f (Adam %.4f, ratio %.3f; valid "
                        "ratio %.3f)",
                        done,
                        heldout["heldout_train_loss"],
                        heldout["heldout_adam_train_loss"],
                        heldout["heldout_ratio"],
                        heldout["heldout_valid_ratio"],
                    )
            if stop.signum is not None:
                raise RunInterrupted(run_dir, done, stop.signum)
            if out_of_time:
                log.info("--max-time %.0f s reached after %d outer steps", cfg.max_time, done)
                break
    finally:
        stop.uninstall()
        bar.close()
        metrics_file.close()
        writer.close()
    summary = {
        "outer_steps": start + len(history),
        "outer_steps_planned": cfg.outer_steps,
        "wall_time_s": elapsed,
        "total_inner_steps": total_inner,
        "final_meta_loss": history[-1] if history else None,
        "best_meta_loss": learner.best_loss if math.isfinite(learner.best_loss) else None,
    }
    if monitor is not None:
        summary["heldout_final"] = heldout
        summary["heldout_best_ratio"] = (
            monitor.best_ratio if math.isfinite(monitor.best_ratio) else None
        )
        summary["heldout_eval_s"] = monitor.eval_seconds
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return history


TB_NAMES = {
    "meta_loss": "meta/loss",
    "best_meta_loss": "meta/best_loss",
    "grad_norm": "meta/grad_norm",
    "grad_abs_mean": "meta/grad_abs_mean",
    "theta_norm": "meta/theta_norm",
    "inner_loss": "inner/loss",
    "inner_steps": "inner/steps",
    "inner_steps_per_s": "inner/steps_per_s",
    "outer_step_s": "time/outer_step_s",
    **{
        k: f"ray/{k}"
        for k in (
            "gradients",
            "worker_failures",
            "workers_live",
            "staleness_mean",
            "staleness_max",
            "dropped_gradients",
        )
    },
}


def _tb_name(key: str) -> str:
    return TB_NAMES.get(key, f"safety/{key}")


def _publish(cfg, run_dir, theta, lopt_cfg, command, summary) -> None:
    import zoo

    meta = {
        "task_family": cfg.task_family,
        "meta_training": cfg.to_dict(),
        "command": command,
        "outer_steps": summary["outer_steps"],
        "seed": cfg.seed,
        "wall_time_s": round(summary["wall_time_s"], 1),
        "total_inner_steps": summary["total_inner_steps"],
        "final_meta_loss": summary["final_meta_loss"],
        "run_dir": str(run_dir),
    }
    entry = zoo.publish(theta, lopt_cfg, cfg.publish, meta=meta)
    log.info("published %s", entry.ref)
    print(f"published {entry.ref} to {entry.path}")
