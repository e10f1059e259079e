"""Writer exclusion per shard with flock: the kernel drops the lock when a writer dies."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from .errors import LockBusy


class FileLock:
    """Exclusive advisory lock on a file; ``timeout_s=0`` fails at once when busy."""

    def __init__(self, path: str | os.PathLike, timeout_s: float = 0.0, what: str = "shard", note_pid: bool = True):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.what = what
        self.note_pid = note_pid
        """Write the holder's pid into the file (for people); gc does not, so it runs on a full disk."""
        self._fd: int | None = None

    def acquire(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockBusy(
                        f"{self.what} is being written by another process (lock {self.path})",
                        "wait for that writer to finish, or pass a lock timeout to wait for it",
                    ) from None
                time.sleep(0.05)
        self._fd = fd
        if self.note_pid:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except BaseException:
                self.release()
                raise
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_locked(path: str | os.PathLike) -> bool:
    """True while some process holds the lock (used by gc to leave live writers alone)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
