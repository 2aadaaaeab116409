"""The lozoo zoo: named, versioned, hashed, documented learned-optimizer weights, offline.

Two zoos are searched: the user zoo (``$LOZOO_ZOO``, else ``platformdirs.user_cache_dir("lozoo")
/zoo``; ``root=`` overrides both) and the read-only zoo bundled in this package
(``zoo/bundled``). Each entry is ``FAMILY/NAME/MAJOR.MINOR.PATCH/`` holding ``model.safetensors``,
``config.json``, ``meta.json`` and a ``README.md`` card (see :mod:`zoo.store`, :mod:`zoo.entry`).

Quick use::

    import zoo, lopt
    zoo.publish(theta, lopt.ORIGINAL, "small_fc_lopt/mlp_mnist", meta={"task_family": ...})
    opt = lopt.make_optimizer(model.parameters(), weights="small_fc_lopt/mlp_mnist")

Entries of every registered architecture are stored alike (format 2 records the architecture;
format 1 entries are small_fc_lopt). ``zoo`` depends on ``lopt``, never the reverse: importing
``zoo`` registers it with ``lopt`` as the resolver of weights references.

CLI: ``python -m zoo list | show REF | verify [REF] | publish DIR | remove REF | import-pylo DIR``.
"""

import lopt

from .api import annotate, ignored_paths, list_entries, load, publish, remove, resolve, verify
from .entry import VerifyResult, ZooEntry, ZooEntryInfo
from .errors import (
    EntryExistsError,
    EntryNotFoundError,
    ImportFormatError,
    IntegrityError,
    InvalidRefError,
    ReadOnlyError,
    ZooError,
)
from .pylo import convert_pylo, import_pylo
from .refs import Ref, Version, parse_ref, parse_version, validate_name
from .rundir import publish_dir, read_run_dir
from .store import bundled_root, user_root

__all__ = [
    "EntryExistsError",
    "EntryNotFoundError",
    "ImportFormatError",
    "IntegrityError",
    "InvalidRefError",
    "ReadOnlyError",
    "Ref",
    "Version",
    "VerifyResult",
    "ZooEntry",
    "ZooEntryInfo",
    "ZooError",
    "annotate",
    "bundled_root",
    "convert_pylo",
    "ignored_paths",
    "import_pylo",
    "list_entries",
    "load",
    "parse_ref",
    "parse_version",
    "publish",
    "publish_dir",
    "read_run_dir",
    "remove",
    "resolve",
    "user_root",
    "validate_name",
    "verify",
]


def _resolve_for_lopt(ref: str) -> lopt.ResolvedWeights:
    entry = load(ref)
    return lopt.ResolvedWeights(entry.theta, entry.config, {"source": f"zoo:{entry.ref}"})


lopt.register_ref_resolver(_resolve_for_lopt)
