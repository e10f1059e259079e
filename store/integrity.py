"""Reads check what they read: a shard's bytes against its commit record, once per file state and process.

A commit record holds two hashes of the shard's bytes: `checksum` (blake2b, what `store verify` recomputes)
and `fast_checksum` (xxh3-128, about three times memcpy speed). The first read of a shard's data file in a
process hashes the bytes it read and compares; the file's identity (inode, size, mtime, ctime) is then
remembered, so later reads of the same file pay one fstat, not a hash. A file rewritten in place gets a new
mtime or ctime and is hashed again; a commit writes a new file (new inode). Values are never non-finite in
a shard that passes: writes refuse NaN and inf, so a NaN on disk is always a checksum mismatch, which is
reported with the first non-finite row when there is one.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from .errors import CorruptShard
from .hashing import checksum_array, fast_checksum

_VERIFIED: set[tuple] = set()
_LOCK = threading.Lock()


def file_identity(path, st: os.stat_result) -> tuple:
    """What says a data file is unchanged since it was checked."""
    return (os.fspath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def is_verified(identity: tuple, record) -> bool:
    return (*identity, record.checksum) in _VERIFIED


def remember(identity: tuple, record) -> None:
    """This file state holds the record's bytes (checked, or just written by this process)."""
    with _LOCK:
        _VERIFIED.add((*identity, record.checksum))


def forget_all() -> None:
    """Check every shard again at its next read (tests, and the read benchmark's first-read figure)."""
    with _LOCK:
        _VERIFIED.clear()


def mismatch(record, values: np.ndarray) -> str | None:
    """Why ``values`` are not the record's bytes (None when they are): the fast hash if recorded, else blake2b."""
    fast = fast_checksum(values) if record.fast_checksum else ""  # "" also without xxhash: blake2b then
    if (fast == record.fast_checksum) if fast else (checksum_array(values) == record.checksum):
        return None
    flat = values.reshape(len(values), -1) if len(values) else values.reshape(0, 1)
    bad = np.flatnonzero(~np.isfinite(flat).all(axis=1))
    return f"checksum mismatch, non-finite value in row {int(bad[0])} of the shard" if bad.size else "checksum mismatch"


def check(sig, record, values: np.ndarray, identity: tuple | None) -> None:
    """Raise CorruptShard unless ``values`` (just read from the file ``identity``) are the record's bytes."""
    if identity is not None and is_verified(identity, record):
        return
    why = mismatch(record, values)
    if why is not None:
        raise corrupt(sig, record.shard, why, sig.chunk_path(record.shard, record.slot))
    if identity is not None:
        remember(identity, record)


def corrupt(sig, shard: int, why: str, path) -> CorruptShard:
    """The one-line error of a bad shard: which one, why, and `store repair` (or `stage all`) as the fix."""
    root = sig.dir.parents[1]
    return CorruptShard(
        f"shard {shard} of signal {sig.name!r} ({sig.key}) in store {root} is damaged: {why} (data file {path})",
        f"rerun `flexfeed stage all CONFIG`, which recomputes it, or set it aside with `flexfeed store repair {root}`",
        key=sig.key, shard=shard, path=path)
