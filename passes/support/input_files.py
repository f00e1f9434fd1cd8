"""Inputs files, as users give them to --inputs: FILE.npz (one array per graph input, by name), a polygraphy
`--save-inputs` JSON (a list of feed dicts; feeds whose shapes agree except on the first axis are concatenated
along it, otherwise the first is used and a note says so), or a plain JSON of token ids (a list of equal-length
lists, or {"input_ids": [[...], ...]}). Reading only; passes.support.calibration checks the arrays against the
model and completes what a language model needs besides the token ids.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from passes.support.errors import fail


def read_inputs_file(path: Path, token_input: str | None) -> tuple[dict[str, np.ndarray], str, list[str]]:
    """(arrays by name, a description of the source, notes). Plain token lists go to `token_input` (the model's
    token input; None: the model has none, a UserError for such a file)."""
    path = Path(path)
    if not path.exists():
        fail(f"inputs file {path}: no such file")
    if not path.is_file():
        fail(f"inputs file {path}: not a file")
    if path.stat().st_size == 0:
        fail(f"inputs file {path} is empty")
    notes: list[str] = []
    if _looks_like_zip(path):
        return _read_npz(path), f"{path} (npz)", notes
    tokens = _read_token_json(path, token_input)
    if tokens is not None:
        return tokens, f"{path} (JSON token ids)", notes
    return _read_polygraphy_json(path, notes), f"{path} (polygraphy inputs JSON)", notes


def _read_token_json(path: Path, token_input: str | None) -> dict[str, np.ndarray] | None:
    """Token ids from a plain JSON file, or None when the file is not one (polygraphy's format, say)."""
    import json
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(data, Mapping) and data and all(_is_int_rows(v) for v in data.values()):
        return {name: _int_array(path, rows) for name, rows in data.items()}
    if _is_int_rows(data):
        if token_input is None:
            fail(f"inputs file {path} holds token ids, but the model has no token input (no embedding table found)")
        return {token_input: _int_array(path, data)}
    return None


def _is_int_rows(value) -> bool:
    """A non-empty list of ints, or a non-empty list of non-empty lists of ints."""
    if not isinstance(value, list) or not value:
        return False
    rows = value if isinstance(value[0], list) else [value]
    return all(isinstance(r, list) and r and all(isinstance(t, int) and not isinstance(t, bool) for t in r) for r in rows)


def _int_array(path: Path, rows) -> np.ndarray:
    rows = rows if isinstance(rows[0], list) else [rows]
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        fail(f"inputs file {path}: token rows have different lengths ({lengths[0]}..{lengths[-1]}); give rows of equal length")
    return np.asarray(rows, dtype=np.int64)


def _looks_like_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: np.asarray(data[name]) for name in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        fail(f"inputs file {path} is not a readable .npz ({type(exc).__name__}: {_first_line(exc)})")
    if not arrays:
        fail(f"inputs file {path} holds no arrays")
    return arrays


def _read_polygraphy_json(path: Path, notes: list[str]) -> dict[str, np.ndarray]:
    try:
        from polygraphy.json import load_json
    except ImportError:  # pragma: no cover - polygraphy is a dependency
        fail(f"inputs file {path} is not an .npz, and polygraphy (needed to read JSON inputs) is not installed")
    try:
        data = load_json(str(path))
    except Exception as exc:   # json, base64 and numpy errors
        fail(f"inputs file {path} is neither an .npz nor a polygraphy inputs JSON ({type(exc).__name__}: {_first_line(exc)})")
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, list) or not data or not all(isinstance(d, Mapping) for d in data):
        fail(f"inputs file {path}: expected a JSON list of feed dicts (polygraphy run --save-inputs), found {type(data).__name__}"
             f"{' (empty)' if isinstance(data, list) and not data else ''}")
    feeds = []
    for k, feed in enumerate(data):
        if not feed:
            fail(f"inputs file {path}: feed {k} is empty")
        bad = [name for name, value in feed.items() if not isinstance(value, np.ndarray)]
        if bad:
            fail(f"inputs file {path}: feed {k} input '{bad[0]}' is not an array")
        feeds.append(dict(feed))
    if len(feeds) == 1:
        return feeds[0]
    names = list(feeds[0])
    same_names = all(list(f) == names for f in feeds)
    stackable = same_names and all(
        f[n].ndim >= 1 and f[n].ndim == feeds[0][n].ndim and f[n].shape[1:] == feeds[0][n].shape[1:] for f in feeds for n in names)
    if stackable:
        notes.append(f"{len(feeds)} feeds concatenated along the first axis")
        return {n: np.concatenate([f[n] for f in feeds], axis=0) for n in names}
    notes.append(f"{len(feeds)} feeds with different shapes: only the first is used")
    return feeds[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "unreadable"


def save_inputs_npz(path: str | os.PathLike, feeds: Mapping[str, np.ndarray]) -> Path:
    """Write feeds {input name: array} to `path` exactly (no '.npz' appended), readable by --inputs."""
    path = Path(path)
    if not feeds:
        raise ValueError("no arrays to save")
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **{name: np.asarray(a) for name, a in feeds.items()})
    os.replace(tmp, path)
    return path
