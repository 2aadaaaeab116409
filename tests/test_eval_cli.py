"""``python -m metatrain.eval`` end to end on a tiny meta-trained optimizer: the JSON report
against its schema, the PNGs, held-out seeds, publishing into a zoo card, and bad input."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import jsonschema
import numpy as np
import pytest

import zoo
from metatrain import train
from metatrain.eval import main
from metatrain.evaluation import REPORT_SCHEMA
from metatrain.evaluation.seeds import effective, metatrain_seeds
from tests.tiny_runs import TINY_MNIST as TINY
from tests.tiny_runs import tiny_config

TINY_FLAGS = [f for k, v in TINY.items() for f in ("--task-option", f"{k}={json.dumps(v)}")]
NAME = "small_fc_lopt/eval-test"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("meta") / "run"
    cfg = tiny_config(out, outer_steps=3, checkpoint_every=0, seed=77)
    train(cfg)
    return out


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOZOO_ZOO", str(root))
        yield root


@pytest.fixture(scope="module")
def evaluated(run_dir, zoo_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "out"
    argv = ["--optimizer", str(run_dir), "--task-family", "mlp_mnist", *TINY_FLAGS]
    argv += ["--num-tasks", "2", "--seeds", "2", "--adam-lrs", "1e-3,1e-2", "1e-1"]
    argv += ["--steps", "30", "--eval-every", "10", "--out", str(out), "--no-progress"]
    assert main([*argv, "--publish", NAME]) == 0
    return out


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking signature, CRC and IEND."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    (crc,) = struct.unpack(">I", data[29:33])
    assert zlib.crc32(data[12:29]) == crc, "IHDR CRC mismatch"
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82", "PNG is truncated"
    return struct.unpack(">II", data[16:24])


def test_report_matches_the_schema_and_the_run(evaluated, run_dir):
    report = json.loads((evaluated / "eval.json").read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    cfg = report["config"]
    assert cfg["optimizer"]["kind"] == "run_dir"
    assert cfg["adam_lrs"] == [1e-3, 1e-2, 1e-1] and cfg["steps"] == 30 and cfg["seeds"] == 2
    assert cfg["task_options"] == TINY and cfg["metatrain_seed"] == 77
    assert len(report["tasks"]) == 2
    for task in report["tasks"]:
        assert task["static"]["image_size"] == 8 and task["static"]["hidden"] == [16]
        grid = task["adam_grid"]
        finals = [g["final_smoothed_train_loss"]["mean"] for g in grid]
        assert task["adam_best"]["lr"] == grid[int(np.argmin(finals))]["lr"]
        sp = task["speedup"]
        assert sp["at_step"] == 29 and 0 <= sp["adam_steps"] <= 29
        assert sp["ratio"] == pytest.approx(sp["adam_steps"] / 29)
        assert [c["step"] for c in sp["checkpoints"]] == [7, 14, 22, 29]
        curves = task["curves"]
        assert curves["steps"][0] == 0 and curves["steps"][-1] == 29
        assert curves["val_steps"] == [0, 10, 20, 30]
        # paired comparison: same init, same first batch for every optimizer
        assert curves["learned"]["mean"][0] == curves["adam_best"]["mean"][0]
        for who in ("learned", "adam_best"):
            acc = task[who]["metrics"]["final_val_accuracy"]
            assert acc["n"] == 2 and 0.0 <= acc["mean"] <= 1.0
    wins = report["aggregate"]["win_rate"]["mean_train_loss"]
    assert wins in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_held_out_seeds_avoid_every_meta_training_seed(evaluated, run_dir):
    report = json.loads((evaluated / "eval.json").read_text())
    seeds = report["seeds"]
    run_cfg = json.loads((run_dir / "config.json").read_text())["metatrain"]
    used = {effective(s) for s in metatrain_seeds(run_cfg)}
    assert seeds["metatrain_seed"] == 77
    assert seeds["disjoint"]["checked_against_metatrain_seeds"] == len(used) > 0
    mine = [effective(s) for t in seeds["tasks"] for s in (t["task"], *t["inits"], t["data"])]
    assert mine and not used.intersection(mine)


def test_pngs_are_valid_images_of_sensible_size(evaluated):
    for name in ("curves.png", "speedup.png"):
        width, height = png_size(evaluated / name)
        assert 400 <= width <= 4000 and 250 <= height <= 4000, (name, width, height)


def test_publish_puts_metrics_and_figures_into_the_card(evaluated, zoo_root, run_dir):
    entry = zoo.load(NAME, root=zoo_root)
    report = json.loads((evaluated / "eval.json").read_text())
    assert report["published"]["ref"] == entry.ref == f"{NAME}:1.0.0"
    assert entry.theta_sha256 == report["config"]["optimizer"]["theta_sha256"]
    assert {"eval_curves.png", "eval_speedup.png", "eval.json"} <= set(entry.meta["files"])
    png_size(entry.path / "eval_curves.png")
    card = entry.card
    assert "## Evaluation" in card and "![eval_curves.png](eval_curves.png)" in card
    assert "| learned |" in card and "Adam (best LR per task)" in card
    assert "speedup_over_adam@14" in card and "speedup_over_adam@29" in card
    assert entry.meta["evaluation"]["num_tasks"] == 2
    assert entry.meta["metatrain_config"]["seed"] == 77  # provenance of the run dir
    attached = json.loads((entry.path / "eval.json").read_text())
    assert attached["aggregate"] == report["aggregate"]


def test_evaluating_a_zoo_entry_under_its_own_name_adds_a_patch_version(evaluated, tmp_path):
    argv = ["--optimizer", NAME, *TINY_FLAGS, "--num-tasks", "1", "--seeds", "1"]
    argv += ["--adam-lrs", "1e-2", "--steps", "6", "--out", str(tmp_path / "e")]
    assert main([*argv, "--no-progress", "--publish", NAME]) == 0
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert report["config"]["optimizer"]["kind"] == "zoo"
    assert report["config"]["optimizer"]["resolved"] == f"{NAME}:1.0.0"
    assert report["seeds"]["metatrain_seed"] == 77  # known from the entry's metadata
    entry = zoo.load(NAME)
    assert entry.version == "1.0.1" and entry.meta["annotates"]["ref"] == f"{NAME}:1.0.0"
    assert entry.meta["evaluation"]["num_tasks"] == 1


def test_an_existing_report_is_never_overwritten(evaluated, run_dir, capsys):
    argv = ["--optimizer", str(run_dir), *TINY_FLAGS, "--out", str(evaluated), "--steps", "5"]
    assert main(argv) == 2
    assert "already exists; choose another --out" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--task-family", "nope"], "unknown task family 'nope'; valid names: mlp_mnist"),
        (["--task-option", "depthx=1"], "has no option(s) depthx"),
        (["--num-tasks", "0"], "--num-tasks must be an integer >= 1, got 0"),
        (["--steps", "1"], "--steps must be an integer >= 2, got 1"),
        (["--seeds", "0"], "--seeds must be an integer >= 1, got 0"),
        (["--eval-every", "-1"], "--eval-every must be an integer >= 0, got -1"),
        (["--adam-lrs", "0,1e-3"], "--adam-lrs must be positive finite numbers, got 0.0"),
        (["--adam-lrs", "1e-3", "1e-3"], "--adam-lrs has duplicates"),
        (["--learned-lr", "0"], "--learned-lr must be a positive number, got 0.0"),
        (["--publish", "NoSlash"], "zoo name 'NoSlash' must be exactly 'family/name'"),
        (["--optimizer", "nope/missing"], "--optimizer 'nope/missing' is not a meta-training run"),
        (["--optimizer", "missing.safetensors"], "is not a meta-training run directory, a"),
        (["--optimizer", "{tmp}"], "the directory holds no theta.safetensors or model.safe"),
        (["--optimizer", "{tmp}/bad.safetensors"], "is not a valid safetensors file"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_code_2(flags, message, run_dir, tmp_path, capsys):
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04not safetensors")
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    argv = ["--optimizer", str(run_dir), *TINY_FLAGS, "--out", str(tmp_path / "o"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()  # nothing ran


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: --optimizer"),
        (["--optimizer", "x", "--steps", "two"], "argument --steps: invalid int value: 'two'"),
        (["--optimizer", "x", "--adam-lrs", "fast"], "--adam-lrs takes numbers, got 'fast'"),
        (["--optimizer", "x", "--task-option", "depth"], "--task-option needs KEY=VALUE"),
    ],
)
def test_unparsable_flags_are_one_line_and_exit_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_help_documents_every_flag():
    out = subprocess.run(
        [sys.executable, "-m", "metatrain.eval", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    flags = ["--optimizer", "--task-family", "--task-option", "--num-tasks", "--steps"]
    flags += ["--seeds", "--adam-lrs", "--learned-lr", "--eval-every", "--val-batches", "--out"]
    flags += ["--seed", "--publish", "--no-progress", "--threads"]
    for flag in flags:
        assert flag in out.stdout, flag
    assert "0.0001,0.0003,0.001,0.003,0.01,0.03,0.1" in " ".join(out.stdout.split())
