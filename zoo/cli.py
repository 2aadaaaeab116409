"""``python -m zoo``: list, show, verify, publish, remove and import learned-optimizer weights.

User errors (bad names, missing entries, corrupted files, ...) print one ``error: ...`` line on
stderr and exit with status 1; ``verify`` exits 1 when any entry fails. ``--root DIR`` selects the
user zoo (default ``$LOZOO_ZOO`` or the user cache dir); the bundled zoo is always included.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import api, pylo, rundir, store
from .entry import CARD, CONFIG
from .errors import ZooError


def _root_option(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--root",
        default=default,
        metavar="DIR",
        help="user zoo directory (default: $LOZOO_ZOO, else the user cache dir)",
    )


def _cmd_list(args: argparse.Namespace) -> int:
    entries = api.list_entries(args.root)
    if args.json:
        rows = [
            {"ref": e.ref, "zoo": "bundled" if e.bundled else "user", "path": str(e.path), **e.meta}
            for e in entries
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not entries:
        print(f"no entries (user zoo: {store.user_root(args.root)})")
        return 0
    rows = [("REF", "ARCHITECTURE", "ZOO", "CREATED", "TASK FAMILY", "SHA256")]
    for e in entries:
        created = e.created or (e.problem and "unreadable meta.json") or ""
        zoo = "bundled" if e.bundled else "user"
        rows.append(
            (e.ref, e.architecture or "-", zoo, created, e.task_family or "-", e.sha256[:12] or "-")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    entry = api.resolve(args.ref, root=args.root)
    # show verifies the entry: a failing one is shown with its problem and exits 1
    problem = api.verify(entry.ref, root=args.root)[0].problem
    if args.card:
        print((entry.path / CARD).read_text(encoding="utf-8"), end="")
    elif args.json:
        print(json.dumps(entry.meta, indent=2))
    else:
        _print_entry(entry, problem)
    if problem:
        message = " ".join(problem.split())
        print(f"error: {message}; do not use this entry (python -m zoo verify)", file=sys.stderr)
        return 1
    return 0


def _print_entry(entry, problem: str | None) -> None:
    print(f"{entry.ref}  ({'bundled' if entry.bundled else 'user'} zoo)")
    print(f"  {'path:':<13} {entry.path}")
    if problem:
        print(f"  {'problem:':<13} {problem}")
    config_path = entry.path / CONFIG
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        print(f"  {'config:':<13} " + " ".join(f"{k}={v}" for k, v in sorted(config.items())))
    print(f"  {'architecture:':<13} {entry.architecture or '-'}")
    print(f"  {'format:':<13} {entry.format_version or entry.meta.get('format', '?')}")
    for key in ("created", "sha256", "theta_sha256", "num_params", "task_family", "outer_steps"):
        if key in entry.meta:
            print(f"  {key + ':':<13} {entry.meta[key]}")
    for key in ("command", "metrics", "source"):
        if key in entry.meta:
            print(f"  {key + ':':<13} {json.dumps(entry.meta[key])}")
    if not problem:
        print(f"  {'use:':<13} lopt.make_optimizer(model.parameters(), weights={entry.ref!r})")


def _cmd_verify(args: argparse.Namespace) -> int:
    results = api.verify(args.ref, root=args.root)
    if args.ref is None:
        for note in api.ignored_paths(args.root):
            print(f"warning: {note}")
    for r in results:
        where = "bundled" if r.bundled else "user"
        fmt = f"format {r.format_version}" if r.format_version else "format ?"
        about = f"{where}, {r.architecture or '?'}, {fmt}"
        print(f"OK    {r.ref} ({about})" if r.ok else f"FAIL  {r.ref} ({about}): {r.problem}")
    if not results:
        print(f"no entries (user zoo: {store.user_root(args.root)})")
    return 0 if all(r.ok for r in results) else 1


def _cmd_publish(args: argparse.Namespace) -> int:
    card = Path(args.card).read_text(encoding="utf-8") if args.card else None
    entry = rundir.publish_dir(
        args.directory,
        args.name,
        weights_file=args.weights,
        version=args.version,
        card=card,
        attachments=args.attach or None,
        root=args.root,
    )
    print(f"published {entry.ref} -> {entry.path} (sha256 {entry.sha256[:12]})")
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    for ref in api.remove(args.ref, root=args.root, all_versions=args.all):
        print(f"removed {ref}")
    return 0


def _cmd_import_pylo(args: argparse.Namespace) -> int:
    entry = pylo.import_pylo(
        args.directory,
        args.name,
        pylo_class=args.pylo_class,
        version=args.version,
        source=args.source,
        revision=args.revision,
        tie_break=args.tie_break,
        root=args.root,
    )
    arch = entry.meta.get("architecture", "?")
    cls = entry.meta.get("pylo_class", "?")
    print(f"imported {entry.ref} ({cls} as {arch}) -> {entry.path} (sha256 {entry.sha256[:12]})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m zoo",
        description="The lozoo zoo: versioned, verified learned-optimizer weights.",
    )
    _root_option(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _root_option(p, argparse.SUPPRESS)
        p.set_defaults(func=func)
        return p

    p = add("list", "list entries of the user and bundled zoos", _cmd_list)
    p.add_argument("--json", action="store_true", help="print meta.json of every entry as JSON")
    p = add("show", "show one entry (REF: family/name[:version|:latest])", _cmd_show)
    p.add_argument("ref", metavar="REF")
    p.add_argument("--card", action="store_true", help="print the entry's README.md card")
    p.add_argument("--json", action="store_true", help="print the entry's meta.json")
    p = add("verify", "check hashes and architecture of one entry or of all", _cmd_verify)
    p.add_argument("ref", metavar="REF", nargs="?", default=None)
    p = add(
        "publish",
        "publish a directory holding model.safetensors or theta.safetensors "
        "(+ config.json or a config in the file's metadata, + optional meta.json)",
        _cmd_publish,
    )
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--name", help="family/name (default: 'name' in DIR/meta.json)")
    p.add_argument("--version", help="explicit MAJOR.MINOR.PATCH (default: next minor)")
    p.add_argument("--weights", metavar="FILE", help="weights file name inside DIR")
    p.add_argument("--card", metavar="FILE", help="text file placed at the top of the card")
    p.add_argument(
        "--attach", metavar="FILE", action="append", help="extra file for the entry (repeatable)"
    )
    p = add("remove", "remove REF (family/name:VERSION or :latest) from the user zoo", _cmd_remove)
    p.add_argument("ref", metavar="REF")
    p.add_argument("--all", action="store_true", help="remove every version of the name")
    p = add(
        "import-pylo",
        "import PyLO checkpoints in the Hugging Face layout (config.json + model.safetensors per "
        "directory): AdafacLO, MuLO or ELO (MetaMLP), CELO2 or ELO_CELO2 (CELO2MLP), VeLO "
        "(two directories: VeLO_RNN and VeLO_MLP, or one directory holding both)",
        _cmd_import_pylo,
    )
    p.add_argument("directory", metavar="DIR", nargs="+")
    p.add_argument("--name", required=True, help="family/name of the new entry")
    p.add_argument(
        "--pylo-class",
        choices=sorted(pylo.PYLO_CLASSES),
        help="which PyLO optimizer the weights belong to (default: from --source or the HF cache "
        "path, else the layout's first: AdafacLO for MetaMLP, CELO2 for CELO2MLP)",
    )
    p.add_argument("--version", help="explicit MAJOR.MINOR.PATCH (default: next minor)")
    p.add_argument("--source", help="source repository id, e.g. btherien/mulo")
    p.add_argument("--revision", help="source revision (commit) the files came from")
    p.add_argument(
        "--tie-break",
        choices=("first", "last", "pylo"),
        default=None,
        help="factored-dims tie rule: first = JAX reference (default); PyLO parity is 'last' "
        "for AdafacLO/MuLO/ELO and 'pylo' for VeLO",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ZooError, ValueError, TypeError, OSError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
