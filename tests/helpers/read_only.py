"""A folder that behaves as a read-only mount in this process, without root tricks (tests run as root,
so chmod stops nothing).

Every call that would change something under the folder fails with ``OSError(EROFS)``, as on a
read-only file system, and is recorded: an open for writing (``os.open`` with write flags,
``open`` in a writing mode), mkdir of a new folder (an existing one gives ``FileExistsError``, as the
kernel answers), rename, replace, unlink, rmdir, rmtree, truncate and utime. ``os.access(W_OK)`` says
no. Reads pass through untouched.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class ReadOnlyTree:
    """Install with :meth:`install` (a pytest monkeypatch undoes it); ``attempts`` lists refused writes."""

    def __init__(self, root, errno_code: int = errno.EROFS):
        self.root = Path(root).resolve()
        self.errno = errno_code
        self.attempts: list[tuple[str, str]] = []

    def _under(self, path) -> bool:
        if isinstance(path, int):
            return False  # a file descriptor: its open was checked
        try:
            return Path(os.path.abspath(os.fsdecode(path))).is_relative_to(self.root)
        except (TypeError, ValueError):
            return False

    def _refuse(self, op: str, path) -> None:
        self.attempts.append((op, os.fsdecode(path)))
        raise OSError(self.errno, os.strerror(self.errno), os.fsdecode(path))

    def install(self, monkeypatch) -> ReadOnlyTree:
        real = {name: getattr(os, name) for name in ("open", "mkdir", "rename", "replace", "unlink", "remove",
                                                     "rmdir", "truncate", "utime", "access")}
        real_open, real_rmtree = builtins.open, shutil.rmtree

        def guard(name):
            def call(path, *args, **kwargs):
                if self._under(path):
                    self._refuse(name, path)
                return real[name](path, *args, **kwargs)
            return call

        def os_open(path, flags, *args, **kwargs):
            if flags & _WRITE_FLAGS and self._under(path):
                self._refuse("os.open", path)
            return real["open"](path, flags, *args, **kwargs)

        def mkdir(path, *args, **kwargs):
            if self._under(path):
                if os.path.lexists(path):
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(path))
                self._refuse("mkdir", path)
            return real["mkdir"](path, *args, **kwargs)

        def rename(src, dst, *args, **kwargs):
            if self._under(src) or self._under(dst):
                self._refuse("rename", src)
            return real["rename"](src, dst, *args, **kwargs)

        def replace(src, dst, *args, **kwargs):
            if self._under(src) or self._under(dst):
                self._refuse("replace", src)
            return real["replace"](src, dst, *args, **kwargs)

        def access(path, mode, *args, **kwargs):
            if mode & os.W_OK and self._under(path):
                return False
            return real["access"](path, mode, *args, **kwargs)

        def file_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and self._under(file):
                self._refuse("open", file)
            return real_open(file, mode, *args, **kwargs)

        def rmtree(path, *args, **kwargs):
            if self._under(path):
                self._refuse("rmtree", path)
            return real_rmtree(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "access", access)
        for name in ("unlink", "remove", "rmdir", "truncate", "utime"):
            monkeypatch.setattr(os, name, guard(name))
        monkeypatch.setattr(builtins, "open", file_open)
        monkeypatch.setattr(io, "open", file_open)
        monkeypatch.setattr(shutil, "rmtree", rmtree)
        return self


class FullDisk:
    """A folder on a full disk, in this process: no new file or folder, no byte written (ENOSPC, recorded);
    opening an existing file, reading, renaming and deleting (what frees space) pass."""

    def __init__(self, root):
        self.root = Path(root).resolve()
        self.attempts: list[tuple[str, str]] = []
        self._fds: set[int] = set()

    def _under(self, path) -> bool:
        return ReadOnlyTree._under(self, path)

    def _refuse(self, op: str, path) -> None:
        self.attempts.append((op, os.fsdecode(path)))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(path))

    def install(self, monkeypatch) -> FullDisk:
        real_open, real_write, real_mkdir, real_file_open = os.open, os.write, os.mkdir, builtins.open

        def os_open(path, flags, *args, **kwargs):
            if self._under(path) and flags & os.O_CREAT and not os.path.exists(path):
                self._refuse("create", path)
            fd = real_open(path, flags, *args, **kwargs)
            if self._under(path) and flags & _WRITE_FLAGS:
                self._fds.add(fd)
            return fd

        def write(fd, data):
            if fd in self._fds and len(data):
                self._refuse("write", f"fd {fd}")
            return real_write(fd, data)

        def mkdir(path, *args, **kwargs):
            if self._under(path) and not os.path.lexists(path):
                self._refuse("mkdir", path)
            return real_mkdir(path, *args, **kwargs)

        def file_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and self._under(file):
                self._refuse("open", file)
            return real_file_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(builtins, "open", file_open)
        monkeypatch.setattr(io, "open", file_open)
        return self
