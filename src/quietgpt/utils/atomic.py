"""Atomic file writes: a reader (or a killed writer) sees the old file or the new one, never half of one.

Write to a temporary file in the same folder, flush and fsync it, rename it over the target (atomic on
POSIX), then fsync the folder so the rename itself survives a crash. On any failure (a full disk, a
read-only folder) the temporary file is removed and the previous file stays intact.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from quietgpt.errors import QuietError

# Test-only: seconds to sleep between writing the temporary file and renaming it, so fault tests can
# kill a process in the middle of a checkpoint write.
_SLOW_ENV = "QUIETGPT_TEST_SLOW_WRITE"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) to produce the file, then atomically move it to `path`.

    Raises QuietError (one line, naming the path and the fix) when the folder is not writable or the
    disk is full; the previous `path`, if any, is untouched and no temporary file is left behind.
    """
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
    except OSError as e:
        raise QuietError(f"cannot write {path}: {e.strerror or e}; choose a writable output folder") from None
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; published files get the usual mode
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        delay = float(os.environ.get(_SLOW_ENV, "0") or 0)
        if delay > 0:
            time.sleep(delay)
        os.replace(tmp, path)
        _fsync_dir(folder)
    except OSError as e:
        _remove_quietly(tmp)
        raise QuietError(
            f"cannot write {path}: {e.strerror or e}; free disk space or choose another output folder "
            "(the previous file is intact)"
        ) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_quietly(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """JSON with sorted keys and a trailing newline; NaN/inf are written as null (strict JSON)."""
    atomic_write_text(path, json.dumps(_finite(obj), indent=2, sort_keys=True) + "\n")


def _finite(obj):
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
