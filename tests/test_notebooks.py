"""The research notebooks execute end to end (small settings, fresh kernel, temporary zoo) in
under 3 minutes each, and the committed notebooks are the generated ones, without outputs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import zoo
from metatrain import train
from tests.tiny_runs import tiny_config

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
DEFAULT_REF = "small_fc_lopt/mlp_mnist"
LIMIT_S = 180


def test_notebooks_are_generated_and_carry_no_outputs():
    names = [p.name for p in NOTEBOOKS]
    assert names == [
        "01_quickstart.ipynb",
        "02_metatrain_publish_evaluate.ipynb",
        "03_inside_the_optimizer.ipynb",
        "04_generalisation_suite.ipynb",
    ]
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_notebooks.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, path.name


@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory):
    """A temporary zoo holding ``small_fc_lopt/mlp_mnist``, small settings, this interpreter."""
    root = tmp_path_factory.mktemp("zoo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOZOO_ZOO", str(root))
        mp.setenv("LOZOO_NB_SMALL", "1")
        # the kernelspec runs "python": make that this (virtual environment's) interpreter
        mp.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
        try:
            zoo.resolve(DEFAULT_REF)  # the bundled default entry, once it ships
        except zoo.EntryNotFoundError:
            run = tmp_path_factory.mktemp("meta") / "run"
            cfg = tiny_config(run, outer_steps=3, checkpoint_every=0)
            train(cfg)
            zoo.publish_dir(run, DEFAULT_REF)
        yield root


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_within_three_minutes(path, notebook_env, tmp_path):
    nb = nbformat.read(path, as_version=4)
    probe = nbformat.v4.new_code_cell("import sys; print(sys.prefix)")
    nb.cells.insert(0, probe)
    client = NotebookClient(
        nb,
        timeout=LIMIT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    print(f"{path.name}: {elapsed:.1f} s")
    assert nb.cells[0].outputs[0]["text"].strip() == sys.prefix  # the kernel runs in this venv
    images = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if "image/png" in out.get("data", {})
    ]
    assert images, f"{path.name} drew no inline figure"
    assert elapsed < LIMIT_S, f"{path.name} took {elapsed:.0f} s (limit {LIMIT_S} s)"
