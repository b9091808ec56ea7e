"""The errors a user can cause, as opposed to bugs.

A `UserError` (or the model package's `ConfigError`) is raised where input is checked: a missing
path, an unreadable file, an impossible request, a config value out of range. The CLI prints such an
error as one line and exits 2. Every other exception, `ValueError` included, is a bug: the CLI
keeps its traceback and says so (see `lmforge.cli.entrypoint`).
"""

from __future__ import annotations

from lmforge.model.config import ConfigError


class UserError(ValueError):
    """Bad input from the user: a missing path, an unreadable file, an impossible request."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (still a FileNotFoundError for callers)."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ConfigError)

BUG_REPORT_HINT = (
    "this is a bug in lmforge, not a problem with your input: please report it with the traceback above "
    "(README, 'Reporting a bug')"
)

__all__ = ["BUG_REPORT_HINT", "USER_ERRORS", "ConfigError", "InputNotFoundError", "UserError"]
