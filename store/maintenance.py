"""`store info`, `store verify` and `store gc` as plain functions."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from .atomic import is_temp_debris
from .claims import claim_lock_path, is_stale, read_claim
from .errors import LockBusy, StoreError
from .faiss_index import index_status
from .hashing import checksum_array, fast_checksum
from .integrity import mismatch
from .layout import (
    CLAIMS_DIR,
    COMMITS_DIR,
    DATA_ARRAY,
    INDEX_DIR,
    INDEX_LOCK,
    LOCKS_DIR,
    QUARANTINE_DIR,
    SIGNAL_META,
    SIGNALS_DIR,
    STORE_META,
    shard_file,
)
from .locks import FileLock, is_locked
from .manifest import StoreMeta
from .runs import finished_runs, forget_run, run_of
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


@dataclass(frozen=True)
class Finding:
    """One problem `verify` found: what is bad, why, and the files `repair` sets aside for it."""

    what: str
    why: str
    paths: tuple[Path, ...] = ()
    """Files (or a signal folder) to quarantine so that the next `stage all` recomputes them; () for the
    store header, which is the store's identity and cannot be recomputed."""
    key: str | None = None
    shard: int | None = None
    """The shard of a bad commit record or shard data; None for a whole signal (a damaged header)."""

    def __str__(self) -> str:
        return f"{self.what}: {self.why}"


@dataclass
class VerifyReport:
    checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [str(f) for f in self.findings]

    @property
    def ok(self) -> bool:
        return not self.findings


def _signal_dirs(root: Path) -> list[Path]:
    base = root / SIGNALS_DIR
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def num_records(root) -> int:
    """How many commit record files the store holds (what verify's progress counts), none of them read."""
    return sum(len(list((sdir / COMMITS_DIR).glob("*.json"))) for sdir in _signal_dirs(Path(root)))


def verify_path(path, progress=None) -> VerifyReport:
    """`store verify`: every problem of the store at ``path``, its header's fields included, never stopping at one.

    A store of another format is refused (StoreError); a damaged header is reported field by field, and
    then nothing else can be checked (the header says how the rows are sharded).
    """
    root = Path(path)
    header = root / STORE_META
    if not header.is_file():
        Store.open(root)  # the one-line "no flexfeed store at ..." refusal
    problems = StoreMeta.problems(header)
    if problems:
        report = VerifyReport()
        report.findings += [Finding("store header", p) for p in problems]
        return report
    return verify(Store.open(root), progress)


def verify(store: Store, progress=None) -> VerifyReport:
    """Check every signal header and commit record, and recompute every committed shard's checksum."""
    report = VerifyReport()
    for sdir in _signal_dirs(store.root):
        if not (sdir / SIGNAL_META).is_file():
            continue  # creation debris, not a signal: gc's business
        try:
            sig = store.get(sdir.name)
        except StoreError as exc:  # a damaged header is a finding, not a crash: its signal is set aside whole
            report.findings.append(Finding(f"signal {sdir.name}", f"unreadable header: {exc.message}", (sdir,),
                                           key=sdir.name))
            continue
        records, damaged = sig.scan_records()
        for shard, exc in damaged.items():
            report.findings.append(Finding(f"signal {sig.name} ({sig.key}) shard {shard}",
                                           f"damaged commit record: {exc.message}", (exc.path,), sig.key, shard))
        for shard, rec in sorted(records.items()):
            report.checked += 1
            why = shard_problem(sig, shard, rec)
            if why is not None:
                report.findings.append(Finding(f"signal {sig.name} ({sig.key}) shard {shard}", why,
                                               (sig._record_path(shard), sig.chunk_path(shard, rec.slot)),
                                               sig.key, shard))
            if progress is not None:
                progress()
    return report


def shard_problem(sig, shard: int, rec) -> str | None:
    """Why a committed shard's data does not match its record (None when it does)."""
    try:
        if not sig.chunk_path(shard, rec.slot).is_file():
            return f"data file of slot {rec.slot} is missing"
        values = sig._read_committed(rec, check=False)  # every hash recomputed here, none taken on trust
        if len(values) != rec.rows or checksum_array(values) != rec.checksum:
            return mismatch(replace(rec, fast_checksum=""), values)
        if rec.fast_checksum and fast_checksum(values) not in ("", rec.fast_checksum):
            return "fast checksum mismatch (the record's two checksums disagree)"
    except Exception as exc:  # noqa: BLE001 - whatever the damage, it is a finding of this shard
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None


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
    if rel[2] == CLAIMS_DIR:  # a claim's heartbeat is rewritten under the claim's lock
        return sdir / LOCKS_DIR / f"claim-{rel[3].lstrip('.').split('.')[0]}.lock"
    if rel[2] == COMMITS_DIR:
        return sdir / LOCKS_DIR / f"{rel[3].lstrip('.').split('.')[0]}.lock"
    if rel[2] == DATA_ARRAY and len(rel) > 5 and rel[3] == "c" and rel[4].isdigit():
        return sdir / LOCKS_DIR / f"{shard_file(int(rel[4]))}.lock"
    if rel[2] == DATA_ARRAY:
        return store.root / LOCKS_DIR / f"create-{rel[1]}.lock"
    if rel[2] == INDEX_DIR:
        return sdir / LOCKS_DIR / INDEX_LOCK
    return None


