"""The held-out problems of the generalisation suite: data, splits, models, short AdamW runs."""

from __future__ import annotations

import math

import pytest
import torch

from metatrain.generalisation import RunConfig, resolve_spec, train_run
from metatrain.generalisation import runner as runner_mod
from tasks import heldout, text
from tasks.heldout import PROBLEM_NAMES, get_problem, hidden_matrices, load_digits_split


@pytest.fixture(autouse=True)
def small_eval_sets(monkeypatch):
    monkeypatch.setattr(runner_mod, "EVAL_BATCH_CAP", 4)


# (problem, steps, bound on the final train loss with AdamW lr 1e-2, constant). Every problem
# starts at 2.3-2.5 (10 classes) or about 5.4 (text: 128 symbols); measured on 3 seeds:
# digits 0.11-0.12, F-MNIST MLP 0.57-0.60, conv 1.26-1.31, text 3.27-3.33.
SHORT_RUNS = [
    ("digits_mlp", 100, 0.3),
    ("fmnist_mlp", 60, 0.8),
    ("fmnist_conv", 60, 1.6),
    ("text_transformer", 40, 3.6),
]


@pytest.mark.parametrize(("name", "steps", "bound"), SHORT_RUNS, ids=[r[0] for r in SHORT_RUNS])
def test_adamw_trains_every_problem_below_a_stated_bound(name, steps, bound):
    problem = get_problem(name)
    result = train_run(
        problem, problem.make_task(), resolve_spec("adamw"), RunConfig(1e-2), 0, steps
    )
    assert not result.diverged, result.divergence
    assert result.initial_loss > 2.0
    assert result.final["train_loss"] < bound
    assert result.final["test_loss"] < result.initial_loss
    assert 0.0 <= result.final["test_accuracy"] <= 1.0


def test_problem_table():
    assert PROBLEM_NAMES == (
        "digits_mlp",
        "fmnist_mlp",
        "fmnist_conv",
        "text_transformer",
        "digits_mlp_long",
    )
    assert get_problem("digits_mlp_long").steps == 10 * get_problem("digits_mlp").steps
    shapes = {n: get_problem(n).make_task().param_shapes() for n in PROBLEM_NAMES}
    assert shapes["digits_mlp"]["layer0.weight"] == (64, 64)
    assert shapes["fmnist_mlp"]["layer1.weight"] == (128, 128)
    assert shapes["fmnist_conv"]["conv1.weight"] == (32, 16, 3, 3)
    assert shapes["text_transformer"]["block1.attn.qkv.weight"] == (192, 64)
    with pytest.raises(ValueError, match="unknown held-out problem 'nope'; valid: digits_mlp"):
        get_problem("nope")


def test_hidden_matrices_exclude_inputs_heads_and_vectors():
    def hidden(name):
        return hidden_matrices(get_problem(name).make_task())

    assert hidden("digits_mlp") == ["layer0.weight"]
    assert hidden("fmnist_mlp") == ["layer0.weight", "layer1.weight"]
    assert hidden("fmnist_conv") == ["conv0.weight", "conv1.weight"]
    names = hidden("text_transformer")
    assert len(names) == 8 and all(n.startswith("block") for n in names)
    assert "embed.weight" not in names and "head.weight" not in names


def test_digits_split_is_stratified_disjoint_and_fixed():
    x_tr, y_tr = load_digits_split("train")
    x_te, y_te = load_digits_split("test")
    assert len(y_tr) + len(y_te) == 1797 and abs(len(y_te) / 1797 - 0.2) < 0.01
    assert x_tr.shape[1] == 64 and float(x_tr.max()) == 1.0 and float(x_tr.min()) == 0.0
    for c in range(10):
        share = int((y_te == c).sum()) / int((y_tr == c).sum() + (y_te == c).sum())
        assert abs(share - 0.2) < 0.02
    rows = {tuple(r.tolist()) for r in x_tr}
    assert sum(tuple(r.tolist()) in rows for r in x_te) < 5  # digits has a few duplicate images
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        load_digits_split("valid")


