"""User-facing errors: one clear line on stderr, exit code 2, never a traceback."""
from __future__ import annotations

import gc
import signal
import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """Bad input or usage. The message is one line that says what is wrong and, where it helps, what to do."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> NoReturn:
    """Run a CLI entry point: UserError -> 'error: ...' on stderr and exit 2; SIGINT or SIGTERM -> 'error:
    interrupted' and exit 130, after every temporary file is removed (the outputs' `finally` blocks run: SIGTERM
    is turned into the same KeyboardInterrupt as SIGINT); otherwise exit with main's code.

    argparse usage errors already exit 2. Anything else propagates: a traceback means a bug.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    message = None
    try:
        code = main(argv)
    except UserError as exc:
        message, code = str(exc), 2
    except KeyboardInterrupt:
        message, code = "interrupted", 130
    except BrokenPipeError:   # output piped into head & co.
        sys.stderr.close()
        code = 0
    # release what the interrupted work held (onnxruntime sessions own native threads) now: destroyed during
    # interpreter shutdown instead, they abort the process ("terminate called without an active exception")
    gc.collect()
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(code or 0)