@contextlib.contextmanager
def _hold(path: Path):
    """gc's hold of a writer's lock: True while held, False when a writer holds it.

    It writes nothing (no pid), so gc, the command that frees space, runs on a full disk; a lock file
    that cannot even be created there guards nothing gc may touch, so that item is left alone.
    """
    lock = FileLock(path, timeout_s=0, note_pid=False)
    try:
        lock.acquire()
    except LockBusy:
        yield False  # a live writer owns it
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _remove_unless_locked(store: Store, path: Path, report: GcReport) -> None:
    lock = _guarding_lock(store, path)
    if lock is None or not lock.parent.is_dir():
        _remove(path, report)
        return
    with _hold(lock) as held:
        if held and path.exists():
            _remove(path, report)


def _readable_signals(store: Store) -> list:
    """Signals whose header loads; a damaged one is repair's business, never gc's."""
    out = []
    for sdir in _signal_dirs(store.root):
        if (sdir / SIGNAL_META).is_file():
            try:
                out.append(store.get(sdir.name))
            except StoreError:
                continue
    return out


def _drop_stale_claims(sig, report: GcReport) -> None:
    """Claims of jobs that died (no heartbeat, or a dead process of this host): debris like a temp file."""
    for path in sorted((sig.dir / CLAIMS_DIR).glob("*.json")):
        shard = path.stem
        if not shard.isdigit():
            continue
        with _hold(claim_lock_path(sig, int(shard))) as held:
            claim = read_claim(path) if held else None
            if claim is not None and is_stale(claim):
                _remove(path, report)


def _drop_finished_runs(store: Store, report: GcReport) -> None:
    """The run copies of runs marked finished (store/runs.py), each whole, unless a writer holds one of its locks."""
    finished = finished_runs(store)
    left = set()
    for sig in _readable_signals(store):
        run = run_of(sig)
        if run not in finished:
            continue
        with _hold(store.root / LOCKS_DIR / f"create-{sig.key}.lock") as held:
            if held and not any(is_locked(sig.lock_path(s)) for s in range(sig.num_shards)):
                (sig.dir / SIGNAL_META).unlink()  # invisible first, as a signal being created
                _remove(sig.dir, report)
            else:
                left.add(run)
    for run in finished - left:
        forget_run(store, run)


def gc(store: Store, *, drop_finished_runs: bool = False) -> GcReport:
    """Remove what no commit record points at: temp files, uncommitted slots, orphan signals, stale indexes;
    with ``drop_finished_runs``, also the run copies of training runs that finished (see store/runs.py)."""
    report = GcReport()
    if drop_finished_runs:
        _drop_finished_runs(store, report)
    for dirpath, dirnames, files in os.walk(store.root):
        if Path(dirpath) == store.root and QUARANTINE_DIR in dirnames:
            dirnames.remove(QUARANTINE_DIR)  # what repair set aside is kept as it was
        for f in files:
            # ours end in .tmp; zarr writes a chunk to a .partial file and renames it
            if is_temp_debris(f) or f.endswith(".partial"):
                _remove_unless_locked(store, Path(dirpath) / f, report)
    for sdir in _signal_dirs(store.root):
        if not (sdir / SIGNAL_META).is_file():
            with _hold(store.root / LOCKS_DIR / f"create-{sdir.name}.lock") as held:
                if held and not (sdir / SIGNAL_META).is_file():  # not being created right now
                    _remove(sdir, report)
    for sig in _readable_signals(store):
        for shard in range(sig.num_shards):
            with _hold(sig.lock_path(shard)) as held:
                if not held:
                    continue  # a live writer owns this shard
                # read the record under the lock: one read earlier may predate a commit
                try:
                    rec = sig.record(shard)
                except StoreError:
                    continue  # a damaged record: which slot is committed is unknown, so keep both
                for slot in (0, 1):
                    if rec is not None and rec.slot == slot:
                        continue
                    chunk = sig.chunk_path(shard, slot)
                    if chunk.exists():
                        _remove(chunk, report)
        _drop_stale_claims(sig, report)
        if not (sig.dir / INDEX_DIR).exists():
            continue  # no index to judge
        with _hold(sig.dir / LOCKS_DIR / INDEX_LOCK) as held:
            try:
                stale = held and index_status(sig) == "stale"  # held: not being rebuilt
            except StoreError:
                stale = False  # a damaged record: the index is judged once repair has run
            if stale:
                _remove(sig.dir / INDEX_DIR, report)
    return report