def test_text_corpus_is_recorded_and_split_by_entry():
    corpus = text.load_corpus()
    assert corpus.num_bytes > 2_000_000 and "ascii-art" not in corpus.files
    assert len(corpus.sha256) == 64
    total = len(corpus.train) + len(corpus.test)
    assert 0.07 < len(corpus.test) / total < 0.13
    assert int(corpus.train.max()) < text.VOCAB_SIZE
    task = text.CharTransformerTask()
    win = task.windows("train")
    assert torch.equal(win["x"][0, 1:], win["y"][0, :-1])  # y is x shifted by one character
    assert torch.equal(win["y"][0, -1], win["x"][1, 0])  # windows tile the stream
    assert "fortunes" in corpus.describe()


def test_missing_corpus_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv(text.CORPUS_ENV, str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        text.load_corpus()
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(text.CORPUS_ENV, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="holds no corpus files"):
        text.CharTransformerTask().batches("train", 1, 0)


def test_encoding_maps_non_ascii_to_one_symbol():
    tokens = text.encode("é a".encode())
    assert tokens.tolist() == [text.UNKNOWN_TOKEN, text.UNKNOWN_TOKEN, 32, 97]


def test_same_seed_same_init_and_batches_for_every_optimizer():
    problem = get_problem("digits_mlp")
    task = problem.make_task()
    a = train_run(problem, task, resolve_spec("adamw"), RunConfig(1e-3), 1, 3)
    b = train_run(problem, task, resolve_spec("sgd"), RunConfig(1e-3), 1, 3)
    c = train_run(problem, task, resolve_spec("adamw"), RunConfig(1e-3), 2, 3)
    assert a.train_loss[0] == b.train_loss[0]  # same init, same first batch
    assert a.train_loss[0] != c.train_loss[0]
    assert math.isfinite(a.train_loss[-1])


def test_muon_orthogonalises_conv_kernels_as_matrices():
    problem = get_problem("fmnist_conv")
    result = train_run(problem, problem.make_task(), resolve_spec("muon"), RunConfig(3e-3), 0, 5)
    assert not result.diverged
    assert result.train_loss[-1] < result.train_loss[0]
    assert heldout.data_fingerprint(problem.make_task()).startswith("fashion_mnist:")


def _seeded_spec(arch: str, tmp_path):
    import lopt

    cfg = lopt.get_architecture(arch).preset()
    theta = lopt.get_architecture(arch).init_theta(cfg, generator=torch.Generator().manual_seed(0))
    return resolve_spec(str(lopt.save_theta(tmp_path / f"{arch}.safetensors", theta, cfg)))


def _adam_routed(arch: str, problem_name: str, tmp_path) -> dict[str, bool]:
    """Which tensors the suite's optimizer for ``arch`` puts on the Adam branch after one step."""
    from lopt.celo2 import core as celo2_core

    task = get_problem(problem_name).make_task()
    named = {n: torch.zeros(s, requires_grad=True) for n, s in task.param_shapes().items()}
    opt = _seeded_spec(arch, tmp_path).build(named, hidden_matrices(task), RunConfig(1.0), 10)
    for t in named.values():
        t.grad = torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel()))
    opt.step()
    return {n: celo2_core.is_adam_state(opt.state[t]) for n, t in named.items()}


def test_celo2_gets_muons_split_embeddings_and_heads_take_its_adam_branch(tmp_path):
    routed = _adam_routed("celo2", "text_transformer", tmp_path)
    task = get_problem("text_transformer").make_task()
    hidden = set(hidden_matrices(task))
    assert {"embed.weight", "pos.weight", "head.weight"} <= {n for n, a in routed.items() if a}
    for name in task.param_shapes():
        # hidden matrices take the learned rule; everything Muon leaves to AdamW takes Adam
        assert routed[name] == (name not in hidden), name
    assert all(routed[n] for n, s in task.param_shapes().items() if len(s) <= 1)


def test_celo2_base_has_no_adam_branch_for_the_suite_to_route_to(tmp_path):
    routed = _adam_routed("celo2_base", "fmnist_mlp", tmp_path)
    assert not any(routed.values())


@pytest.mark.parametrize(
    ("arch", "io_group"),
    [("celo2", {"adam": True}), ("celo2_base", None), ("small_fc_lopt", None)],
)
def test_a_learned_optimizers_group_options_are_part_of_its_cache_identity(
    arch, io_group, tmp_path
):
    assert _seeded_spec(arch, tmp_path).identity.get("io_group") == io_group
