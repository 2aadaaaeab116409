"""Several suite reports side by side, against their shared tuned AdamW, with the goal checks.

``python -m metatrain.eval --compare DIR [DIR ...] [--baseline NAME ...]`` (:mod:`.cli`) loads
the ``suite.json`` of each ``--suite generalisation`` run, checks that the runs are comparable
(same horizons, seeds, tuning axes and the same tuned AdamW), and prints one Markdown table:
per problem the AdamW reference once, then every report's optimizer in the order given, each
with its best config, mean ± sd over seeds of the final train and test loss, test accuracy,
diverged seeds and its train and test loss over AdamW's.

Under the table, for every optimizer that is neither AdamW nor a ``--baseline``, the goals of
docs/design/generalisation.md ("Comparing reports"), over the core problems
(:data:`tasks.heldout.CORE_PROBLEMS`; extras such as ``digits_mlp_long`` are shown, never
counted):

* (a) it never diverges: no diverged seed of its tuned config, no diverged seed-0 grid run
  (the report runs other seeds only for the best config) and no diverged ablation seed;
* (b) its mean final train loss is strictly below tuned AdamW's on at least
  :data:`TRAIN_WINS_NEEDED` problems;
* (c) its mean test loss is at most :data:`TEST_LOSS_TOLERANCE` × AdamW's on every problem;
* (d) per baseline: the problems where its mean final train loss is strictly below the
  baseline's; the goal is :data:`BASELINE_WINS_NEEDED` of them.

``--check`` turns the verdicts into the exit status (:meth:`Comparison.unmet`): 1 when any judged
optimizer misses a goal or leaves one open, so a script can gate on it.

Equal means (two losses of exactly 0, say) are ties, never wins.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.heldout import CORE_PROBLEMS, EXTRA_PROBLEMS

from .report import SCHEMA, _cfg, _pm
from .schema import validate_report
from .write import REPORT

__all__ = [
    "BASELINE_WINS_NEEDED",
    "TEST_LOSS_TOLERANCE",
    "TRAIN_WINS_NEEDED",
    "Comparison",
    "LoadedReport",
    "compare_reports",
    "comparison_table",
    "load_report",
]

TEST_LOSS_TOLERANCE = 1.05
"""Goal (c): mean test loss at most this many times tuned AdamW's, on every core problem."""
TRAIN_WINS_NEEDED = 3
"""Goal (b): strictly lower mean final train loss than tuned AdamW's on this many problems."""
BASELINE_WINS_NEEDED = 2
"""Goal (d): strictly lower mean final train loss than each ``--baseline`` on this many."""

_RERUN = (
    "run python -m metatrain.eval --suite generalisation --optimizer REF --out DIR (finished runs "
    "are cached, so a rerun is quick)"
)


@dataclass(frozen=True)
class LoadedReport:
    """One suite report and how the comparison names it."""

    label: str
    path: Path  # the suite.json file
    report: Mapping[str, Any] = field(repr=False)

    @property
    def optimizer(self) -> str:
        return self.report["config"]["optimizer_spec"]["name"]

    @property
    def is_reference(self) -> bool:
        """The report of AdamW itself: its rows are the reference rows."""
        cfg = self.report["config"]
        return cfg["optimizer_spec"]["identity"] == cfg["reference_spec"]["identity"]

    def problem(self, name: str) -> Mapping[str, Any]:
        return next(p for p in self.report["problems"] if p["name"] == name)


