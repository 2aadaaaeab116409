"""``python -m metatrain.eval --compare``: the table, the goal verdicts and the refusals.

The reports are synthetic but real (tests/suite_reports.py): constructed runs go through the
suite's own report builder and writer, so they have the exact ``suite.json`` schema.
"""

from __future__ import annotations

import json
import math

import pytest

from metatrain import eval as eval_cli
from metatrain.generalisation import OptimizerSpec, RunConfig
from metatrain.generalisation.compare import compare_reports
from tasks.heldout import CORE_PROBLEMS
from tests.suite_reports import ADAMW, MUON, Side, use_fast_reports, write_report

LEARNED = OptimizerSpec("celo2/test:1.0.0", "learned", 1.0, {"optimizer": "lopt", "theta": "t"})


@pytest.fixture(autouse=True)
def fast_reports(monkeypatch):
    use_fast_reports(monkeypatch)


def cli(argv, capsys) -> tuple[int, str, str]:
    rc = eval_cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def rows(markdown: str, problem: str) -> list[list[str]]:
    """The main table's rows of ``problem`` as lists of cells."""
    table = markdown.split("**Goals**")[0]
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith(f"| {problem} (")
    ]


def test_table_has_adamw_once_then_every_optimizer_in_order_with_mean_sd_and_ratios(
    tmp_path, capsys
):
    ref = {"fmnist_mlp": Side(train=(0.4, 0.6), test=(0.5, 0.7))}
    learned = {"fmnist_mlp": Side(train=(0.2, 0.4), test=(0.7, 0.7), best=RunConfig(3.0))}
    dirs = [
        write_report(tmp_path / "adamw", ADAMW, reference=ref),
        write_report(tmp_path / "lo", LEARNED, learned, reference=ref),
        write_report(tmp_path / "muon", MUON, reference=ref),
    ]
    out = tmp_path / "cmp" / "table.md"
    rc, stdout, _ = cli(["--compare", *dirs, "--baseline", "muon", "--out", str(out)], capsys)
    assert rc == 0 and out.read_text() == stdout
    table = rows(stdout, "fmnist_mlp")
    assert [r[1] for r in table] == ["adamw", "celo2/test:1.0.0", "muon"]
    sd = 0.1 * math.sqrt(2)  # two seeds 0.2 apart
    assert table[0] == [
        "fmnist_mlp (10 steps)",
        "adamw",
        "0.001, cosine, wd 0",
        f"0.5 ± {sd:.2g}",
        f"0.6 ± {sd:.2g}",
        "0.875 ± 0",
        "0/2",
        "1",
        "1",
    ]
    assert table[1][2:] == [
        "3, constant, wd 0",
        f"0.3 ± {sd:.2g}",
        "0.7 ± 0",
        "0.875 ± 0",
        "0/2",
        "0.6",  # 0.3 / 0.5
        "1.17",  # 0.7 / 0.6
    ]
    for name in CORE_PROBLEMS:
        assert len(rows(stdout, name)) == 3
    assert "**celo2/test:1.0.0**" in stdout and "**muon**" not in stdout  # a baseline is not judged


def test_goal_verdicts_margins_and_the_exact_test_loss_bound(tmp_path):
    # AdamW: train 0.5, test 0.5 everywhere; muon: train 0.25 everywhere
    ref = {n: Side(test=(0.5, 0.5)) for n in CORE_PROBLEMS}
    learned = {
        "digits_mlp": Side(train=(0.1, 0.1), test=(0.525, 0.525)),  # exactly 1.05 × AdamW: within
        "fmnist_mlp": Side(train=(0.4, 0.4), test=(0.5, 0.5)),
        "fmnist_conv": Side(train=(0.25, 0.25), test=(0.5, 0.5)),  # ties muon
        "text_transformer": Side(train=(0.6, 0.6), test=(0.5, 0.5)),  # loses to AdamW
    }
    muon = {n: Side(train=(0.25, 0.25)) for n in CORE_PROBLEMS}
    dirs = [
        write_report(tmp_path / "lo", LEARNED, learned, reference=ref),
        write_report(tmp_path / "muon", MUON, muon, reference=ref),
    ]
    result = compare_reports(dirs, baselines=["muon"])
    assert result.goals["celo2/test:1.0.0"] == {
        "a": "PASS",
        "b": "PASS",
        "c": "PASS",
        "d:muon": "1 of 4",
    }
    assert result.wins["celo2/test:1.0.0"] == {"adamw": 3, "muon": 1}
    text = result.markdown
    assert "| digits_mlp (10 steps) | 0/2, 0/1 | 0.2 win | 1.05 within | 0.4 win |" in text
    assert "| text_transformer (10 steps) | 0/2, 0/1 | 1.2 loss | 1 within | 2.4 loss |" in text
    assert (
        "(b) final train loss below tuned AdamW's on ≥ 3 of 4: **PASS** (3 wins, 0 ties, 1 loss)"
        in text
    )
    assert (
        "(d) vs muon: lower final train loss on **1 of 4** "
        "(1 win, 1 tie, 2 losses; tie on fmnist_conv)" in text
    )
    # a hair over the bound fails (c) and names the problem and its margin
    learned["digits_mlp"] = Side(train=(0.1, 0.1), test=(0.5251, 0.5251))
    dirs[0] = write_report(tmp_path / "lo2", LEARNED, learned, reference=ref)
    result = compare_reports(dirs, baselines=["muon"])
    assert result.goals["celo2/test:1.0.0"]["c"] == "FAIL"
    assert "| 1.0502 over |" in result.markdown  # never printed as the bound itself
    assert "**FAIL** (3 of 4 within; over on digits_mlp)" in result.markdown


