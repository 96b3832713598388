"""The run folder: an exclusive lock on it, and cleaning up after writers that were killed.

Training (`quietgpt train`) and the study (`quietgpt study`) both take the lock on their output folder
before writing anything; holding it is also what makes deleting stale temporary files safe.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from quietgpt.errors import QuietError

__all__ = ["RunLock", "remove_stale_temporaries"]


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete the temporary files (quietgpt.utils.atomic's `.<name>.*.tmp`) that a killed writer left in `folder`
    and `folder/best`. Call it only while holding the folder's RunLock: then no live writer can own one."""
    for sub in (Path(folder), Path(folder) / "best"):
        for tmp in sub.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()


class RunLock:
    """An exclusive lock on a run folder: `<dir>/.lock` holds the owner's pid and host.

    POSIX: an flock on the file, which the kernel drops when the owner dies, so a killed run never leaves
    the folder locked (its stale file is simply taken over); a clean exit removes the file. Elsewhere:
    O_EXCL creation plus a liveness check of the recorded pid. Raises QuietError when another live run
    holds the folder or the folder is not writable.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self._fd: int | None = None
        self._made_folder = False

    def _owner(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8").strip() or "unknown"
        except OSError:
            return "unknown"

    def acquire(self) -> RunLock:
        """Take the lock, creating the folder if needed, then delete stale temporaries; returns self."""
        self._made_folder = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise QuietError(f"output folder {self.folder} is not writable ({e.strerror or e}); "
                             "choose another --out") from None
        for _ in range(10):
            fd = self._lock_once()
            if fd is not None:
                break
        else:
            raise QuietError(f"cannot lock {self.path}; remove it if no run uses {self.folder}")
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError as e:
            os.close(fd)
            raise QuietError(f"output folder {self.folder} is not writable ({e.strerror or e}); "
                             "choose another --out") from None
        self._fd = fd
        remove_stale_temporaries(self.folder)
        return self

    def _lock_once(self) -> int | None:
        """An fd holding the lock, or None when the file was replaced under us (try again)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise QuietError(f"output folder {self.folder} is not writable ({e.strerror or e}); "
                             "choose another --out") from None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            os.close(fd)
            return self._acquire_pidfile()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise QuietError(f"output folder {self.folder} is in use by another quietgpt run "
                             f"(pid/host {self._owner()}); wait for it to finish or choose another --out") from None
        try:  # the previous owner may have unlinked the file between our open and our flock
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except OSError:
            same = False
        if not same:
            os.close(fd)
            return None
        return fd

    def _acquire_pidfile(self) -> int:  # pragma: no cover - non-POSIX fallback
        for _ in range(2):
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid = int((self._owner().split() or ["0"])[0] or 0)
                try:
                    os.kill(pid, 0)
                    alive = pid > 0
                except ProcessLookupError:
                    alive = False
                except OSError:
                    alive = True
                if alive:
                    raise QuietError(f"output folder {self.folder} is in use by another quietgpt run "
                                     f"(pid {pid}); wait for it or choose another --out") from None
                self.path.unlink(missing_ok=True)  # stale: its owner is dead
        raise QuietError(f"cannot lock {self.path}; remove it if no run uses {self.folder}")

    def release(self) -> None:
        """Remove the lock file (and the folder, if acquire() made it and nothing else was written)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()  # still holding the flock: a waiter re-checks the inode (see _lock_once)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
            if self._made_folder:
                with contextlib.suppress(OSError):
                    self.folder.rmdir()  # fails, as it should, unless the folder is empty

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
