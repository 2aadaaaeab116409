"""The zoo under a concurrent ``remove``, with a damaged entry, and run from a directory that
holds a folder named like one of lozoo's packages."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import lopt
import zoo
from zoo import entry as zoo_entry
from zoo.cli import main as zoo_main

REPO = Path(__file__).resolve().parents[1]
NAME = "race/removed"


def publish(seed: int = 0, name: str = NAME) -> zoo.ZooEntry:
    theta = lopt.init_theta(lopt.ORIGINAL, torch.Generator().manual_seed(seed))
    return zoo.publish(theta, lopt.ORIGINAL, name, meta={"task_family": "quadratic"})


# ------------------------------------------------------------------------------------ remove race
# Every file access of a load, each made to run just after a concurrent `zoo remove`: before the
# fix they surfaced as "missing meta.json" (looks like corruption) or a raw FileNotFoundError.
READ_POINTS = ["read_meta", "file_sha256", "_read_config", "load_theta", "_embedded_config"]


@pytest.mark.parametrize("point", READ_POINTS)
def test_load_racing_a_remove_says_entry_not_found(zroot, monkeypatch, point):
    entry = publish()
    original = getattr(zoo_entry, point)

    def removed_first(*args, **kwargs):
        if (entry.path).is_dir():
            zoo.remove(entry.ref)
        return original(*args, **kwargs)

    monkeypatch.setattr(zoo_entry, point, removed_first)
    with pytest.raises(zoo.EntryNotFoundError, match=f"zoo entry {entry.ref} not found: it was"):
        zoo.load(NAME)


def test_list_and_verify_skip_an_entry_removed_meanwhile(zroot, monkeypatch):
    kept = publish(0, "race/kept")
    original = zoo_entry.read_meta
    armed: list[zoo.ZooEntry] = []

    def remove_armed_first(loc):
        while armed:
            zoo.remove(armed.pop().ref)
        return original(loc)

    monkeypatch.setattr(zoo_entry, "read_meta", remove_armed_first)
    armed.append(publish(1))
    assert [e.ref for e in zoo.list_entries()] == [kept.ref]
    armed.append(publish(1))
    assert [(r.ref, r.ok) for r in zoo.verify()] == [(kept.ref, True)]


@pytest.mark.timeout(60)
def test_loaders_racing_real_removes_see_entries_or_entry_not_found(zroot):
    publish()
    errors: list[BaseException] = []
    stop = threading.Event()

    def load_loop():
        while not stop.is_set():
            try:
                zoo.load(f"{NAME}:1.0.0")
            except zoo.EntryNotFoundError:
                pass
            except BaseException as err:  # anything else is what this test guards against
                errors.append(err)

    readers = [threading.Thread(target=load_loop) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for _ in range(15):
            zoo.remove(f"{NAME}:1.0.0")
            publish()
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert not errors, errors[:3]


# ------------------------------------------------------------------------------------ show
def test_show_of_an_entry_failing_its_hash_exits_non_zero(zroot, capsys):
    entry = publish()
    model = entry.path / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights
    model.write_bytes(bytes(data))
    for extra in ([], ["--json"], ["--card"]):
        assert zoo_main(["show", entry.ref, *extra]) == 1
        err = capsys.readouterr().err
        assert "sha256 mismatch for model.safetensors" in err and "do not use this entry" in err
    assert zoo_main(["show", publish(1, "race/fine").ref]) == 0


# ------------------------------------------------------------------------------------ shadowing
# How `pip install -e .` (CI, the README) exposes lozoo: a finder after the path finder on
# sys.meta_path; the working directory comes first on sys.path (python -c/-m, REPL, Jupyter).
EDITABLE = """
import sys
from importlib.machinery import PathFinder
from importlib.util import spec_from_file_location

ROOT = {root!r}

class EditableInstall:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname in ("lopt", "zoo", "tasks", "metatrain"):
            init = f"{{ROOT}}/{{fullname}}/__init__.py"
            return spec_from_file_location(
                fullname, init, submodule_search_locations=[f"{{ROOT}}/{{fullname}}"]
            )
        return None

sys.meta_path.insert(sys.meta_path.index(PathFinder) + 1, EditableInstall)
"""


def run_in(cwd: Path, code: str, **env: str) -> subprocess.CompletedProcess:
    script = EDITABLE.format(root=str(REPO)) + textwrap.dedent(code)
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | env
    return subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=environ, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


@pytest.mark.slow
def test_folders_named_zoo_and_tasks_in_the_working_directory_do_not_shadow_lozoo(tmp_path):
    (tmp_path / "zoo" / "small_fc_lopt").mkdir(parents=True)  # e.g. a user zoo kept here
    (tmp_path / "tasks").mkdir()
    proc = run_in(
        tmp_path,
        """
        import torch, lopt, metatrain, tasks, zoo
        p = torch.nn.Parameter(torch.randn(3))
        opt = lopt.SmallFCLOpt([p])  # the default weights come from the bundled zoo
        assert zoo.__file__.startswith(ROOT), zoo.__file__
        assert tasks.get_family("quadratic") is not None
        print("OK", opt.meta_weights_info["source"], len(zoo.list_entries()) >= 1)
        """,
        LOZOO_ZOO="zoo",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK zoo:small_fc_lopt/mlp_mnist" in proc.stdout


@pytest.mark.slow
def test_a_real_package_named_zoo_in_the_working_directory_is_named_in_the_error(tmp_path):
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "__init__.py").write_text("ANIMALS = ['okapi']\n")  # the user's own code
    proc = run_in(
        tmp_path,
        """
        import torch, lopt
        lopt.SmallFCLOpt([torch.nn.Parameter(torch.randn(3))])
        """,
    )
    assert proc.returncode == 1
    assert "a package named 'zoo' in the working directory or on PYTHONPATH shadows it" in (
        proc.stderr
    )
