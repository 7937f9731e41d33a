"""One exception type for mistakes a user can fix, and the CLI wrapper that prints it.

Entry scripts raise ``UserError`` for bad flags, missing files and the like; ``run_cli``
turns it into a single line on stderr and exit status 2, never a traceback.
"""
import sys


class UserError(Exception):
    """A problem with the user's input (flag, file, data). Its message is one line that
    names the file or flag and says what to do."""


def first_line(e):
    """The first line of an exception's message (its type's name when it has none)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def run_cli(main, args):
    """Call ``main(args)``; print a ``UserError`` as one line and exit 2."""
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
