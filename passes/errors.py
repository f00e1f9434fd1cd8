"""User-facing errors: one clear line on stderr, exit code 2, never a traceback."""
from __future__ import annotations

import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """Bad input or usage. The message is one line that says what is wrong and, where it helps, what to do."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> NoReturn:
    """Run a CLI entry point: UserError -> 'error: ...' on stderr and exit 2; otherwise exit with main's code.

    argparse usage errors already exit 2. Anything else propagates: a traceback means a bug.
    """
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:   # output piped into head & co.
        sys.stderr.close()
        sys.exit(0)
    sys.exit(code or 0)
