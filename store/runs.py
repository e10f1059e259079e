"""Run copies: the signals a refreshing training run writes, keyed by its run id, and which runs are finished.

A training run that refreshes signals writes them into its own copy (`pipeline/refresh.run_signal`: the
stage's spec plus `"run": RUN_ID`), so no run reads another's trajectory. A run that ends its training
writes `runs/RUN_ID.finished` into the stores it refreshed into; resuming it removes the mark. `store gc
--finished-runs` drops the copies of finished runs (a resumed run whose copy was dropped seeds and
recomputes it again, so its decisions may differ from a run that kept it); copies of runs that never
finished (killed, still training, or to be resumed) are kept; `store info` lists every signal's spec, so
such a copy can be found (its spec's `run`) and deleted by hand.
"""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_write_json
from .errors import StoreError
from .layout import check_key

RUNS_DIR = "runs"


def run_of(sig) -> str | None:
    """The run id of a run copy, None for an offline (content-keyed) signal."""
    run = sig.meta.spec.get("run")
    return run if isinstance(run, str) and run else None


def _mark(root: Path, run_id: str) -> Path | None:
    """Where the mark of a run lives; None for an id that is not a hex digest (never a path part)."""
    try:
        return root / RUNS_DIR / f"{check_key(run_id)}.finished"
    except StoreError:
        return None


def mark_finished(store, run_id: str, **fields) -> None:
    """The run ended its training: its copies in this store may be dropped by `store gc --finished-runs`."""
    path = _mark(store.root, run_id)
    if path is not None:
        atomic_write_json(path, {"run": run_id, **fields})


def mark_running(store, run_id: str) -> None:
    """The run trains (again, when resumed): its copies are in use."""
    path = _mark(store.root, run_id)
    if path is not None:
        path.unlink(missing_ok=True)


def finished_runs(store) -> set[str]:
    base = store.root / RUNS_DIR
    return {p.stem for p in base.glob("*.finished")} if base.is_dir() else set()


def forget_run(store, run_id: str) -> None:
    """Drop a finished mark once no copy of its run is left."""
    mark_running(store, run_id)
