"""One exception hierarchy for the whole package.

Every error a user can cause is a :class:`UserInputError` (exit code 2). Errors of
the work itself (every trial failed, a plugin broke) are :class:`AutotransferError`
(exit code 1). The command line translates them once, at its boundary, into one
line on stderr and the exit code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations


class AutotransferError(Exception):
    """The work failed. Exit code 1."""

    exit_code = 1


class UserInputError(AutotransferError):
    """Bad input from the user: usage, spec, data, storage URL. Exit code 2."""

    exit_code = 2


class SpecError(UserInputError):
    """The study spec (YAML file or command-line override) is invalid."""


class DataError(UserInputError):
    """The data set cannot be used: missing, empty, too small, unreadable."""


class BackboneError(UserInputError):
    """A backbone name, family or weights source cannot be resolved."""


class StorageError(UserInputError):
    """The storage URL cannot be used, or the study is not in it."""


class ExportError(UserInputError):
    """An export directory cannot be written, or a directory is not an export."""


class PluginError(AutotransferError):
    """The plugins cannot start: the built-in ones are missing, or two plugins
    provide one family name."""


class BrokenPluginError(BackboneError):
    """A backbone family was asked for whose plugin is broken: it failed to
    import or to register, or a hook or family method returned the wrong kind
    of value. Using it is bad input (exit code 2): the message names the plugin
    and what to do (fix, upgrade, uninstall or deny it)."""


class NoSuccessfulTrialsError(AutotransferError):
    """The search ended with no completed trial."""
