"""``scripts/publish_suite_entry.py``: a run dir plus suite reports become one verified zoo entry.

The run is a real (tiny) Celo2 meta-training run with a held-out curve; the suite reports are
synthetic but real (tests/suite_reports.py) and name the optimizer the way ``metatrain.eval``
does, through ``resolve_spec`` on the run dir or on a weights file written with
``lopt.save_theta`` (how a changed config such as ``conv_mode=matrix`` gets evaluated).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

import lopt
import zoo
from metatrain import train
from metatrain.generalisation import resolve_spec
from tests.suite_reports import Side, use_fast_reports, write_report
from tests.tiny_runs import tiny_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "publish_suite_entry.py"
NAME = "celo2/suite_test"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("publish_suite_entry", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One outer step of Celo2 with the held-out monitor: θ, config.json and a 2-point curve."""
    out = tmp_path_factory.mktemp("run") / "celo2"
    train(
        tiny_config(
            out, lopt="celo2", outer_steps=1, checkpoint_every=1, heldout_tasks=1, heldout_steps=10
        )
    )
    return out


@pytest.fixture(autouse=True)
def fast_reports(monkeypatch):
    use_fast_reports(monkeypatch)


def _suite_of(out: Path, ref: Path, sides=None, **kwargs) -> str:
    """A suite report in ``out`` of the optimizer ``ref`` (a run dir or a weights file)."""
    return write_report(out, resolve_spec(str(ref)), sides, **kwargs)


def _weights_file(path: Path, theta, config) -> Path:
    lopt.save_theta(path, theta, config)
    return path


def _matrix(config):
    return dataclasses.replace(config, conv_mode="matrix")


def _is_empty(root: Path) -> bool:
    return not root.exists() or not any(root.rglob("*"))


def test_publishes_the_run_with_its_curve_and_every_suite(script, run_dir, tmp_path, capsys):
    main = _suite_of(
        tmp_path / "main", run_dir, {"digits_mlp": Side(train=(0.2, 0.4), test=(0.3, 0.3))}
    )
    long = _suite_of(
        tmp_path / "long", run_dir, {"digits_mlp": Side(train=(0.1, 0.1))}, steps_scale=1.0
    )
    notes = tmp_path / "NOTES.md"
    notes.write_text("Tiny test run.\n")
    root = tmp_path / "zoo"
    argv = [str(run_dir), main, long, "--name", NAME, "--version", "1.0.0", "--root", str(root)]
    script.main([*argv, "--description", str(notes)])
    assert f"published {NAME}:1.0.0 to " in capsys.readouterr().out

    entry = zoo.load(NAME, root=root)
    assert [r.problem for r in zoo.verify(entry.ref, root=root)] == [None]
    theta, config = lopt.load_theta(run_dir / "theta.safetensors")
    assert entry.theta_sha256 == lopt.theta_sha256(theta)
    assert entry.config == config and entry.config.conv_mode == "slices"
    meta = entry.meta
    assert "config_changed_from_run" not in meta
    assert meta["description"] == "Tiny test run.\n"
    assert meta["run_dir"] == str(run_dir.resolve())
    assert meta["init_from"] == {"ref": None, "kind": "fresh"}
    record = json.loads((run_dir / "config.json").read_text())
    assert meta["seed"] == record["metatrain"]["seed"] and meta["outer_steps"] == 1
    # each report under its own label: the first is "suite", the next "suite2"
    metrics = meta["metrics"]
    assert metrics["suite digits_mlp"]["final train loss"] == "0.3 ± 0.1"
    assert metrics["suite digits_mlp"]["loss / AdamW (seed mean)"] == "0.6"  # (0.4 + 0.8) / 2
    assert metrics["suite digits_mlp"]["test loss"] == "0.3 ± 0"
    assert metrics["suite2 digits_mlp"]["final train loss"] == "0.1 ± 0"
    assert "suite IQM [95% CI]" in metrics and "suite2 IQM [95% CI]" in metrics
    assert [s["label"] for s in meta["generalisation_suite"]] == ["suite", "suite2"]
    assert [s["steps_scale"] for s in meta["generalisation_suite"]] == [0.01, 1.0]
    # the held-out curve: one row per evaluation, at step 0 and after the outer step
    curve = [k for k in metrics if k.startswith("held-out at step ")]
    assert [k.split(" (")[0] for k in curve] == ["held-out at step 0", "held-out at step 1"]
    assert set(metrics[curve[0]]) == {
        "learned final train loss",
        "best-Adam final train loss",
        "learned / Adam",
        "learned / Adam, validation loss",
        "diverged tasks",
    }
    for name in ("heldout.png", "heldout.jsonl", "suite.json", "suite2.json", "suite_table.md"):
        assert (entry.path / name).is_file(), name
    assert (entry.path / "suite2.json").read_text() == (Path(long) / "suite.json").read_text()
    assert "suite2 IQM [95% CI]" in entry.card


