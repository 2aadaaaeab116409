"""Keep lozoo's packages importable when the working directory holds a folder of the same name.

``python -m``, ``python -c``, the REPL and Jupyter put the working directory first on
``sys.path``. A plain folder there named like one of lozoo's packages (a user zoo kept next to a
project as ``zoo/``, a ``tasks/`` folder) has no ``__init__.py``; Python's path finder turns it
into an empty *namespace package* whenever it finds no regular package of that name on
``sys.path``, which is the case for an editable install (setuptools' editable finder sits after
the path finder on ``sys.meta_path``). ``import zoo`` then returns that empty module and
``zoo.load`` does not exist.

:class:`SiblingFinder`, placed first on ``sys.meta_path`` when :mod:`lopt` is imported, answers
only for lozoo's package names and only when the path finder would produce such a namespace
package: it returns the package installed next to :mod:`lopt` instead. A real package of the same
name (with ``__init__.py``) in the working directory is the user's own code and is left alone;
:func:`import_sibling` then names the clash instead of failing later with an AttributeError.
"""

from __future__ import annotations

import importlib
import sys
from importlib.machinery import ModuleSpec, PathFinder
from importlib.util import spec_from_file_location
from pathlib import Path
from types import ModuleType

INSTALL_ROOT = Path(__file__).resolve().parent.parent
SIBLINGS = ("zoo", "tasks", "metatrain")


class SiblingFinder:
    """A meta path finder for lozoo's sibling packages (see the module doc)."""

    @classmethod
    def find_spec(cls, fullname: str, path=None, target=None) -> ModuleSpec | None:
        if fullname not in SIBLINGS:
            return None
        found = PathFinder.find_spec(fullname)
        if found is not None and found.origin not in (None, "namespace"):
            return None  # a regular package or module: the normal machinery imports it
        init = INSTALL_ROOT / fullname / "__init__.py"
        if not init.is_file():
            return None
        return spec_from_file_location(
            fullname, init, submodule_search_locations=[str(init.parent)]
        )


def install() -> None:
    """Put :class:`SiblingFinder` first on ``sys.meta_path`` (once; done on import)."""
    if SiblingFinder not in sys.meta_path:
        sys.meta_path.insert(0, SiblingFinder)


def import_sibling(name: str) -> ModuleType:
    """``import name`` for one of lozoo's packages, with a clear error if a package of the same
    name elsewhere (the working directory, typically) shadows it."""
    module = importlib.import_module(name)
    where = getattr(module, "__file__", None)
    expected = INSTALL_ROOT / name / "__init__.py"
    if expected.is_file() and (where is None or Path(where).resolve() != expected):
        raise ImportError(
            f"'import {name}' found {where or list(getattr(module, '__path__', []))}, not "
            f"lozoo's {name} package ({expected}): a package named {name!r} in the working "
            "directory or on PYTHONPATH shadows it; rename it or run from another directory"
        )
    return module


install()