@dataclass
class Comparison:
    """The result of :func:`compare_reports`: the Markdown and the goal verdicts."""

    markdown: str
    problems: list[str]
    goals: dict[str, dict[str, str]]  # optimizer label → goal → verdict (PASS / FAIL / OPEN)
    wins: dict[str, dict[str, int]]  # optimizer label → "adamw" or baseline label → wins

    def unmet(self) -> list[str]:
        """Every goal a judged optimizer misses or leaves open, as ``"label: goal (verdict)"``.

        (a)–(c) count unless PASS; (d) counts for each baseline beaten on fewer than
        :data:`BASELINE_WINS_NEEDED` core problems. Empty: every goal is met.
        """
        out = []
        for label, verdicts in self.goals.items():
            for goal in ("a", "b", "c"):
                if verdicts[goal] != "PASS":
                    out.append(f"{label}: ({goal}) {verdicts[goal]}")
            for key, won in self.wins[label].items():
                if key != "adamw" and won < BASELINE_WINS_NEEDED:
                    out.append(f"{label}: (d) vs {key} {won} wins < {BASELINE_WINS_NEEDED}")
        return out


def load_report(path: str | Path) -> dict[str, Any]:
    """The ``suite.json`` in directory ``path`` (or the file itself), schema-checked."""
    given = Path(path)
    file = given / REPORT if given.is_dir() else given
    if not file.exists():
        if given.is_dir():
            raise FileNotFoundError(
                f"{given} holds no {REPORT}: point --compare at the --out directory of a finished "
                f"suite run ({REPORT} is written last, so a run still going has none yet), or "
                f"{_RERUN}"
            )
        raise FileNotFoundError(
            f"{given} does not exist; --compare takes the --out directories of finished suite "
            "runs (a suite run writes its directory when it finishes)"
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not a suite report (not JSON: {err}); {_RERUN}") from None
    if not isinstance(data, dict) or "schema" not in data:
        raise ValueError(
            f"{file} is not a suite report (no 'schema' field; {REPORT} of a suite run has "
            f"{SCHEMA!r}); --compare reads the output of --suite generalisation, not of a "
            "task-family evaluation"
        )
    if data["schema"] != SCHEMA:
        raise ValueError(
            f"{file} has schema {data['schema']!r}, but this lozoo reads {SCHEMA!r}; {_RERUN} "
            "with this version, or compare it with the lozoo that wrote it"
        )
    try:
        validate_report(data)
    except ValueError as err:
        raise ValueError(f"{file}: {err}; the file is damaged or was edited: {_RERUN}") from None
    return data


def _labels(names: Sequence[str], paths: Sequence[Path]) -> list[str]:
    """Optimizer names; the same optimizer twice is told apart by its report's directory."""
    labels = [
        n if names.count(n) == 1 else f"{n} [{path.parent.name}]" for n, path in zip(names, paths)
    ]
    if len(set(labels)) < len(labels):
        labels = [
            n if names.count(n) == 1 else f"{n} [{path.parent}]" for n, path in zip(names, paths)
        ]
    return labels


def _load_all(paths: Sequence[str | Path]) -> list[LoadedReport]:
    if not paths:
        raise ValueError("--compare needs at least one suite report directory")
    reports = [load_report(p) for p in paths]
    files = [Path(p) / REPORT if Path(p).is_dir() else Path(p) for p in paths]
    names = [r["config"]["optimizer_spec"]["name"] for r in reports]
    return [
        LoadedReport(label, file, report)
        for label, file, report in zip(_labels(names, files), files, reports)
    ]


def _select_problems(
    entries: Sequence[LoadedReport], problems: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """The problems to show (and those left out because not every report has them)."""
    covered = {e.label: [p["name"] for p in e.report["problems"]] for e in entries}
    if problems:
        for name in problems:
            lacking = [label for label, names in covered.items() if name not in names]
            if lacking:
                have = "; ".join(f"{label}: {', '.join(covered[label])}" for label in lacking)
                raise ValueError(
                    f"--problems names {name}, which not every report has ({have}); drop it "
                    "from --problems or compare reports that evaluated it"
                )
        return list(dict.fromkeys(problems)), []
    every = [n for e in entries for n in covered[e.label]]
    union = list(dict.fromkeys(every))
    common = [n for n in union if all(n in names for names in covered.values())]
    if not common:
        have = "; ".join(f"{label}: {', '.join(names)}" for label, names in covered.items())
        raise ValueError(f"the reports share no problem ({have}); compare like with like")
    return common, [n for n in union if n not in common]


def _num(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _differences(entries: Sequence[LoadedReport], problems: Sequence[str]) -> list[str]:
    """Every setting in which the reports differ, naming the values and the reports."""
    out: list[str] = []

    def check(what: str, value: Callable[[LoadedReport], Any], fmt: Callable[[Any], str]) -> bool:
        values = [(e.label, value(e)) for e in entries]
        if len({json.dumps(v, sort_keys=True) for _, v in values}) > 1:
            out.append(f"{what}: " + " vs ".join(f"{fmt(v)} ({label})" for label, v in values))
            return True
        return False

    def listed(v: Any) -> str:
        return ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)

    check("steps scale (--steps-scale)", lambda e: e.report["config"]["steps_scale"], "{:g}".format)
    check("seeds (--seeds)", lambda e: e.report["config"]["seeds"], str)
    check("schedules (--schedules)", lambda e: e.report["config"]["schedules"], listed)
    check("weight decays (--weight-decays)", lambda e: e.report["config"]["weight_decays"], listed)
    check(
        "reference optimizer",
        lambda e: e.report["config"]["reference_spec"]["identity"],
        lambda v: json.dumps(v, sort_keys=True),
    )
    settings_differ = bool(out)
    scale_differs = settings_differ and out[0].startswith("steps scale")
    for name in problems:
        # every problem's steps follow from a different scale, which is named already
        steps_differ = not scale_differs and check(
            f"{name} steps", lambda e, n=name: e.problem(n)["steps"], str
        )
        if settings_differ or steps_differ:
            continue  # a different tuned AdamW follows from the settings named
        check(
            f"{name} tuned AdamW (best config, mean final train loss)",
            lambda e, n=name: [
                e.problem(n)["reference"]["best"],
                e.problem(n)["reference"]["final"]["train_loss"]["mean"],
            ],
            lambda v: f"{_cfg(v[0])}, {_num(v[1])}",
        )
    return out


def _sd(stat: Mapping[str, Any]) -> dict[str, Any]:
    """A ``{mean, se, n}`` record as ``{mean, se: sd}`` for :func:`.report._pm`."""
    se = stat["se"]
    return {"mean": stat["mean"], "se": None if se is None else se * math.sqrt(stat["n"])}


def _outcome(mine: float | None, theirs: float | None) -> str:
    """``win`` (strictly lower), ``tie`` (equal), ``loss``, or ``n/a`` (no finite mean of ours)."""
    if mine is None:
        return "n/a"
    if theirs is None or mine < theirs:
        return "win"
    return "tie" if mine == theirs else "loss"


def _ratio(mine: float | None, theirs: float | None, bound: float = 1.0) -> str:
    """``mine / theirs`` with enough digits never to print a ratio as ``bound`` it is not."""
    if mine is None or theirs is None:
        return "n/a"
    if theirs == 0:
        return "1 (both 0)" if mine == 0 else "inf"
    r = mine / theirs
    text = f"{r:.3g}"
    return f"{r:.6g}" if text == f"{bound:.3g}" and r != bound else text


def _loss_mean(t: Mapping[str, Any], key: str) -> float | None:
    return t["final"][key]["mean"]


def _problem_cell(p: Mapping[str, Any], counted: str = "") -> str:
    extra = f", extra{counted}" if p["name"] in EXTRA_PROBLEMS else ""
    return f"{p['name']} ({p['steps']} steps{extra})"


def _diverged_grid(t: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [g for g in t["grid"] if g["diverged"]]


_TABLE_HEAD = (
    "| problem | optimizer | best (lr, schedule, wd) | final train loss | test loss | "
    "test acc | diverged seeds | train / AdamW | test / AdamW |",
    "|---|---|---|---|---|---|---|---|---|",
)


def _table_row(p: Mapping[str, Any], who: str, t: Mapping[str, Any], ref: Mapping[str, Any]):
    f = t["final"]
    edge = " (edge)" if t["lr_at_grid_edge"] else ""
    div = f"{t['diverged_seeds']}/{t['seeds']}"
    grid = _diverged_grid(t)
    if grid:
        div += f" (grid {len(grid)}/{len(t['grid'])})"
    ratios = [_ratio(_loss_mean(t, k), _loss_mean(ref, k)) for k in ("train_loss", "test_loss")]
    return (
        f"| {_problem_cell(p)} | {who} | {_cfg(t['best'])}{edge} | {_pm(_sd(f['train_loss']))} | "
        f"{_pm(_sd(f['test_loss']))} | {_pm(_sd(f['test_accuracy']))} | {div} | "
        f"{ratios[0]} | {ratios[1]} |"
    )


def comparison_table(entries: Sequence[LoadedReport], problems: Sequence[str]) -> list[str]:
    """The Markdown table: per problem, AdamW (from the first report), then every optimizer."""
    lines = list(_TABLE_HEAD)
    ref_name = entries[0].report["config"]["reference_spec"]["name"]
    for name in problems:
        first = entries[0].problem(name)
        lines.append(_table_row(first, ref_name, first["reference"], first["reference"]))
        for e in entries:
            if not e.is_reference:
                p = e.problem(name)
                lines.append(_table_row(p, e.label, p["optimizer"], p["reference"]))
    return lines


def _divergence_notes(p: Mapping[str, Any], t: Mapping[str, Any]) -> list[str]:
    notes = []
    if t["diverged_seeds"]:
        reasons = "; ".join(t["divergence"])
        notes.append(f"{t['diverged_seeds']}/{t['seeds']} seeds of {_cfg(t['best'])} ({reasons})")
    for g in _diverged_grid(t):
        notes.append(f"seed-0 grid run {_cfg(g['config'])} ({g['divergence']})")
    for label, pair in p.get("ablation", {}).items():
        a = pair["optimizer"]
        if a["diverged_seeds"]:
            notes.append(
                f"{a['diverged_seeds']}/{t['seeds']} seeds of the {label} ablation's best, "
                f"{_cfg(a['best'])}"
            )
    return notes


def _goals(
    entry: LoadedReport,
    baselines: Sequence[LoadedReport],
    problems: Sequence[str],
) -> tuple[list[str], dict[str, str], dict[str, int]]:
    """Markdown lines, verdicts and win counts of one optimizer's goal checks."""
    core = [n for n in problems if n in CORE_PROBLEMS]
    missing = [n for n in CORE_PROBLEMS if n not in problems]
    total = len(CORE_PROBLEMS)
    head = ["problem", "(a) diverged: seeds, grid runs", "(b) train loss / AdamW"]
    head.append(f"(c) test loss / AdamW (≤ {TEST_LOSS_TOLERANCE:g})")
    head += [f"(d) train loss / {b.label}" for b in baselines]
    lines = [
        f"**{entry.label}**",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    diverged: dict[str, list[str]] = {}
    train: dict[str, str] = {}
    test_ok: dict[str, bool] = {}
    versus: dict[str, dict[str, str]] = {b.label: {} for b in baselines}
    for name in problems:
        p = entry.problem(name)
        t, ref = p["optimizer"], p["reference"]
        notes = _divergence_notes(p, t)
        grid = _diverged_grid(t)
        train_out = _outcome(_loss_mean(t, "train_loss"), _loss_mean(ref, "train_loss"))
        mine_test, ref_test = _loss_mean(t, "test_loss"), _loss_mean(ref, "test_loss")
        within = (
            mine_test is not None
            and ref_test is not None
            and mine_test <= TEST_LOSS_TOLERANCE * ref_test
        )
        cells = [
            _problem_cell(p, ", not counted"),
            f"{t['diverged_seeds']}/{t['seeds']}, {len(grid)}/{len(t['grid'])}"
            + (" ✗" if notes else ""),
            f"{_ratio(_loss_mean(t, 'train_loss'), _loss_mean(ref, 'train_loss'))} {train_out}",
            f"{_ratio(mine_test, ref_test, TEST_LOSS_TOLERANCE)} {'within' if within else 'over'}",
        ]
        for b in baselines:
            theirs = _loss_mean(b.problem(name)["optimizer"], "train_loss")
            out = _outcome(_loss_mean(t, "train_loss"), theirs)
            cells.append(f"{_ratio(_loss_mean(t, 'train_loss'), theirs)} {out}")
            if name in CORE_PROBLEMS:
                versus[b.label][name] = out
        lines.append("| " + " | ".join(cells) + " |")
        if name in CORE_PROBLEMS:
            diverged[name], train[name], test_ok[name] = notes, train_out, within
    lines.append("")
    not_compared = f"; not compared: {', '.join(missing)}" if missing else ""

    def all_of(failed: list[str]) -> str:
        if failed:
            return "FAIL"
        return "OPEN" if missing else "PASS"

    bad = [n for n in core if diverged[n]]
    verdicts = {"a": all_of(bad)}
    detail = "; ".join(f"{n}: {', '.join(diverged[n])}" for n in bad)
    lines.append(
        f"- (a) never diverges: **{verdicts['a']}** "
        + (f"({detail})" if bad else f"(no diverged run on {len(core)} problems{not_compared})")
    )
    wins = {"adamw": sum(train[n] == "win" for n in core)}
    if wins["adamw"] >= TRAIN_WINS_NEEDED:
        verdicts["b"] = "PASS"
    elif wins["adamw"] + len(missing) < TRAIN_WINS_NEEDED:
        verdicts["b"] = "FAIL"
    else:
        verdicts["b"] = "OPEN"
    lines.append(
        f"- (b) final train loss below tuned AdamW's on ≥ {TRAIN_WINS_NEEDED} of {total}: "
        f"**{verdicts['b']}** ({_tally(train, core)}{not_compared})"
    )
    over = [n for n in core if not test_ok[n]]
    verdicts["c"] = all_of(over)
    lines.append(
        f"- (c) test loss within {100 * (TEST_LOSS_TOLERANCE - 1):.0f} % of AdamW's on all "
        f"{total}: **{verdicts['c']}** ({len(core) - len(over)} of {len(core)} within"
        + (f"; over on {', '.join(over)}" if over else "")
        + f"{not_compared})"
    )
    for b in baselines:
        won = sum(v == "win" for v in versus[b.label].values())
        wins[b.label] = won
        verdicts[f"d:{b.label}"] = f"{won} of {len(core)}"
        met = "met" if won >= BASELINE_WINS_NEEDED else "missed"
        lines.append(
            f"- (d) vs {b.label}: lower final train loss on **{won} of {len(core)}** "
            f"({_tally(versus[b.label], core)}); goal ≥ {BASELINE_WINS_NEEDED}: {met}"
        )
    return lines, verdicts, wins


def _tally(outcomes: Mapping[str, str], names: Sequence[str]) -> str:
    """``2 wins, 1 tie, 1 loss; tie on X`` (and ``n/a`` for undefined means, if any)."""
    count = {k: sum(outcomes[n] == k for n in names) for k in ("win", "tie", "loss", "n/a")}
    text = ", ".join(
        f"{count[k]} {k if count[k] == 1 else plural}"
        for k, plural in (("win", "wins"), ("tie", "ties"), ("loss", "losses"))
    )
    if count["n/a"]:
        text += f", {count['n/a']} without a finite mean"
    ties = [n for n in names if outcomes[n] == "tie"]
    return text + (f"; tie on {', '.join(ties)}" if ties else "")


def _resolve_baselines(entries: Sequence[LoadedReport], names: Sequence[str]) -> list[LoadedReport]:
    """``--baseline`` values: an optimizer label or name, or a report path as given."""
    out = []
    for name in names:
        found = [
            e
            for e in entries
            if name in (e.label, e.optimizer)
            or Path(name).resolve() in (e.path.resolve(), e.path.parent.resolve())
        ]
        if len(found) != 1:
            valid = ", ".join(e.label for e in entries)
            what = "matches several reports" if found else "is none of the compared reports"
            raise ValueError(
                f"--baseline {name} {what}; give an optimizer of the compared reports ({valid}) "
                "or a report directory"
            )
        if found[0].is_reference:
            raise ValueError(
                f"--baseline {name} is the AdamW reference, which goals (b) and (c) already "
                "compare against; name another optimizer"
            )
        if found[0] not in out:
            out.append(found[0])
    return out


def compare_reports(
    paths: Sequence[str | Path],
    *,
    baselines: Sequence[str] = (),
    problems: Sequence[str] | None = None,
    allow_mixed: bool = False,
) -> Comparison:
    """Load suite reports, check they are comparable, and build the table and the goal checks.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the report and the fix for a missing,
    foreign or damaged ``suite.json``, an unknown ``--baseline`` or ``--problems`` entry, and,
    unless ``allow_mixed``, for reports run under different settings.
    """
    entries = _load_all(paths)
    chosen, left_out = _select_problems(entries, problems)
    base = _resolve_baselines(entries, baselines)
    mixed = _differences(entries, chosen)
    if mixed and not allow_mixed:
        raise ValueError(
            "the reports are not comparable: "
            + "; ".join(mixed)
            + ". Compare reports run with the same settings, or pass --allow-mixed"
        )
    cfg = entries[0].report["config"]
    shown = [e.label for e in entries if not e.is_reference]
    lines = [
        f"**{', '.join(shown) or 'AdamW'}** against tuned **AdamW** on {len(chosen)} held-out "
        f"problems ({cfg['seeds']} seeds; steps × {cfg['steps_scale']:g}; schedules "
        f"{', '.join(cfg['schedules'])}; weight decays "
        f"{', '.join(f'{w:g}' for w in cfg['weight_decays'])}). Losses and accuracy: mean ± sd "
        "over seeds of the best config; ratios: mean over tuned AdamW's mean (below 1 is better).",
        "",
        *comparison_table(entries, chosen),
        "",
    ]
    if left_out:
        lines.append(f"Not in every report, left out: {', '.join(left_out)}.")
    for e in entries:
        if e.report["incomplete"]:
            lines.append(
                f"{e.label} is a partial report ({e.report['stopped']}); not evaluated: "
                f"{', '.join(e.report['incomplete'])}."
            )
    if mixed:
        lines.append(
            "Mixed settings (--allow-mixed; each optimizer's ratios are against the AdamW of its "
            f"own report, the AdamW rows are {entries[0].label}'s): " + "; ".join(mixed) + "."
        )
    if lines[-1]:
        lines.append("")
    goals: dict[str, dict[str, str]] = {}
    wins: dict[str, dict[str, int]] = {}
    judged = [e for e in entries if not e.is_reference and e not in base]
    lines.append(
        f"**Goals** over the {len(CORE_PROBLEMS)} core problems ({', '.join(CORE_PROBLEMS)}; "
        "extras are shown, not counted): (a) no diverged seed of the tuned config, seed-0 grid run "
        "(other seeds run only for the best config) or ablation seed; (b) mean final train loss "
        f"strictly below tuned AdamW's on ≥ {TRAIN_WINS_NEEDED}; (c) mean test loss ≤ "
        f"{TEST_LOSS_TOLERANCE:g} × AdamW's on all; (d) problems with a strictly lower mean final "
        "train loss than each baseline's. Equal means are ties, not wins. Cells: ratio, verdict."
    )
    lines.append("")
    if not judged:
        lines += ["No goal checks: every compared optimizer is AdamW or a --baseline.", ""]
    for e in judged:
        block, verdicts, won = _goals(e, base, chosen)
        lines += [*block, ""]
        goals[e.label], wins[e.label] = verdicts, won
    lines.append("Reports:")
    lines.append("")
    for e in entries:
        lines.append(f"- {e.label}: {e.path} (created {e.report['created']})")
    return Comparison(markdown="\n".join(lines) + "\n", problems=chosen, goals=goals, wins=wins)
