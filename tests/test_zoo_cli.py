"""``python -m zoo``: end to end in real subprocesses, and every subcommand in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lopt
import zoo
from zoo.cli import main

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["list", "show", "verify", "publish", "remove", "import-pylo"]


def run_dir(path: Path, seed: int = 0) -> Path:
    """What a meta-training run leaves behind: θ with its config, a run config, meta, a plot."""
    theta = lopt.init_theta(lopt.ORIGINAL, torch.Generator().manual_seed(seed))
    lopt.save_theta(path / "theta.safetensors", theta, lopt.ORIGINAL)
    (path / "config.json").write_text(json.dumps({"estimator": "pes", "outer_steps": 2}))
    meta = {"task_family": "quadratic", "outer_steps": 2, "command": "python -m metatrain --quick"}
    (path / "meta.json").write_text(json.dumps(meta))
    (path / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return path


def zoo_cli(*args: str, root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOZOO_ZOO": str(root), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "zoo", *args], capture_output=True, text=True, env=env, cwd=REPO
    )


TRAIN = """
import torch, lopt
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
x, y = torch.randn(32, 4), torch.randn(32, 1)
opt = lopt.SmallFCLOpt(model.parameters(), weights="test/e2e")
w = model[0].weight.detach().clone()
for _ in range(5):
    opt.zero_grad(); torch.nn.functional.mse_loss(model(x), y).backward(); opt.step()
assert torch.isfinite(model[0].weight).all() and not torch.equal(w, model[0].weight)
print(opt.meta_weights_info["source"])
"""


def test_end_to_end_publish_list_verify_train_in_subprocesses(tmp_path):
    root = tmp_path / "fresh-zoo"  # does not exist yet: a fresh machine
    run = run_dir(tmp_path / "run")
    attach = str(run / "curves.png")
    out = zoo_cli("publish", str(run), "--name", "test/e2e", "--attach", attach, root=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("published test/e2e:1.0.0 -> ")
    listed = zoo_cli("list", root=root)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split()[1:] for line in listed.stdout.splitlines()[1:]}
    assert rows["test/e2e:1.0.0"][:2] == ["small_fc_lopt", "user"]
    assert "quadratic" in rows["test/e2e:1.0.0"]
    assert rows["small_fc_lopt/mlp_mnist:1.0.0"][:2] == ["small_fc_lopt", "bundled"]
    checked = zoo_cli("verify", root=root)
    assert checked.returncode == 0
    assert "OK    test/e2e:1.0.0 (user, small_fc_lopt, format 2)" in checked.stdout
    bundled = "OK    small_fc_lopt/mlp_mnist:1.0.0 (bundled, small_fc_lopt, format 1)"
    assert bundled in checked.stdout
    env = {**os.environ, "LOZOO_ZOO": str(root), "PYTHONPATH": str(REPO)}
    trained = subprocess.run(
        [sys.executable, "-c", TRAIN], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert trained.returncode == 0, trained.stderr
    assert trained.stdout.strip() == "zoo:test/e2e:1.0.0"
    entry = zoo.load("test/e2e", root=root)
    assert entry.meta["meta_training"] == {"estimator": "pes", "outer_steps": 2}
    assert "![curves.png](curves.png)" in entry.card
    failed = zoo_cli("show", "test/missing", root=root)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.count("\n") == 1
    assert failed.stderr.startswith("error: no zoo entry named 'test/missing' in the user zoo")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: python -m zoo {command}" in capsys.readouterr().out


def test_subcommands_in_process(zroot, tmp_path, capsys):
    run = run_dir(tmp_path / "run")
    assert main(["list"]) == 0
    assert "no entries (user zoo: " in capsys.readouterr().out
    assert main(["publish", str(run), "--name", "a/b", "--version", "2.0.0"]) == 0
    assert main(["publish", str(run), "--name", "a/b"]) == 0
    assert "published a/b:2.1.0" in capsys.readouterr().out
    assert main(["show", "a/b"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("a/b:2.1.0  (user zoo)") and "task_family:  quadratic" in shown
    assert main(["show", "a/b:2.0.0", "--card"]) == 0
    assert "# a/b 2.0.0" in capsys.readouterr().out
    assert main(["show", "a/b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "2.1.0"
    assert main(["list", "--json"]) == 0
    assert [r["ref"] for r in json.loads(capsys.readouterr().out)] == ["a/b:2.0.0", "a/b:2.1.0"]
    assert main(["verify", "a/b:2.0.0"]) == 0
    assert main(["remove", "a/b:2.0.0"]) == 0
    assert "removed a/b:2.0.0" in capsys.readouterr().out
    assert main(["remove", "a/b", "--all"]) == 0
    assert main(["list"]) == 0
    assert "no entries" in capsys.readouterr().out


def test_root_option_before_or_after_the_subcommand(zroot, tmp_path, capsys):
    other = tmp_path / "other"
    run = run_dir(tmp_path / "run")
    assert main(["--root", str(other), "publish", str(run), "--name", "a/b"]) == 0
    assert main(["list", "--root", str(other)]) == 0
    assert "a/b:1.0.0" in capsys.readouterr().out
    assert main(["list"]) == 0  # the LOZOO_ZOO zoo is untouched
    assert "no entries" in capsys.readouterr().out
    assert (other / "a" / "b" / "1.0.0" / "meta.json").is_file()


def test_import_pylo_from_the_cli(zroot, tmp_path, capsys):
    from tests.test_zoo_pylo import write_pylo_dir

    write_pylo_dir(tmp_path / "mulo")
    args = ["import-pylo", str(tmp_path / "mulo"), "--name", "mulo/test", "--source", "o/r"]
    assert main([*args, "--revision", "r1"]) == 0
    assert "imported mulo/test:1.0.0" in capsys.readouterr().out
    assert zoo.load("mulo/test").meta["source"]["revision"] == "r1"


def test_verify_exit_code_and_warnings(zroot, tmp_path, capsys):
    run = run_dir(tmp_path / "run")
    assert main(["publish", str(run), "--name", "a/b"]) == 0
    (zroot / "a" / "b" / "1.0.0" / "notes.txt").write_text("x")
    (zroot / "a" / "b" / "latest").mkdir()
    capsys.readouterr()
    assert main(["verify"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  a/b:1.0.0 (user, small_fc_lopt, format 2): zoo entry a/b:1.0.0" in out
    assert "notes.txt" in out
    assert "warning: " in out and "latest: version directory name is not" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["show", "a/../b"], "error: zoo name 'a/../b' must not contain '..'"),
        (["show", "a/b"], "error: no zoo entry named 'a/b'"),
        (["remove", "a/b"], "error: remove needs an explicit version"),
        (["verify", "a/b:1.0"], "error: version '1.0' is not a strict semantic version"),
        (["publish", "/nonexistent/dir", "--name", "a/b"], "error: not a directory"),
        (["import-pylo", "/nonexistent", "--name", "a/b"], "error: cannot import PyLO checkpoint"),
    ],
)
def test_user_errors_are_one_line(zroot, capsys, argv, message):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
