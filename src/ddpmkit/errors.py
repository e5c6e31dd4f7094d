"""The one exception type for mistakes a user can make (bad path, bad config, bad image).

The CLI prints its message as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""

import sys


class UserError(Exception):
    """A problem with the user's input, reported as one line naming the bad thing and the fix."""


def warn(message: str) -> None:
    """A warning of a library call given no log: on stderr, so stdout stays a command's result
    (`--json`)."""
    print(f"warning: {message}", file=sys.stderr)


def expect(value, kind: type, what: str) -> None:
    """The Python API given the wrong kind of argument: one line, not a traceback deep inside."""
    if not isinstance(value, kind):
        raise UserError(f"{what}, got {type(value).__name__}")
