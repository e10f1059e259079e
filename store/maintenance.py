"""`store info`, `store verify` and `store gc` as plain functions."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import is_temp_debris
from .hashing import checksum_array
from .layout import DATA_ARRAY, INDEX_DIR, LOCKS_DIR, SIGNAL_META, SIGNALS_DIR
from .locks import FileLock, is_locked
from .errors import LockBusy
from .store import Store


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
    """Signals with dims, dtypes, shard counts, versions, staleness and size on disk."""
    from .faiss_index import index_status

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
            "spec": sig.meta.spec,
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


def verify(store: Store, progress=None) -> VerifyReport:
    """Recompute every committed shard's checksum; name each shard that does not match."""
    report = VerifyReport()
    for sig in store.signals():
        try:
            records = sig.records()
        except Exception as exc:  # a damaged commit record is a finding, not a crash
            report.problems.append(f"signal {sig.name} ({sig.key}): unreadable commit records: {exc}")
            continue
        for shard, rec in sorted(records.items()):
            try:
                values = sig._read_committed(rec)
                ok = checksum_array(values) == rec.checksum and len(values) == rec.rows
                why = "checksum mismatch"
            except Exception as exc:
                ok, why = False, f"unreadable ({type(exc).__name__}: {exc})"
            report.checked += 1
            if not ok:
                report.problems.append(f"signal {sig.name} ({sig.key}) shard {shard}: {why}")
            if progress is not None:
                progress()
    return report


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)
    bytes_freed: int = 0


def _remove(path: Path, report: GcReport) -> None:
    size = dir_bytes(path) if path.is_dir() else path.stat().st_size
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    report.removed.append(str(path))
    report.bytes_freed += size


def gc(store: Store) -> GcReport:
    """Remove what no commit record points at: temp files, uncommitted slots, orphan signals, stale indexes."""
    from .faiss_index import index_status

    report = GcReport()
    for dirpath, _, files in os.walk(store.root):
        for f in files:
            if is_temp_debris(f):
                _remove(Path(dirpath) / f, report)
    base = store.root / SIGNALS_DIR
    if base.is_dir():
        for sdir in sorted(base.iterdir()):
            if not (sdir / SIGNAL_META).is_file():
                lock = store.root / LOCKS_DIR / f"create-{sdir.name}.lock"
                if not is_locked(lock):
                    _remove(sdir, report)
    for sig in store.signals():
        records = sig.records()
        for shard in range(sig.num_shards):
            try:
                with FileLock(sig.lock_path(shard), timeout_s=0):
                    rec = records.get(shard) if shard in records else sig.record(shard)
                    for slot in (0, 1):
                        if rec is not None and rec.slot == slot:
                            continue
                        chunk = sig.chunk_path(shard, slot)
                        if chunk.exists():
                            _remove(chunk, report)
            except LockBusy:
                continue  # a live writer owns this shard
        if index_status(sig) == "stale":
            _remove(sig.dir / INDEX_DIR, report)
    _ = DATA_ARRAY
    return report
