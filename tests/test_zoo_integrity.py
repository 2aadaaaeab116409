"""Load-time safety and atomic publish: every broken entry fails loudly and loads nothing."""

from __future__ import annotations

import json
import pickle
import re

import pytest
import torch
from torch import nn

import lopt
import zoo
from zoo import store
from zoo.entry import config_json, file_sha256

REF = "f/n:1.0.0"


@pytest.fixture
def entry(zroot):
    theta = lopt.init_theta(lopt.ORIGINAL, torch.Generator().manual_seed(0))
    return zoo.publish(theta, lopt.ORIGINAL, "f/n")


def rehash(path, fname):
    """Record a tampered file's new hash, as a careless hand edit of meta.json would."""
    meta = json.loads((path / "meta.json").read_text())
    meta["files"][fname] = file_sha256(path / fname)
    if fname == "model.safetensors":
        meta["sha256"] = meta["files"][fname]
    (path / "meta.json").write_text(json.dumps(meta))


def truncate(path):
    model = path / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-50])


def flip_byte(path):
    model = path / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-3] ^= 0xFF
    model.write_bytes(bytes(data))


def other_weights(path):
    theta = lopt.init_theta(lopt.ORIGINAL, torch.Generator().manual_seed(1))
    lopt.save_theta(path / "model.safetensors", theta, lopt.ORIGINAL)
    rehash(path, "model.safetensors")  # file hashes patched, theta_sha256 left stale


def write_config(path, cfg):
    (path / "config.json").write_text(json.dumps(config_json(cfg)))
    rehash(path, "config.json")


def wider_config(path):
    write_config(path, lopt.SmallFCConfig(hidden_size=8))


def other_step_mult(path):
    write_config(path, lopt.SmallFCConfig(step_mult=0.5))


def pickle_model(path):
    theta = lopt.init_theta(lopt.ORIGINAL, torch.Generator().manual_seed(0))
    torch.save(theta, path / "model.safetensors")
    rehash(path, "model.safetensors")


def extra_pickle(path):
    torch.save({"x": torch.zeros(1)}, path / "optimizer.pt")


def raw_pickle(path):
    (path / "weights.dat").write_bytes(pickle.dumps({"w0": [1.0]}, protocol=4))


def symlinked_model(path):
    model = path / "model.safetensors"
    real = path.parent / "elsewhere.safetensors"
    model.rename(real)
    model.symlink_to(real)


def extra_file(path):
    (path / "notes.txt").write_text("hello")


def bad_meta_json(path):
    (path / "meta.json").write_text("{not json")


def renamed_version(path):
    path.rename(path.with_name("2.0.0"))


CASES = {
    "truncated": (truncate, REF, r"sha256 mismatch for model.safetensors .* corrupted or was"),
    "bit flip": (flip_byte, REF, "sha256 mismatch for model.safetensors"),
    "other weights": (other_weights, REF, r"theta sha256 mismatch \(recorded"),
    "missing model": (
        lambda p: (p / "model.safetensors").unlink(),
        REF,
        r"missing file\(s\) model",
    ),
    "missing config": (lambda p: (p / "config.json").unlink(), REF, r"missing file\(s\) config"),
    "missing card": (lambda p: (p / "README.md").unlink(), REF, r"missing file\(s\) README.md"),
    "missing meta": (lambda p: (p / "meta.json").unlink(), REF, "missing meta.json"),
    "bad meta json": (bad_meta_json, REF, "meta.json is not valid JSON"),
    "arch shapes": (
        wider_config,
        REF,
        r"architecture mismatch between config.json and model.safetensors: meta-weight 'w0'",
    ),
    "arch config": (other_step_mult, REF, "architecture mismatch: config.json .* differs from"),
    "pickle model": (pickle_model, REF, r"model.safetensors is a pickle \(torch.save output\)"),
    "pickle file": (extra_pickle, REF, "optimizer.pt, which looks like a pickle; the zoo holds"),
    "raw pickle": (raw_pickle, REF, "weights.dat, which looks like a pickle"),
    "symlink": (symlinked_model, REF, "model.safetensors not regular file.*symlinks are refused"),
    "stray file": (extra_file, REF, "contains notes.txt, which meta.json does not record"),
    "moved": (renamed_version, "f/n:2.0.0", "meta.json says version '1.0.0' but the entry's"),
}


@pytest.mark.parametrize("tamper,ref,message", CASES.values(), ids=CASES.keys())
def test_broken_entries_load_nothing(entry, tamper, ref, message):
    tamper(entry.path)
    full = rf"zoo entry {ref} \(user zoo, .*\): .*{message}"
    with pytest.raises(zoo.IntegrityError, match=full):
        zoo.load(ref)
    with pytest.raises(zoo.IntegrityError, match=message):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), weights=ref)
    [result] = zoo.verify(ref)
    assert not result.ok and re.search(full, result.problem)


def test_verify_false_skips_hashes_but_still_refuses_unreadable_weights(entry, zroot):
    flip_byte(entry.path)  # a mantissa byte: still a valid file with finite values
    assert zoo.load(REF, verify=False).theta_sha256 != entry.theta_sha256
    truncate(entry.path)
    with pytest.raises(zoo.IntegrityError, match=f"zoo entry {REF} .*not a valid safetensors"):
        zoo.load(REF, verify=False)


def test_verify_all_reports_each_entry(entry, zroot):
    theta = lopt.init_theta(lopt.ORIGINAL, torch.Generator().manual_seed(1))
    good = zoo.publish(theta, lopt.ORIGINAL, "f/other")
    flip_byte(entry.path)
    (zroot / "f" / "n" / "v2").mkdir()
    results = {r.ref: r for r in zoo.verify()}
    assert results[good.ref].ok
    assert "sha256 mismatch" in results[REF].problem
    notes = zoo.ignored_paths()
    assert any("f/n/v2: version directory name is not MAJOR.MINOR.PATCH" in n for n in notes)


def test_failed_publish_leaves_nothing_visible(zroot, monkeypatch):
    theta = lopt.init_theta(lopt.ORIGINAL, torch.Generator().manual_seed(0))

    def boom(*args, **kwargs):
        raise RuntimeError("disk full while writing the card")

    monkeypatch.setattr(zoo.api.cards, "render", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        zoo.publish(theta, lopt.ORIGINAL, "f/n")
    assert zoo.list_entries() == []
    assert list((zroot / "f" / "n").iterdir()) == []  # the staging dir was cleaned up
    monkeypatch.undo()
    monkeypatch.setenv("LOZOO_ZOO", str(zroot))
    assert zoo.publish(theta, lopt.ORIGINAL, "f/n").version == "1.0.0"


def test_crashed_publish_is_invisible_and_cleaned(zroot):
    stale = zroot / "f" / "n" / ".tmp-crashed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half written")
    assert zoo.list_entries() == [] and zoo.verify() == []
    with pytest.raises(zoo.EntryNotFoundError):
        zoo.load("f/n")
    theta = lopt.init_theta(lopt.ORIGINAL, torch.Generator().manual_seed(0))
    assert zoo.publish(theta, lopt.ORIGINAL, "f/n").version == "1.0.0"
    assert not stale.exists()


def test_commit_never_overwrites(tmp_path):
    staged, final = tmp_path / ".tmp-x", tmp_path / "1.0.0"
    staged.mkdir()
    (staged / "a").write_text("a")
    final.mkdir()  # os.rename would silently replace an empty directory
    with pytest.raises(zoo.EntryExistsError, match="appeared while publishing; not overwritten"):
        store.commit(staged, final)