def test_check_exits_1_naming_every_unmet_goal_and_0_when_all_are_met(tmp_path, capsys):
    ref = {n: Side(test=(0.5, 0.5)) for n in CORE_PROBLEMS}
    good = {n: Side(train=(0.1, 0.1), test=(0.5, 0.5)) for n in CORE_PROBLEMS}
    muon = {n: Side(train=(0.2, 0.2)) for n in CORE_PROBLEMS}
    lo = write_report(tmp_path / "lo", LEARNED, good, reference=ref)
    mu = write_report(tmp_path / "muon", MUON, muon, reference=ref)
    args = ["--compare", str(lo), str(mu), "--baseline", "muon"]
    rc, out, err = cli([*args, "--check"], capsys)
    assert rc == 0 and "goals not met" not in err
    assert "(d) vs muon: lower final train loss on **4 of 4** (4 wins, 0 ties, 0 losses)" in out
    assert "goal ≥ 2: met" in out
    # one test loss over the bound, and muon beaten on only 1 problem
    bad = dict(good, digits_mlp=Side(train=(0.1, 0.1), test=(0.6, 0.6)))
    for name in ("fmnist_mlp", "fmnist_conv", "text_transformer"):
        bad[name] = Side(train=(0.3, 0.3), test=(0.5, 0.5))
    lo = write_report(tmp_path / "lo2", LEARNED, bad, reference=ref)
    rc, out, err = cli(["--compare", str(lo), str(mu), "--baseline", "muon", "--check"], capsys)
    assert rc == 1 and "goal ≥ 2: missed" in out
    assert err.strip() == (
        "python -m metatrain.eval: goals not met: celo2/test:1.0.0: (c) FAIL; "
        "celo2/test:1.0.0: (d) vs muon 1 wins < 2"
    )
    # without --check the same comparison exits 0: the table is the product
    assert cli(args[:1] + [str(lo), str(mu), "--baseline", "muon"], capsys)[0] == 0


def test_ties_are_not_wins_including_two_zero_losses(tmp_path):
    ref = {"digits_mlp": Side(train=(0.0, 0.0)), "fmnist_mlp": Side(train=(0.3, 0.3))}
    learned = {
        "digits_mlp": Side(train=(0.0, 0.0)),
        "fmnist_mlp": Side(train=(0.3, 0.3)),
        "fmnist_conv": Side(train=(0.1, 0.1)),
        "text_transformer": Side(train=(0.1, 0.1)),
    }
    result = compare_reports([write_report(tmp_path / "lo", LEARNED, learned, reference=ref)])
    assert result.wins["celo2/test:1.0.0"]["adamw"] == 2
    assert result.goals["celo2/test:1.0.0"]["b"] == "FAIL"
    assert "| 0/2 | 1 (both 0) | 1 |" in result.markdown  # the table's ratio cells
    assert "| 1 (both 0) tie |" in result.markdown
    assert "(2 wins, 2 ties, 0 losses; tie on digits_mlp, fmnist_mlp)" in result.markdown


