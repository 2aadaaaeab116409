"""Exceptions raised by the zoo.

Every error names the entry (``family/name:version``) and the problem, so the CLI can print it as
one line and a user can act on it without a traceback. They derive from :class:`ZooError` so
callers can catch all zoo failures at once; the mixins (``ValueError``, ``LookupError``) keep the
usual Python idioms working.
"""

from __future__ import annotations


class ZooError(Exception):
    """Base class of every error the zoo raises on purpose."""


class InvalidRefError(ZooError, ValueError):
    """A name, version or reference breaks the ``family/name[:MAJOR.MINOR.PATCH]`` rules."""


class EntryNotFoundError(ZooError, LookupError):
    """No entry (or no such version) exists in the user zoo or the bundled zoo."""


class EntryExistsError(ZooError):
    """Publishing an explicit version that is already taken."""


class IntegrityError(ZooError):
    """An entry is incomplete, corrupted, tampered with or inconsistent; nothing was loaded."""


class ReadOnlyError(ZooError):
    """An operation would modify the bundled (read-only) zoo."""


class ImportFormatError(ZooError, ValueError):
    """A foreign checkpoint (e.g. PyLO / µLO) does not have the expected layout."""