def test_lopt_option_publishes_the_same_theta_under_the_evaluated_config(script, run_dir, tmp_path):
    theta, config = lopt.load_theta(run_dir / "theta.safetensors")
    matrix_file = _weights_file(tmp_path / "celo2_matrix.safetensors", theta, _matrix(config))
    suite = _suite_of(tmp_path / "suite", matrix_file)
    root = tmp_path / "zoo"
    script.main(
        [str(run_dir), suite, "--name", NAME, "--root", str(root)]
        + ["--lopt-option", "conv_mode=matrix"]
    )
    entry = zoo.load(NAME, root=root)
    assert [r.problem for r in zoo.verify(entry.ref, root=root)] == [None]
    assert entry.config.conv_mode == "matrix"
    assert entry.config == _matrix(config)  # nothing else changed
    assert entry.theta_sha256 == lopt.theta_sha256(theta)
    assert entry.meta["config_changed_from_run"] == {"conv_mode": "matrix"}
    assert "suite digits_mlp" in entry.meta["metrics"]


@pytest.mark.parametrize(
    ("evaluated", "options", "message"),
    [
        ("other weights", [], "evaluated other weights than "),
        ("adamw", [], "evaluated a baseline (adamw), not the learned weights of "),
        ("matrix", [], "evaluated these weights under another config than the one published"),
        ("run", ["conv_mode=matrix"], "under another config than the one published"),
        ("run", ["conv_mode=flat"], "--lopt-option: conv_mode must be one of 'slices', 'matrix'"),
        ("run", ["no_such_field=1"], "unknown Celo2 config keys ['no_such_field']; valid keys"),
    ],
    ids=[
        "other-weights",
        "baseline",
        "other-config",
        "option-not-evaluated",
        "bad-value",
        "unknown-key",
    ],
)
def test_refusals_name_the_problem_and_write_nothing(
    script, run_dir, tmp_path, evaluated, options, message
):
    theta, config = lopt.load_theta(run_dir / "theta.safetensors")
    if evaluated == "other weights":
        first = next(iter(theta))
        moved = {**theta, first: theta[first] + 1e-3}
        ref = _weights_file(tmp_path / "other.safetensors", moved, config)
    elif evaluated == "matrix":
        ref = _weights_file(tmp_path / "matrix.safetensors", theta, _matrix(config))
    else:
        ref = run_dir
    if evaluated == "adamw":
        suite = write_report(tmp_path / "suite", resolve_spec("adamw"), None)
    else:
        suite = _suite_of(tmp_path / "suite", ref)
    curve_png = run_dir / "heldout.png"
    before = curve_png.stat().st_mtime_ns if curve_png.exists() else None
    root = tmp_path / "zoo"
    argv = [str(run_dir), suite, "--name", NAME, "--root", str(root)]
    for option in options:
        argv += ["--lopt-option", option]
    with pytest.raises(SystemExit, match="^error: ") as err:
        script.main(argv)
    text = str(err.value)
    assert message in text
    if evaluated == "matrix":  # both configs shown, and the fix
        assert "'conv_mode': 'matrix'" in text and "'conv_mode': 'slices'" in text
        assert "pass the --lopt-option values that evaluation used" in text
    assert _is_empty(root)
    after = curve_png.stat().st_mtime_ns if curve_png.exists() else None
    assert after == before  # a refused publish leaves the run dir as it was


def test_weights_publishes_the_best_held_out_theta_and_records_its_step(script, run_dir, tmp_path):
    from metatrain.heldout import BEST_FILE, read_curve

    best_file = run_dir / BEST_FILE
    assert best_file.is_file()  # the monitor keeps it
    suite = _suite_of(tmp_path / "suite", best_file)
    root = tmp_path / "zoo"
    argv = [str(run_dir), suite, "--name", NAME, "--root", str(root)]
    script.main([*argv, "--weights", BEST_FILE])
    entry = zoo.load(NAME, root=root)
    theta, _ = lopt.load_theta(best_file)
    assert entry.theta_sha256 == lopt.theta_sha256(theta)
    assert entry.meta["weights_file"] == BEST_FILE
    # the step of the best held-out evaluation: lowest ratio, no diverged task, first of equals
    kept = [x for x in read_curve(run_dir) if x["heldout_diverged"] == 0]
    best = min(kept, key=lambda x: x["heldout_ratio"])
    assert entry.meta["weights_step"] == best["step"]


def test_weights_refusals_name_the_file_and_write_nothing(script, run_dir, tmp_path):
    suite = _suite_of(tmp_path / "suite", run_dir)
    root = tmp_path / "zoo"
    argv = [str(run_dir), suite, "--name", NAME, "--root", str(root)]
    with pytest.raises(SystemExit, match="weights file 'nope.safetensors' not found in"):
        script.main([*argv, "--weights", "nope.safetensors"])
    assert _is_empty(root)
