"""The one exception type for mistakes a user can make (bad path, bad config, bad image).

The CLI prints its message as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""

import sys


class UserError(Exception):
    """A problem with the user's input, reported as one line naming the bad thing and the fix."""


# C0/C1 controls and bidirectional overrides: a file or class name holding them could move the
# cursor, recolour the terminal or break the one-line message. Surrogates: the bytes of a name
# that are not UTF-8, as Python reads them, which no UTF-8 terminal or file can take.
_CONTROLS = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
             for c in (*range(0x20), *range(0x7f, 0xa0), *range(0x202a, 0x202f),
                       *range(0x2066, 0x206a), *range(0xd800, 0xe000))}


def escape_controls(text: object) -> str:
    """`text` with its control characters written as escapes, for the terminal."""
    return str(text).translate(_CONTROLS)


def warn(message: str) -> None:
    """A warning of a library call given no log: on stderr, so stdout stays a command's result
    (`--json`)."""
    print(f"warning: {escape_controls(message)}", file=sys.stderr)


def expect(value, kind: type, what: str) -> None:
    """The Python API given the wrong kind of argument: one line, not a traceback deep inside."""
    if not isinstance(value, kind):
        raise UserError(f"{what}, got {type(value).__name__}")
