"""`store info`, `store verify` and `store gc` as plain functions."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import is_temp_debris
from .errors import LockBusy
from .faiss_index import index_status
from .hashing import checksum_array
from .layout import (
    COMMITS_DIR,
    DATA_ARRAY,
    INDEX_DIR,
    INDEX_LOCK,
    LOCKS_DIR,
    SIGNAL_META,
    SIGNALS_DIR,
    shard_file,
)
from .locks import FileLock
from .store import Store


def human_bytes(n: float) -> str:
    """Sizes as people read them: 116 B, 4.0 MiB, 1.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:
                pass
    return total


def info(store: Store, current_version: int | None = None, max_staleness: int | None = None) -> dict:
    """Signals with dims, dtypes, shard counts, versions, staleness, size on disk, specs and sources."""
    signals = []
    for sig in store.signals():
        records = sig.records()
        versions = sorted({r.version for r in records.values()})
        stale = sig.stale_shards(current_version, max_staleness)
        signals.append({
            "name": sig.name, "key": sig.key, "dtype": sig.meta.dtype, "dim": sig.dim,
            "shards_committed": len(records), "shards_total": sig.num_shards,
            "shards_stale": len(stale), "versions": versions,
            "models": sorted({r.model for r in records.values()}),
            "bytes": dir_bytes(sig.dir), "index": index_status(sig),
            "compute_seconds": round(sum(r.seconds for r in records.values()), 3),
            "spec": sig.meta.spec, "sources": sig.meta.sources,
        })
    m = store.meta
    return {"path": str(store.root), "dataset_fingerprint": m.dataset_fingerprint, "num_rows": m.num_rows,
            "shard_rows": m.shard_rows, "num_shards": m.num_shards, "format_version": m.format_version,
            "flexfeed_version": m.flexfeed_version, "bytes": dir_bytes(store.root), "signals": signals}


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _signal_dirs(store: Store) -> list[Path]:
    base = store.root / SIGNALS_DIR
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def verify(store: Store, progress=None) -> VerifyReport:
    """Recompute every committed shard's checksum; name each shard that does not match."""
    report = VerifyReport()
    for sdir in _signal_dirs(store):
        if not (sdir / SIGNAL_META).is_file():
            continue  # creation debris, not a signal: gc's business
        try:
            sig = store.get(sdir.name)
            records = sig.records()
        except Exception as exc:  # a damaged header or commit record is a finding, not a crash
            report.problems.append(f"signal {sdir.name}: unreadable header or commit records: {exc}")
            continue
        for shard, rec in sorted(records.items()):
            why = None
            try:
                if not sig.chunk_path(shard, rec.slot).is_file():
                    why = f"data file of slot {rec.slot} is missing"
                else:
                    values = sig._read_committed(rec)
                    if len(values) != rec.rows or checksum_array(values) != rec.checksum:
                        why = "checksum mismatch"
            except Exception as exc:
                why = f"unreadable ({type(exc).__name__}: {exc})"
            report.checked += 1
            if why is not None:
                report.problems.append(f"signal {sig.name} ({sig.key}) shard {shard}: {why}")
            if progress is not None:
                progress()
    return report


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)
    bytes_freed: int = 0


def _remove(path: Path, report: GcReport) -> None:
    try:
        if path.is_dir():
            size = dir_bytes(path)
            shutil.rmtree(path)
        else:
            size = path.stat().st_size
            path.unlink()
    except FileNotFoundError:
        return  # gone already (a writer renamed its temp file into place)
    report.removed.append(str(path))
    report.bytes_freed += size


def _guarding_lock(store: Store, path: Path) -> Path | None:
    """The lock a live writer of this temp file would hold (None: no writer can own it)."""
    rel = path.relative_to(store.root).parts
    if len(rel) == 1:
        return store.root / LOCKS_DIR / "store.lock"
    if len(rel) < 3 or rel[0] != SIGNALS_DIR:
        return None
    sdir = store.root / SIGNALS_DIR / rel[1]
    if len(rel) == 3:
        return store.root / LOCKS_DIR / f"create-{rel[1]}.lock"
    if rel[2] == COMMITS_DIR:
        return sdir / LOCKS_DIR / f"{rel[3].lstrip('.').split('.')[0]}.lock"
    if rel[2] == DATA_ARRAY and len(rel) > 5 and rel[3] == "c" and rel[4].isdigit():
        return sdir / LOCKS_DIR / f"{shard_file(int(rel[4]))}.lock"
    if rel[2] == DATA_ARRAY:
        return store.root / LOCKS_DIR / f"create-{rel[1]}.lock"
    if rel[2] == INDEX_DIR:
        return sdir / LOCKS_DIR / INDEX_LOCK
    return None


def _remove_unless_locked(store: Store, path: Path, report: GcReport) -> None:
    lock = _guarding_lock(store, path)
    if lock is None or not lock.parent.is_dir():
        _remove(path, report)
        return
    try:
        with FileLock(lock, timeout_s=0):
            if path.exists():
                _remove(path, report)
    except LockBusy:
        pass  # a live writer owns it


def gc(store: Store) -> GcReport:
    """Remove what no commit record points at: temp files, uncommitted slots, orphan signals, stale indexes."""
    report = GcReport()
    for dirpath, _, files in os.walk(store.root):
        for f in files:
            # ours end in .tmp; zarr writes a chunk to a .partial file and renames it
            if is_temp_debris(f) or f.endswith(".partial"):
                _remove_unless_locked(store, Path(dirpath) / f, report)
    for sdir in _signal_dirs(store):
        if not (sdir / SIGNAL_META).is_file():
            try:
                with FileLock(store.root / LOCKS_DIR / f"create-{sdir.name}.lock", timeout_s=0):
                    if not (sdir / SIGNAL_META).is_file():
                        _remove(sdir, report)
            except LockBusy:
                continue  # being created right now
    for sig in store.signals():
        for shard in range(sig.num_shards):
            try:
                with FileLock(sig.lock_path(shard), timeout_s=0):
                    # read the record under the lock: one read earlier may predate a commit
                    rec = sig.record(shard)
                    for slot in (0, 1):
                        if rec is not None and rec.slot == slot:
                            continue
                        chunk = sig.chunk_path(shard, slot)
                        if chunk.exists():
                            _remove(chunk, report)
            except LockBusy:
                continue  # a live writer owns this shard
        try:
            with FileLock(sig.dir / LOCKS_DIR / INDEX_LOCK, timeout_s=0):
                if index_status(sig) == "stale":
                    _remove(sig.dir / INDEX_DIR, report)
        except LockBusy:
            continue  # being rebuilt
    return report
