"""Meta-training on a mixture of task families, and the reparam augmentation inside the unroll."""

from __future__ import annotations

import json

import pytest
import torch

import lopt
import tasks
from metatrain import MetaTrainConfig, train
from metatrain.cli import main as cli_main
from metatrain.config import CELO2_RECIPE
from metatrain.evaluation import seeds as seeds_mod
from metatrain.worker import Worker, build_estimator, estimator_families
from tests.tiny_runs import TINY_MNIST, tiny_config

MIX = "mlp_mnist,mlp_fashion_mnist,mlp_digits"


def mix_config(out_dir, **overrides) -> MetaTrainConfig:
    values = dict(task_family=MIX, outer_steps=4, checkpoint_every=2)
    values.update(overrides)
    return tiny_config(out_dir, **values)


def test_families_parse_in_order_and_bad_names_list_the_valid_ones(tmp_path):
    cfg = mix_config(tmp_path)
    assert cfg.families == ("mlp_mnist", "mlp_fashion_mnist", "mlp_digits")
    assert mix_config(tmp_path, task_family=" mlp_digits , mlp_mnist").families == (
        "mlp_digits",
        "mlp_mnist",
    )
    with pytest.raises(ValueError, match=r"unknown task family 'cifar'; valid names: mlp_mnist, "):
        mix_config(tmp_path, task_family="mlp_mnist,cifar").validate()
    with pytest.raises(ValueError, match=r"unknown task family ''"):
        mix_config(tmp_path, task_family="mlp_mnist,").validate()
    with pytest.raises(ValueError, match=r"names a family twice"):
        mix_config(tmp_path, task_family="mlp_mnist,mlp_mnist").validate()


def test_options_apply_to_every_family_or_to_one_by_prefix(tmp_path):
    cfg = mix_config(tmp_path, task_option={**TINY_MNIST, "mlp_digits.width": 24})
    assert cfg.family_options("mlp_mnist")["width"] == 16
    assert cfg.family_options("mlp_digits")["width"] == 24
    cfg.validate()
    bad = mix_config(tmp_path, task_option={**TINY_MNIST, "conv_mnist.depth": 1})
    with pytest.raises(ValueError, match=r"'conv_mnist' is not a family of this run"):
        bad.validate()
    with pytest.raises(ValueError, match=r"has no option\(s\) widht"):
        mix_config(tmp_path, task_option={"mlp_digits.widht": 3}).validate()


def test_estimator_slots_cycle_through_the_families_and_keep_them_on_resample(tmp_path):
    cfg = mix_config(tmp_path, num_estimators=2, resample_every=1)
    assert estimator_families(cfg) == ["mlp_mnist", "mlp_fashion_mnist", "mlp_digits"] * 2
    worker = Worker(cfg)
    datasets = [est.unroll.problem.task.dataset for est in worker.estimators]
    assert datasets == ["mnist", "fashion_mnist", "digits"] * 2
    theta = lopt.flatten_theta(lopt.init_theta(cfg.lopt_config()), cfg.lopt_config())
    seeds_before = list(worker.seeds)
    worker.compute(theta, 0)
    assert worker.seeds != seeds_before  # every slot was resampled (probability 1)
    datasets = [est.unroll.problem.task.dataset for est in worker.estimators]
    assert datasets == ["mnist", "fashion_mnist", "digits"] * 2
    assert [c["family"] for c in worker.task_configs()] == estimator_families(cfg)
    # the evaluation's seed enumeration knows a mixture has F times the estimators
    enumerated = set(seeds_mod.metatrain_seeds(cfg.to_dict()))
    assert set(worker.seeds) <= enumerated


def test_mixture_resume_is_bit_identical(tmp_path):
    extra = {"task_option": {**TINY_MNIST, "reparam_scale": [1e-3, 1e3]}}
    full = train(mix_config(tmp_path / "a", **extra))
    part = mix_config(tmp_path / "b", **extra)
    part.outer_steps = 2
    train(part)
    resumed = train(mix_config(tmp_path / "b", **extra), resume=True)
    for k in full.theta:
        assert torch.equal(full.theta[k], resumed.theta[k]), k
    record = json.loads((full.run_dir / "config.json").read_text())
    assert [c["family"] for c in record["task_configs"]] == list(mix_config(tmp_path).families)
    assert {c["dataset"] for c in record["task_configs"]} == {"mnist", "fashion_mnist", "digits"}


def test_resume_refuses_a_different_mixture(tmp_path):
    train(mix_config(tmp_path / "a", outer_steps=2))
    other = mix_config(tmp_path / "a", task_family="mlp_digits,mlp_mnist,mlp_fashion_mnist")
    with pytest.raises(ValueError, match=r"resume with the same --task-family"):
        train(other, resume=True)


