"""Where the tools write: output paths checked before any work, JSON written atomically with normal permissions."""
from __future__ import annotations

import json
import os
from pathlib import Path

from passes.errors import fail


def check_output(path: Path, what: str, *inputs: Path, suffix: str | None = None) -> None:
    """Refuse (UserError) an output that is a folder, lies in a missing folder, has the wrong suffix, or would
    overwrite one of `inputs` (or an input model's external data named MODEL.data beside it)."""
    path = Path(path)
    if path.is_dir():
        fail(f"{what} {path} is a folder; give the path of the file to write")
    if not path.parent.is_dir():
        fail(f"{what} folder {path.parent} does not exist")
    if suffix and path.suffix.lower() != suffix:
        fail(f"{what} {path}: give a {suffix} file name")
    target = path.resolve()
    for source in inputs:
        source = Path(source)
        if target in (source.resolve(), source.with_name(source.name + ".data").resolve()):
            fail(f"{what} {path} would overwrite the input {source}; the input is never modified, choose another file")


def write_json(path: Path, data: dict) -> Path:
    """Write `data` as indented JSON to `path` through a temporary file in the same folder (mode 0644 under the
    usual umask, like every other output), then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path
