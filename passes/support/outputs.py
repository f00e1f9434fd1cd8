"""Where and how the tools write. Output paths are checked before any work; every output is made under a
temporary name beside its target and renamed into place only when everything the command promises (model,
report, measurements, plots) is done, all together, with SIGINT/SIGTERM held back during the renames. An
interrupted command leaves no output and no temporary file. Outputs get the usual permissions whatever made them
(mkdtemp makes 0700 folders, some writers 0600 files): folders 0777 and files 0666 less the umask (0755 and 0644 under
the usual umask 022; see default_mode)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

from passes.support.errors import fail


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


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM wait until the block ends (then they interrupt as usual)."""
    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


class Staging:
    """Outputs made under temporary names and renamed into place together by `publish()`; whatever is not
    published (an error, an interrupt) is removed when the `with` block ends."""

    def __init__(self):
        self.renames: list[tuple[Path, Path]] = []
        self.folders: list[Path] = []

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        for temporary, _ in self.renames:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                temporary.unlink()
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)

    def folder(self, beside: Path) -> Path:
        """A temporary folder in `beside`'s folder (removed at the end)."""
        folder = Path(tempfile.mkdtemp(prefix=f".{Path(beside).name}.", dir=Path(beside).parent))
        self.folders.append(folder)
        return folder

    def path(self, target: Path) -> Path:
        """A temporary file beside `target` that publish() renames to `target`."""
        target = Path(target)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        self.renames.append((temporary, target))
        return temporary

    def add(self, temporary: Path, target: Path) -> None:
        """Publish an already written `temporary` file as `target`."""
        self.renames.append((Path(temporary), Path(target)))

    def json(self, target: Path, data: dict) -> Path:
        with open(self.path(target), "w") as f:
            f.write(json.dumps(_plain(data), indent=2, allow_nan=False) + "\n")
        return Path(target)

    def publish(self) -> None:
        """Rename everything into place, in the order it was staged, with SIGINT/SIGTERM held back."""
        with signals_held():
            for temporary, target in self.renames:
                os.replace(temporary, target)
            self.renames = []


def write_json(path: Path, data: dict) -> Path:
    """Write one JSON file atomically (see Staging)."""
    with Staging() as staging:
        staging.json(path, data)
        staging.publish()
    return Path(path)


def _plain(value):
    """JSON-ready: numpy scalars and arrays as Python numbers and lists, NaN and infinities as null (JSON has
    none), paths and other objects as strings."""
    import math

    import numpy as np
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def current_umask() -> int:
    """This process's umask (read from /proc where it can be, else set and restored at once)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(folder: bool = False) -> int:
    """The permissions open() and mkdir() give under the current umask: 0666 (files) or 0777 (folders) less it."""
    return (0o777 if folder else 0o666) & ~current_umask()


@contextlib.contextmanager
def staged_folder(folder: Path, what: str = "output"):
    """A temporary folder beside `folder` (which must be new or empty) for the caller to fill; renamed into place
    when the block ends without an error, removed otherwise. The folder gets default_mode (mkdtemp makes it 0700);
    the files in it keep the modes their writers gave them."""
    folder = Path(folder)
    check_output_folder(folder, what)
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield stage
        os.chmod(stage, default_mode(folder=True))
        with signals_held():
            if folder.exists():
                folder.rmdir()
            os.replace(stage, folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def check_output_folder(folder: Path, what: str = "output") -> None:
    """Refuse (UserError) an output folder that exists and is not an empty folder, or whose parent folder does not
    exist (the folder sibling of check_output, for before any work; the folder itself is made by staged_folder)."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        fail(f"{what} {folder} exists and is not an empty folder; give a new folder")
    if not folder.parent.is_dir():
        fail(f"{what} folder {folder.parent} does not exist")