def test_cli_mixture_error_lists_valid_names(tmp_path, capsys):
    argv = ["--task-family", "mlp_mnist,svhn", "--out-dir", str(tmp_path / "r")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown task family 'svhn'; valid names: mlp_mnist, mlp_fashion_mnist, mlp_d" in err


def test_unroll_pairs_share_the_reparam_scale_and_redraw_it_at_resets(tmp_path):
    cfg = tiny_config(
        tmp_path,
        task_option={**TINY_MNIST, "reparam_scale": [1e-3, 1e3]},
        num_tasks=3,
        schedule="constant",
        trajectory_length=2,
        random_offset=0,
    )
    est, _ = build_estimator(cfg, None, seed=5)
    unroll = est.unroll
    n = unroll.num_pairs
    seen = []
    theta = lopt.flatten_theta(lopt.init_theta(cfg.lopt_config()), cfg.lopt_config())
    for _ in range(4):  # trajectories of 2 steps + 1 reset slot: resets happen
        s = unroll.state["task_cfg"][tasks.REPARAM_KEY]
        assert torch.equal(s[:n], s[n:])  # + and − lanes share s
        assert ((s >= 1e-3 * (1 - 1e-6)) & (s <= 1e3 * (1 + 1e-6))).all()
        seen.append(s.clone())
        out = unroll.run(theta.expand(2 * n, -1).clone(), 1)
        losses = out.losses
        assert ((losses >= 0) & (losses <= 3.4540)).all()
    assert not torch.equal(seen[0], seen[-1])  # redrawn at resets


def test_celo2_preset_is_the_recipe_and_explicit_flags_win(capsys):
    from metatrain.config import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--preset", "celo2", "--outer-lr", "3e-4"]))
    assert cfg.families == ("mlp_mnist", "mlp_fashion_mnist", "mlp_digits")
    assert (cfg.estimator, cfg.num_tasks, cfg.truncation_length, cfg.sigma) == ("pes", 8, 50, 0.01)
    assert (cfg.schedule, cfg.min_trajectory_length, cfg.trajectory_length) == (
        "loguniform",
        100,
        2000,
    )
    assert cfg.task_option["reparam_scale"] == [1e-3, 1e3] and cfg.task_option["width"] == 32
    assert (cfg.outer_lr, cfg.outer_weight_decay, cfg.grad_clip) == (3e-4, 1e-4, 0.0)
    assert cfg.offset == 2000
    quick = config_from_args(build_parser().parse_args(["--quick"]))
    assert quick.outer_steps == 800
    with pytest.raises(ValueError, match=r"--quick is --preset quick"):
        config_from_args(build_parser().parse_args(["--quick", "--preset", "celo2"]))


def parsed(*argv):
    from metatrain.config import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(list(argv)))


def test_a_preset_fits_its_task_options_to_the_families_a_run_mixes_in():
    four = "mlp_mnist,mlp_fashion_mnist,mlp_digits,conv_mnist"
    cfg = parsed("--preset", "celo2", "--task-family", four, "--task-option", "conv_mnist.depth=2")
    # conv_mnist has no width: the preset's width goes to the MLP families only
    assert "width" not in cfg.task_option
    for name in ("mlp_mnist", "mlp_fashion_mnist", "mlp_digits"):
        assert cfg.family_options(name)["width"] == 32
    conv = cfg.family_options("conv_mnist")
    assert "width" not in conv and conv["depth"] == 2
    assert conv["reparam_scale"] == [1e-3, 1e3] and conv["image_sizes"] == [8]
    # the preset's own families keep the plain keys (the recipe's config is unchanged)
    assert parsed("--preset", "celo2").task_option == CELO2_RECIPE["task_option"]
    # a family the preset's options do not fit at all gets none of them
    assert parsed("--quick", "--task-family", "quadratic").task_option == {}
    # options given on the command line win over the preset's, plain or scoped
    mine = parsed("--preset", "celo2", "--task-family", "mlp_mnist,conv_mnist",
                  "--task-option", "mlp_mnist.width=64")  # fmt: skip
    assert mine.family_options("mlp_mnist")["width"] == 64
    # ... and a plain option of the user's that a family lacks is still an error
    with pytest.raises(ValueError, match="task family 'conv_mnist' has no option.s. width"):
        parsed("--preset", "celo2", "--task-family", "mlp_mnist,conv_mnist",
               "--task-option", "width=64")  # fmt: skip


def test_outer_adamw_decays_theta_and_zero_clip_keeps_large_gradients():
    from metatrain.learner import OuterLearner

    theta = torch.ones(3)
    adamw = OuterLearner(theta, lr=0.1, grad_clip=0.0, weight_decay=0.5)
    adam = OuterLearner(theta, lr=0.1, grad_clip=0.0)
    assert isinstance(adamw.optimizer, torch.optim.AdamW)
    zero = [torch.zeros(3)]
    adamw.apply(zero)
    adam.apply(zero)
    torch.testing.assert_close(adamw.theta, torch.full((3,), 1 - 0.1 * 0.5))  # decoupled decay
    torch.testing.assert_close(adam.theta, torch.ones(3))
    clipped = OuterLearner(theta, lr=0.1, grad_clip=3.0)
    free = OuterLearner(theta, lr=0.1, grad_clip=0.0)
    big = [torch.tensor([100.0, 0.0, 0.0])]
    assert clipped.apply(big)["grad_norm"] == pytest.approx(3.0)
    assert free.apply(big)["grad_norm"] == pytest.approx(100.0)
