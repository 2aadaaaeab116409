"""Concurrent publishers of one name, in real separate processes, with a reader polling meanwhile.

Each worker slows its own publish down while the staging directory is half written (before the
card and meta.json exist), which widens the window for both failure modes under test: two
publishers picking the same version (no lock) and a reader seeing a half-written entry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import zoo
from zoo import store

REPO = Path(__file__).resolve().parents[1]
NAME = "race/shared"
PER_WORKER = 3

WORKER = """
import json, sys, time
from pathlib import Path
import torch, lopt, zoo
import zoo.api

root, name, go = sys.argv[1], sys.argv[2], sys.argv[4]
seed, count = int(sys.argv[3]), int(sys.argv[5])
render = zoo.api.cards.render

def slow_render(*args, **kwargs):
    time.sleep(0.15)  # staging dir holds model + config but no card / meta yet
    return render(*args, **kwargs)

zoo.api.cards.render = slow_render
while not Path(go).exists():
    time.sleep(0.005)
refs = []
for i in range(count):
    theta = lopt.init_theta(lopt.ORIGINAL, torch.Generator().manual_seed(seed + i))
    entry = zoo.publish(theta, lopt.ORIGINAL, name, meta={"seed": seed + i}, root=root)
    refs.append([entry.ref, entry.theta_sha256])
print(json.dumps(refs))
"""


def test_two_processes_publish_one_name(tmp_path, monkeypatch):
    root = tmp_path / "zoo"
    monkeypatch.setenv("LOZOO_ZOO", str(root))
    monkeypatch.setattr(store, "BUNDLED_ROOT", tmp_path / "bundled")
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(root), NAME, str(seed), str(go), str(PER_WORKER)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for seed in (100, 200)
    ]
    time.sleep(0.2)
    go.touch()
    loads = 0
    deadline = time.monotonic() + 60
    while any(w.poll() is None for w in workers) and time.monotonic() < deadline:
        for info in zoo.list_entries():  # every visible entry must be complete and verify
            assert zoo.load(info.ref).meta["seed"] in range(100, 300)
            loads += 1
        time.sleep(0.01)
    outputs = [w.communicate(timeout=60) for w in workers]
    for w, (_, err) in zip(workers, outputs):
        assert w.returncode == 0, err
    published = [ref for out, _ in outputs for ref, _ in json.loads(out)]
    assert len(published) == 2 * PER_WORKER == len(set(published))
    expected = {f"{NAME}:1.{minor}.0" for minor in range(2 * PER_WORKER)}
    assert set(published) == expected
    assert {e.ref for e in zoo.list_entries()} == expected
    assert all(r.ok for r in zoo.verify())
    shas = {sha for out, _ in outputs for _, sha in json.loads(out)}
    assert {zoo.load(ref).theta_sha256 for ref in expected} == shas
    leftovers = [p.name for p in (root / "race" / "shared").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert loads > 0  # the reader overlapped the publishers; a half-written entry would raise