@pytest.mark.parametrize(
    ("side", "detail", "cell"),
    [
        (
            Side(diverged_seed=True, train=(0.1, None), test=(0.5, None)),
            "text_transformer: 1/2 seeds of 0.001, cosine, wd 0 (loss above 10x its start)",
            "1/2, 0/1 ✗",
        ),
        (
            Side(diverged_grid=True, train=(0.1, 0.1)),
            "text_transformer: seed-0 grid run 30, cosine, wd 0 (loss above 10x its start)",
            "0/2, 1/2 ✗",
        ),
        (
            Side(diverged_ablation=True, train=(0.1, 0.1)),
            "text_transformer: 1/2 seeds of the constant ablation's best, 0.001, cosine, wd 0",
            "0/2, 0/1 ✗",
        ),
    ],
    ids=["tuned-seed", "grid-run", "ablation-seed"],
)
def test_any_divergence_fails_goal_a_and_names_the_run(tmp_path, side, detail, cell):
    learned = {"text_transformer": side}
    result = compare_reports([write_report(tmp_path / "lo", LEARNED, learned)])
    assert result.goals["celo2/test:1.0.0"]["a"] == "FAIL"
    assert f"(a) never diverges: **FAIL** ({detail})" in result.markdown
    assert f"| text_transformer (10 steps) | {cell} |" in result.markdown
    clean = compare_reports([write_report(tmp_path / "ok", LEARNED, {})])
    assert clean.goals["celo2/test:1.0.0"]["a"] == "PASS"


def test_a_diverged_seed_without_a_finite_mean_is_not_a_win(tmp_path):
    learned = {"digits_mlp": Side(train=(None, None), test=(None, None), diverged_seed=True)}
    result = compare_reports([write_report(tmp_path / "lo", LEARNED, learned)])
    row = "| celo2/test:1.0.0 | 0.001, cosine, wd 0 | n/a | n/a | n/a | 1/2 | n/a | n/a |"
    assert row in result.markdown
    assert "| n/a n/a | n/a over |" in result.markdown
    assert "1 without a finite mean" in result.markdown
    assert result.goals["celo2/test:1.0.0"]["c"] == "FAIL"


def test_extras_are_shown_but_not_counted_and_problems_selects(tmp_path):
    problems = (*CORE_PROBLEMS, "digits_mlp_long")
    learned = {n: Side(train=(0.1, 0.1)) for n in ("digits_mlp", "fmnist_mlp")}
    learned["digits_mlp_long"] = Side(train=(0.1, 0.1), test=(9.0, 9.0))  # would fail (c)
    lo = write_report(tmp_path / "lo", LEARNED, learned, problems=problems)
    result = compare_reports([lo])
    assert result.problems == list(problems)
    assert "| digits_mlp_long (10 steps, extra) | celo2/test:1.0.0 |" in result.markdown
    assert "| digits_mlp_long (10 steps, extra, not counted) |" in result.markdown
    assert result.goals["celo2/test:1.0.0"]["c"] == "PASS"
    assert result.wins["celo2/test:1.0.0"]["adamw"] == 2
    subset = compare_reports([lo], problems=["digits_mlp", "fmnist_mlp"])
    assert subset.problems == ["digits_mlp", "fmnist_mlp"]
    assert "digits_mlp_long" not in subset.markdown.split("**Goals**")[0]
    # 2 wins of the 2 compared: (b) is still open with two core problems not compared
    assert subset.goals["celo2/test:1.0.0"] == {"a": "OPEN", "b": "OPEN", "c": "OPEN"}
    assert "not compared: fmnist_conv, text_transformer" in subset.markdown
    # problems not in every report are left out, and said so
    muon = write_report(tmp_path / "muon", MUON)
    both = compare_reports([lo, muon])
    assert both.problems == list(CORE_PROBLEMS)
    assert "Not in every report, left out: digits_mlp_long." in both.markdown


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"steps_scale": 0.02, "steps": 20},
            "steps scale (--steps-scale): 0.01 (adamw) vs 0.02 (celo2/test:1.0.0)",
        ),
        ({"steps": 20}, "digits_mlp steps: 10 (adamw) vs 20 (celo2/test:1.0.0)"),
        ({"seeds": 3}, "seeds (--seeds): 2 (adamw) vs 3 (celo2/test:1.0.0)"),
        (
            {"reference": {"fmnist_conv": Side(train=(0.4, 0.4))}},
            "fmnist_conv tuned AdamW (best config, mean final train loss): 0.001, cosine, wd 0, "
            "0.5 (adamw) vs 0.001, cosine, wd 0, 0.4 (celo2/test:1.0.0)",
        ),
    ],
    ids=["steps-scale", "steps", "seeds", "adamw"],
)
def test_incomparable_reports_are_refused_unless_allow_mixed(tmp_path, capsys, change, message):
    adamw = write_report(tmp_path / "adamw", ADAMW)
    change = dict(change)
    seeds = change.pop("seeds", 2)
    sides = {n: Side(train=(0.5,) * seeds, test=(0.6,) * seeds) for n in CORE_PROBLEMS}
    other = write_report(tmp_path / "lo", LEARNED, sides, **change)
    rc, out, err = cli(["--compare", adamw, other], capsys)
    assert rc == 2 and out == ""
    assert f"error: the reports are not comparable: {message}" in err
    assert "or pass --allow-mixed" in err and err.count("\n") == 1
    assert ("steps: " in err) == ("steps" in change and "steps_scale" not in change)
    rc, out, _ = cli(["--compare", adamw, other, "--allow-mixed"], capsys)
    assert rc == 0 and "Mixed settings (--allow-mixed; " in out and message in out


