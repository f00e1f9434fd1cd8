"""BATCHxSEQ text ('1x16', '8 X 1024'): the one reader for the shape flags of the bench tools (bench.compare
--shape, bench.engine --min/--opt/--max)."""
from __future__ import annotations

import argparse
import re

from passes.support.errors import UserError, fail

_BATCH_SEQ = re.compile(r"(\d+)x(\d+)", re.ASCII)


def parse_batch_seq(text: str) -> tuple[int, int]:
    """'BxS' -> (B, S): two positive decimal integers joined by an x (either case; spaces anywhere are ignored).
    Anything else is a one-line UserError naming the text."""
    match = _BATCH_SEQ.fullmatch(text.lower().replace(" ", ""))
    if match is None or not all(int(g) > 0 for g in match.groups()):
        fail(f"expected BATCHxSEQ with positive integers, e.g. 1x16; got '{text}'")
    return int(match.group(1)), int(match.group(2))


def batch_seq_arg(text: str) -> tuple[int, int]:
    """parse_batch_seq as an argparse `type`: a bad value is a usage error like any other bad flag (argparse prints
    the usage and 'argument --shape: expected BATCHxSEQ ...', exit 2)."""
    try:
        return parse_batch_seq(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_sizes(text: str, option: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]: comma-separated positive integers (the --batch / --tokens lists of the bench tools);
    anything else is a one-line UserError naming the option."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) <= 0:
        fail(f"{option} takes comma-separated positive integers, e.g. 1,8,32; got '{text}'")
    return sizes
