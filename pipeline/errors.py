"""Errors a user can fix. The command line prints their one-line message and exits with 2;
anything else is a bug and keeps its traceback."""


class UserError(ValueError):
    """Bad input: the message names the input, what was expected and how to fix it."""


def first_line(err: BaseException | str, limit: int = 200) -> str:
    """The first line of an error's text (a library's own message can run over many lines)."""
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:limit]