def _edit(path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (lambda d: None, [], "does not exist; --compare takes the --out directories of finished"),
        (lambda d: d.mkdir(), [], "holds no suite.json: point --compare at the --out directory"),
        (
            lambda d: (d.mkdir(), (d / "suite.json").write_text("{oops")),
            [],
            "suite.json is not a suite report (not JSON",
        ),
        (
            lambda d: (d.mkdir(), (d / "suite.json").write_text('{"aggregate": {}}')),
            [],
            "is not a suite report (no 'schema' field",
        ),
        (
            lambda d: _edit(
                write_report(d, LEARNED) and d / "suite.json",
                lambda r: r.update(schema="lozoo-suite/0"),
            ),
            [],
            "has schema 'lozoo-suite/0', but this lozoo reads 'lozoo-suite/1'",
        ),
        (
            lambda d: _edit(
                write_report(d, LEARNED) and d / "suite.json",
                lambda r: r["problems"][0].pop("steps"),
            ),
            [],
            "does not match lozoo-suite/1 at problems/0: 'steps' is a required property; the "
            "file is damaged",
        ),
        (
            lambda d: write_report(d, LEARNED),
            ["--baseline", "sgd"],
            "--baseline sgd is none of the compared reports; give an optimizer of the compared "
            "reports (adamw, celo2/test:1.0.0)",
        ),
        (
            lambda d: write_report(d, LEARNED),
            ["--baseline", "adamw"],
            "--baseline adamw is the AdamW reference",
        ),
        (
            lambda d: write_report(d, LEARNED),
            ["--problems", "digits_mlp_long"],
            "--problems names digits_mlp_long, which not every report has (adamw: digits_mlp,",
        ),
    ],
    ids=[
        "missing",
        "empty-dir",
        "not-json",
        "foreign",
        "old-schema",
        "damaged",
        "baseline",
        "baseline-is-adamw",
        "problems",
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, make, args, message):
    adamw = write_report(tmp_path / "adamw", ADAMW)
    bad = tmp_path / "bad"
    make(bad)
    rc, out, err = cli(["--compare", adamw, str(bad), *args], capsys)
    assert rc == 2 and out == ""
    assert (
        message in err
        and err.count("\n") == 1
        and err.startswith("python -m metatrain.eval: error:")
    )


def test_the_report_shows_every_grid_lr_with_its_train_and_test_loss(tmp_path, monkeypatch):
    """The choice is by train loss; the grid table shows what it costs in test loss."""
    use_fast_reports(monkeypatch)
    sides = {"digits_mlp": Side(train=(1e-9, 2e-9), test=(5.5, 5.7), diverged_grid=True)}
    write_report(tmp_path / "lo", LEARNED, sides)
    table = (tmp_path / "lo" / "table.md").read_text()
    assert "Tuning grid, seed 0 (final train loss / test loss" in table
    lo = f"| digits_mlp | {LEARNED.name} | cosine, 0 |"
    assert f"{lo} 0.001: 1e-09 / 5.5 *; 30: n/a / n/a (div.) |" in table.splitlines()
    assert "| digits_mlp | adamw | cosine, 0 | 0.001: 0.5 / 0.6 * |" in table.splitlines()
    report = json.loads((tmp_path / "lo" / "suite.json").read_text())
    grid = report["problems"][0]["optimizer"]["grid"]
    assert [g["final_test_loss"] for g in grid] == [5.5, None]
    # a report written before grid test losses were kept still reads, showing train losses
    for g in grid:
        del g["final_test_loss"]
    from metatrain.generalisation.report import markdown
    from metatrain.generalisation.schema import validate_report

    validate_report(report)
    assert f"{lo} 0.001: 1e-09 *; 30: n/a (div.) |" in markdown(report).splitlines()
