"""Zoo API: publish → list → load → train, versions, bundled zoo, remove, annotate, cards."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

import lopt
import zoo
from zoo import store


def theta(seed=0, cfg=lopt.ORIGINAL):
    return lopt.init_theta(cfg, torch.Generator().manual_seed(seed))


def train_steps(weights, steps=5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    opt = lopt.SmallFCLOpt(model.parameters(), weights=weights)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    return opt


def test_publish_list_load_train(zroot):
    meta = {"task_family": "mlp_mnist", "outer_steps": 3, "command": ["python", "-m", "x"]}
    entry = zoo.publish(theta(), lopt.ORIGINAL, "small_fc_lopt/mlp_test", meta=meta)
    assert (entry.ref, entry.version, entry.bundled) == ("small_fc_lopt/mlp_test:1.0.0", "1.0.0", 0)
    assert entry.path == zroot / "small_fc_lopt" / "mlp_test" / "1.0.0"
    assert sorted(p.name for p in entry.path.iterdir()) == [
        "README.md",
        "config.json",
        "meta.json",
        "model.safetensors",
    ]
    listed = zoo.list_entries()
    assert [(e.ref, e.bundled, e.task_family) for e in listed] == [
        ("small_fc_lopt/mlp_test:1.0.0", False, "mlp_mnist")
    ]
    loaded = zoo.load("small_fc_lopt/mlp_test")
    assert loaded.config == lopt.ORIGINAL
    assert all(torch.equal(loaded.theta[k], theta()[k]) for k in theta())
    assert loaded.meta["outer_steps"] == 3 and loaded.meta["num_params"] == 197
    assert loaded.sha256 == zoo.entry.file_sha256(entry.path / "model.safetensors")
    opt = train_steps("small_fc_lopt/mlp_test")
    assert opt.meta_weights_info == {
        "sha256": loaded.theta_sha256,
        "source": "zoo:small_fc_lopt/mlp_test:1.0.0",
    }
    opt2 = lopt.SmallFCLOpt.from_zoo("small_fc_lopt/mlp_test:1.0.0", nn.Linear(2, 2).parameters())
    assert opt2.meta_weights_info == opt.meta_weights_info


def test_versions_bump_minor_and_latest_resolves_newest(zroot):
    refs = [zoo.publish(theta(i), "original", "f/n").ref for i in range(3)]
    assert refs == ["f/n:1.0.0", "f/n:1.1.0", "f/n:1.2.0"]
    assert zoo.publish(theta(9), "original", "f/n", version="1.10.0").version == "1.10.0"
    assert zoo.load("f/n").version == "1.10.0"
    assert zoo.load("f/n:latest").version == "1.10.0"
    assert zoo.load("f/n:1.1.0").theta_sha256 == lopt.theta_sha256(theta(1))
    assert zoo.publish(theta(3), "original", "f/n").version == "1.11.0"
    assert zoo.resolve("f/n").ref == "f/n:1.11.0"


def test_explicit_existing_version_is_refused(zroot):
    zoo.publish(theta(), "original", "f/n", version="2.0.0")
    with pytest.raises(zoo.EntryExistsError, match=r"f/n:2.0.0 already exists in the user zoo"):
        zoo.publish(theta(1), "original", "f/n", version="2.0.0")
    with pytest.raises(zoo.InvalidRefError, match="not a strict semantic version"):
        zoo.publish(theta(1), "original", "f/n", version="2.0")
    with pytest.raises(zoo.InvalidRefError, match="version must be a 'MAJOR.MINOR.PATCH' string"):
        zoo.publish(theta(1), "original", "f/n", version=2)


@pytest.mark.parametrize(
    "ref,error,message",
    [
        ("f/missing", zoo.EntryNotFoundError, "no zoo entry named 'f/missing' in the user zoo"),
        ("f/nn", zoo.EntryNotFoundError, "Did you mean f/n"),
        ("f/n:9.9.9", zoo.EntryNotFoundError, r"f/n has no version 9.9.9 \(available: 1.0.0"),
        ("f/../n", zoo.InvalidRefError, "must not contain '..'"),
    ],
)
def test_load_errors(zroot, ref, error, message):
    zoo.publish(theta(), "original", "f/n")
    with pytest.raises(error, match=message):
        zoo.load(ref)


def test_not_found_message_says_how_to_publish(zroot):
    with pytest.raises(zoo.EntryNotFoundError, match="python -m zoo publish RUN_DIR --name a/b"):
        zoo.load("a/b")
    with pytest.raises(zoo.EntryNotFoundError, match=r"weights=None\) loads the default zoo"):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters())
    with pytest.raises(zoo.EntryNotFoundError, match="no file named 'a/b' exists either"):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), weights="a/b")
    with pytest.raises(zoo.InvalidRefError, match="zoo name part 'Bad'"):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), weights="Bad/name")
    with pytest.raises(FileNotFoundError, match="meta-weights file not found"):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), weights="a/b.safetensors")


def test_config_passed_with_zoo_ref_must_match(zroot):
    zoo.publish(theta(), "original", "f/n")
    with pytest.raises(ValueError, match="differs from the config passed"):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), weights="f/n", config=lopt.MULO)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"meta": {"sha256": "x"}}, ValueError, r"meta keys \['sha256'\] are written by the zoo"),
        ({"meta": {"bad": object()}}, ValueError, "meta must be JSON-serialisable"),
        ({"attachments": {"../x.png": __file__}}, ValueError, "attachment name '../x.png'"),
        ({"attachments": {"meta.json": __file__}}, ValueError, "attachment name 'meta.json'"),
        ({"attachments": {"a.png": "/nonexistent.png"}}, FileNotFoundError, "file not found"),
        ({"attachments": {"w.pt": __file__}}, ValueError, "looks like a pickle"),
    ],
)
def test_publish_rejects_bad_meta_and_attachments(zroot, kwargs, error, message):
    with pytest.raises(error, match=message):
        zoo.publish(theta(), "original", "f/n", **kwargs)
    assert zoo.list_entries() == []


def test_publish_rejects_bad_theta_and_names(zroot):
    bad = theta()
    bad["w1"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="'w1' contains NaN or inf"):
        zoo.publish(bad, "original", "f/n")
    with pytest.raises(ValueError, match=r"meta-weight 'w0' has shape \(39, 4\)"):
        zoo.publish(theta(), lopt.MULO, "f/n")
    with pytest.raises(zoo.InvalidRefError, match="must be exactly 'family/name'"):
        zoo.publish(theta(), "original", "f/n/x")
    assert not zroot.exists() or zoo.list_entries() == []


def test_card_attachments_and_metrics(zroot, tmp_path):
    png = tmp_path / "curves.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    meta = {
        "task_family": "mlp_mnist",
        "command": ["python", "-m", "metatrain", "--task-family", "mlp_mnist"],
        "meta_training": {"estimator": "pes", "sigma": 0.01},
        "metrics": {"mnist": {"final_loss": 0.25, "acc": 0.91}, "fmnist": {"final_loss": 0.5}},
        "seed": 3,
    }
    entry = zoo.publish(
        theta(), "original", "f/n", meta=meta, card="Trained for tests.", attachments=[png]
    )
    card = entry.card
    assert card.startswith("---\nlibrary_name: lozoo\n")
    for text in (
        "Trained for tests.",
        "python -m metatrain --task-family mlp_mnist",
        "| estimator | pes |",
        "| task | acc | final_loss |",
        "| mnist | 0.91 | 0.25 |",
        "![curves.png](curves.png)",
        'weights="f/n:1.0.0"',
        entry.sha256,
    ):
        assert text in card, text
    assert (entry.path / "curves.png").read_bytes() == png.read_bytes()
    assert entry.meta["files"]["curves.png"] == zoo.entry.file_sha256(png)


def test_annotate_adds_metrics_as_next_patch(zroot, tmp_path):
    png = tmp_path / "curves.png"
    png.write_bytes(b"\x89PNG fake")
    zoo.publish(theta(), "original", "f/n", meta={"metrics": {"a": {"loss": 1.0}}})
    zoo.publish(theta(1), "original", "f/n")
    out = zoo.annotate("f/n:1.0.0", meta={"metrics": {"b": {"loss": 2.0}}}, attachments=[png])
    assert out.version == "1.0.1"
    assert out.meta["metrics"] == {"a": {"loss": 1.0}, "b": {"loss": 2.0}}
    assert out.sha256 == zoo.load("f/n:1.0.0").sha256  # same weights, byte for byte
    assert out.meta["annotates"]["ref"] == "f/n:1.0.0"
    assert "![curves.png](curves.png)" in out.card
    assert zoo.annotate("f/n:1.0.0").version == "1.0.2"
    assert zoo.load("f/n").version == "1.1.0"  # annotations never outrank newer weights


def test_remove(zroot):
    for i in range(3):
        zoo.publish(theta(i), "original", "f/n")
    with pytest.raises(
        zoo.InvalidRefError, match=r"remove needs an explicit version.*1.0.0, 1.1.0"
    ):
        zoo.remove("f/n")
    assert zoo.remove("f/n:1.1.0") == ["f/n:1.1.0"]
    assert zoo.remove("f/n:latest") == ["f/n:1.2.0"]
    assert [e.ref for e in zoo.list_entries()] == ["f/n:1.0.0"]
    with pytest.raises(zoo.EntryNotFoundError, match="has no version 1.1.0"):
        zoo.remove("f/n:1.1.0")
    zoo.publish(theta(), "original", "f/n")
    assert zoo.remove("f/n", all_versions=True) == ["f/n:1.0.0", "f/n:1.1.0"]
    assert zoo.list_entries() == []
    assert not any(p.name.startswith(".trash") for p in (zroot / "f" / "n").iterdir())


def make_bundled(tmp_path, name, version, seed):
    """Publish into a scratch zoo and move the entry into the (monkeypatched) bundled zoo."""
    scratch = tmp_path / f"scratch-{seed}"
    entry = zoo.publish(theta(seed), "original", name, version=version, root=scratch)
    target = store.BUNDLED_ROOT / name / version
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(entry.path, target)
    return target


def test_bundled_zoo_is_listed_loaded_and_read_only(zroot, tmp_path):
    make_bundled(tmp_path, "small_fc_lopt/mlp_mnist", "1.0.0", seed=1)
    [info] = zoo.list_entries()
    assert (info.ref, info.bundled) == ("small_fc_lopt/mlp_mnist:1.0.0", True)
    entry = zoo.load("small_fc_lopt/mlp_mnist")
    assert entry.bundled and entry.theta_sha256 == lopt.theta_sha256(theta(1))
    train_steps(None)  # weights=None loads the default entry, here the bundled one
    with pytest.raises(zoo.ReadOnlyError, match="is bundled with lozoo .* and read-only"):
        zoo.remove("small_fc_lopt/mlp_mnist:1.0.0")
    with pytest.raises(zoo.ReadOnlyError, match="read-only"):
        zoo.remove("small_fc_lopt/mlp_mnist", all_versions=True)
    with pytest.raises(zoo.EntryExistsError, match="already exists in the bundled zoo"):
        zoo.publish(theta(), "original", "small_fc_lopt/mlp_mnist", version="1.0.0")
    newer = zoo.publish(theta(2), "original", "small_fc_lopt/mlp_mnist")
    assert newer.version == "1.1.0" and not newer.bundled
    assert zoo.load("small_fc_lopt/mlp_mnist").ref == "small_fc_lopt/mlp_mnist:1.1.0"
    assert [r.ok for r in zoo.verify()] == [True, True]


def test_user_wins_exact_tie_with_bundled(zroot, tmp_path):
    zoo.publish(theta(2), "original", "f/n", version="1.0.0")
    make_bundled(tmp_path, "f/n", "1.0.0", seed=1)  # e.g. a package upgrade ships 1.0.0 later
    assert not zoo.load("f/n").bundled
    assert zoo.load("f/n:1.0.0").theta_sha256 == lopt.theta_sha256(theta(2))
    assert [e.bundled for e in zoo.list_entries()] == [False, True]
    zoo.remove("f/n:1.0.0")
    assert zoo.load("f/n").bundled


def test_publish_dir_reads_run_directories(zroot, tmp_path):
    run = tmp_path / "run"
    lopt.save_theta(run / "theta.safetensors", theta(4), lopt.ORIGINAL)
    (run / "config.json").write_text(json.dumps({"estimator": "pes", "outer_steps": 10}))
    (run / "meta.json").write_text(json.dumps({"task_family": "quadratic", "sha256": "stale"}))
    entry = zoo.publish_dir(run, "f/run", meta={"seed": 1})
    assert entry.meta["meta_training"] == {"estimator": "pes", "outer_steps": 10}
    assert entry.meta["task_family"] == "quadratic" and entry.meta["seed"] == 1
    assert entry.theta_sha256 == lopt.theta_sha256(theta(4))
    copied = zoo.publish_dir(entry.path)  # an entry directory republishes under its own name
    assert copied.ref == "f/run:1.1.0" and copied.sha256 == entry.sha256


@pytest.mark.parametrize(
    "setup,message",
    [
        ("empty", r"no model.safetensors or theta.safetensors in"),
        ("pickle", "theta.pt look\\(s\\) like pickles, which lozoo never loads"),
        ("both", "holds both model.safetensors and theta.safetensors; choose one"),
        ("bare", "no learned-optimizer config for"),
        ("mismatch", "architecture mismatch: .*config.json .* differs from the config stored"),
        ("noname", "no zoo name given"),
    ],
)
def test_publish_dir_errors(zroot, tmp_path, setup, message):
    from safetensors.torch import save_file

    run = tmp_path / "run"
    run.mkdir()
    if setup == "pickle":
        torch.save(theta(), run / "theta.pt")
    if setup == "both":
        lopt.save_theta(run / "theta.safetensors", theta(), lopt.ORIGINAL)
        lopt.save_theta(run / "model.safetensors", theta(), lopt.ORIGINAL)
    if setup == "bare":
        save_file(theta(), str(run / "model.safetensors"))
    if setup == "mismatch":
        lopt.save_theta(run / "model.safetensors", theta(), lopt.ORIGINAL)
        (run / "config.json").write_text(lopt.SmallFCConfig(step_mult=0.5).to_json())
    if setup == "noname":
        lopt.save_theta(run / "model.safetensors", theta(), lopt.ORIGINAL)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        zoo.publish_dir(run, None if setup == "noname" else "f/n")


def test_zoo_ref_wins_over_a_directory_of_the_same_name(zroot, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f" / "n").mkdir(parents=True)  # e.g. running from inside a zoo root
    zoo.publish(theta(), "original", "f/n")
    opt = lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), weights="f/n")
    assert opt.meta_weights_info["source"] == "zoo:f/n:1.0.0"
    lopt.save_theta(tmp_path / "f" / "file", theta(1), lopt.ORIGINAL)  # an existing file wins
    opt = lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), weights="f/file")
    assert opt.meta_weights_info["source"].startswith("file:")
