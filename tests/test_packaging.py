"""Package boundaries: what a user who only runs optimizers installs, and who imports whom."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRAS_ONLY = ("ray", "tensorboard", "matplotlib", "mlxtend", "sklearn", "tqdm", "rliable")

# Run with every extras-only package made unimportable, as on a core-only install.
RUN_ONLY = f"""
import sys
for name in {EXTRAS_ONLY!r}:
    sys.modules[name] = None  # 'import name' now fails as if it were not installed
import torch, lopt, zoo
from torch import nn
from zoo.cli import main
model = nn.Linear(3, 2)
opt = lopt.make_optimizer(model.parameters(), "small_fc_lopt/mlp_mnist", backend="torch")
model(torch.randn(4, 3)).sum().backward()
opt.step()
cfg = lopt.resolve_config("mlp_lopt:lolv2_small")
theta = lopt.get_architecture("mlp_lopt").init_theta(cfg)
lopt.MLPLOpt(model.parameters(), weights=theta).step()
assert main(["verify", "small_fc_lopt/mlp_mnist"]) == 0
print("ran without extras")
"""


def test_running_zoo_optimizers_needs_no_extras():
    out = subprocess.run(
        [sys.executable, "-c", RUN_ONLY], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "ran without extras" in out.stdout


def test_core_dependencies_leave_training_and_evaluation_to_extras():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    for heavy in ("ray", "tensorboard", "matplotlib", "mlxtend", "scikit-learn", "rliable"):
        assert heavy not in core, f"{heavy} is a core dependency; move it to an extra"
    extras = project["optional-dependencies"]
    assert any(d.startswith("ray") for d in extras["metatrain"])
    assert any(d.startswith("matplotlib") for d in extras["eval"])
    assert "lozoo[metatrain,eval]" in extras["dev"]  # CI installs .[dev]: it must pull all


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_lopt_never_imports_zoo_metatrain_or_tasks():
    # zoo depends on lopt; lopt reaches the zoo only through the resolver zoo registers.
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & {"zoo", "metatrain", "tasks"})
        for path in (ROOT / "lopt").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_evaluation_needs_no_meta_training_extras(tmp_path):
    # lozoo[eval] has neither Ray nor TensorBoard: python -m metatrain.eval must not import them
    code = f"""
import sys
for name in ("ray", "tensorboard"):
    sys.modules[name] = None
from metatrain.eval import main
sys.exit(main(["--optimizer", "small_fc_lopt/mlp_mnist", "--task-family", "quadratic",
               "--num-tasks", "1", "--steps", "10", "--adam-lrs", "0.01", "--eval-every", "0",
               "--no-progress", "--out", {str(tmp_path / "eval")!r}]))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "eval" / "eval.json").is_file()
