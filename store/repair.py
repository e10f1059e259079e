"""`store repair`: set damaged records, shards and signal headers aside, so that `stage all` recomputes them.

Nothing is deleted. Each item `store verify` reports is moved (one rename, on the same file system)
to `STORE/quarantine/<time>-<pid>/`, under its path inside the store, and `note.txt` there says
what it was and why it was set aside. A shard loses its commit record first, so it is uncommitted
in one atomic step: readers then see it missing, never half of it, and the next `stage all`
recomputes exactly the shards set aside (a signal whose header was damaged, as a whole).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_write_bytes, fsync_dir
from .errors import LockBusy, StoreError
from .layout import LOCKS_DIR, QUARANTINE_DIR
from .locks import FileLock
from .maintenance import Finding, shard_problem, verify_path
from .manifest import header_hint
from .store import Store


@dataclass
class RepairReport:
    moved: list[Finding] = field(default_factory=list)
    busy: list[Finding] = field(default_factory=list)
    """Findings a live writer was rewriting (rerun verify once it is done)."""
    folder: Path | None = None


def repair(path) -> RepairReport:
    """Quarantine every damaged record, shard and signal header of the store at ``path``."""
    root = Path(path)
    found = verify_path(root)
    header = [f.why for f in found.findings if not f.paths]
    if header:
        raise StoreError(f"{'; '.join(header)}: repair cannot rebuild the store header", header_hint(root))
    report = RepairReport()
    if found.ok:
        return report
    store = Store.open(root)
    report.folder = root / QUARANTINE_DIR / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"
    for finding in found.findings:
        try:
            moved = _set_aside(store, finding, report.folder)
        except LockBusy:
            moved = False
            report.busy.append(finding)
        if moved:
            report.moved.append(finding)
            _write_note(root, report)
    return report


def _set_aside(store: Store, finding: Finding, folder: Path) -> bool:
    """Move the finding's files into ``folder`` under the lock a writer of them takes; False if no longer bad."""
    if finding.shard is None:  # a damaged signal header: the whole signal, under its creation lock
        with FileLock(store.root / LOCKS_DIR / f"create-{finding.key}.lock", what=f"signal {finding.key}"):
            _move(store.root, finding.paths[0], folder)
        return True
    sig = store.get(finding.key)
    with FileLock(sig.lock_path(finding.shard), what=f"shard {finding.shard} of {sig.name!r}"):
        try:  # a writer may have recommitted it since verify looked: then it is good again
            rec = sig.record(finding.shard)
            if rec is None or shard_problem(sig, finding.shard, rec) is None:
                return False
        except StoreError:
            pass  # still damaged
        for path in finding.paths:  # the commit record first: the shard is uncommitted in one rename
            if path.exists():
                _move(store.root, path, folder)
    return True


def _move(root: Path, path: Path, folder: Path) -> None:
    dest = folder / path.relative_to(root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, dest)
    fsync_dir(path.parent)
    fsync_dir(dest.parent)


def _write_note(root: Path, report: RepairReport) -> None:
    lines = [f"set aside by `flexfeed store repair {root}` on {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; "
             "the next `flexfeed stage all CONFIG` recomputes these (nothing here is read by flexfeed):", ""]
    for f in report.moved:
        lines.append(f"{f.what}: {f.why}")
        lines += [f"    {p.relative_to(root)}" for p in f.paths if (report.folder / p.relative_to(root)).exists()]
    atomic_write_bytes(report.folder / "note.txt", ("\n".join(lines) + "\n").encode())


