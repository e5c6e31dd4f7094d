"""The one exception type for mistakes a user can make (bad path, bad config, bad image).

The CLI prints its message as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line naming the bad thing and the fix."""


def expect(value, kind: type, what: str) -> None:
    """The Python API given the wrong kind of argument: one line, not a traceback deep inside."""
    if not isinstance(value, kind):
        raise UserError(f"{what}, got {type(value).__name__}")
