"""Errors the CLI reports as a one-line message and exit code 2 (the user's input is wrong),
as opposed to bugs, which keep their traceback."""

from model.config import ConfigError


class UserError(ValueError):
    """Bad input from the user: a missing path, an unreadable file, an impossible request."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ConfigError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError)
