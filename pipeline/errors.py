"""Errors a user can fix. The command line prints their one-line message and exits with 2;
anything else is a bug and keeps its traceback."""


class UserError(ValueError):
    """Bad input: the message names the input, what was expected and how to fix it."""
