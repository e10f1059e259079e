"""FAISS index per signal, saved beside it and rebuilt when any shard changes.

Size rule: exact inner-product search (``IndexFlatIP``) while the signal has at most
``FLAT_MAX_ROWS`` committed rows; above that an ``IndexIVFFlat`` with
``nlist = clamp(4 * sqrt(N), 16, 65536)`` lists, trained on up to ``64 * nlist`` rows and searched
with ``nprobe = max(8, nlist // 16)``. Vectors are float32 copies of the signal's rows; L2-normalised
signals (embeddings, gradient features) make inner product the cosine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes, atomic_write_json
from .errors import StoreError
from .layout import INDEX_DIR, INDEX_LOCK, LOCKS_DIR
from .locks import FileLock
from .signal import Signal

FLAT_MAX_ROWS = 100_000
INDEX_FILE = "index.faiss"
INDEX_META = "index.json"


def _faiss():
    import faiss  # deferred: opening a store, info and gc need no FAISS

    return faiss


def gpu_available() -> bool:
    faiss = _faiss()
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:
        return False


def _read_meta(index_dir: Path) -> dict:
    try:
        meta = json.loads((index_dir / INDEX_META).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def index_status(sig: Signal) -> str:
    """'none', 'fresh' or 'stale' (some shard changed since the index was built)."""
    meta = sig.dir / INDEX_DIR / INDEX_META
    if not meta.exists():
        return "none"
    try:
        state = json.loads(meta.read_text()).get("state")
    except (OSError, ValueError, AttributeError):  # unreadable, not UTF-8 or JSON, not an object: rebuild it
        return "stale"
    return "fresh" if state == sig.state_hash() else "stale"


def ivf_nlist(num_rows: int) -> int:
    """Number of IVF lists for ``num_rows`` vectors (never more lists than vectors)."""
    return int(min(num_rows, 65536, max(16, round(4 * math.sqrt(num_rows)))))


class SignalIndex:
    """A built index with its row ids; search returns (scores, row_ids)."""

    def __init__(self, index, kind: str, num_rows: int, dim: int, built: bool = True):
        self.index = index
        self.kind = kind
        self.num_rows = num_rows
        self.dim = dim
        self.built = built
        """False when build_index found the index another job built while it waited for the lock."""

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise StoreError(f"query vectors need dimension {self.dim}, got shape {q.shape}",
                             "embed the queries with the same model and settings as the signal")
        k = int(min(k, self.num_rows))
        if k <= 0:
            raise StoreError("k must be positive", "ask for at least one neighbour")
        scores, ids = self.index.search(q, k)
        return scores, ids


def build_index(sig: Signal, flat_max_rows: int = FLAT_MAX_ROWS, use_gpu: bool | None = None) -> SignalIndex:
    """Build from the committed shards, streaming; save beside the signal with its state hash."""
    if sig.dim is None:
        raise StoreError(f"signal {sig.name!r} is one-dimensional", "index an embedding or gradient signal")
    # one builder at a time; gc leaves the index alone while this is held
    with FileLock(sig.dir / LOCKS_DIR / INDEX_LOCK, timeout_s=600, what=f"index of {sig.name!r}"):
        meta = _read_meta(sig.dir / INDEX_DIR)
        if index_status(sig) == "fresh" and meta.get("flat_max_rows") == flat_max_rows:
            # built by another job (a second `stage all` on this store) while this one waited for the lock
            found = load_index(sig, rebuild=False, use_gpu=use_gpu)
            found.built = False
            return found
        index, kind, n = _build(sig, flat_max_rows)
    use_gpu = gpu_available() if use_gpu is None else use_gpu
    return SignalIndex(_to_gpu(index) if use_gpu else index, kind, n, sig.dim)


def _build(sig: Signal, flat_max_rows: int):
    faiss = _faiss()
    state = sig.state_hash()
    records = sig.records()
    n = sum(r.rows for r in records.values())
    if n == 0:
        raise StoreError(f"signal {sig.name!r} has no committed shards", "run its stage first")
    if n <= flat_max_rows:
        kind = "flat"
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(sig.dim))
    else:
        kind = "ivf"
        nlist = ivf_nlist(n)
        quantizer = faiss.IndexFlatIP(sig.dim)
        index = faiss.IndexIVFFlat(quantizer, sig.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        committed = np.concatenate([np.arange(*sig.shard_range(s)) for s in sorted(records)])
        take = min(n, 64 * nlist)
        sample_rows = np.sort(np.random.default_rng(0).choice(committed, size=take, replace=False))
        index.train(np.ascontiguousarray(sig.read_rows(sample_rows), dtype=np.float32))
        index.nprobe = max(8, nlist // 16)
    for _, start, values in sig.iter_shards(sorted(records)):
        ids = np.arange(start, start + len(values), dtype=np.int64)
        index.add_with_ids(np.ascontiguousarray(values, dtype=np.float32), ids)
    out_dir = sig.dir / INDEX_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / INDEX_FILE, faiss.serialize_index(index).tobytes())
    atomic_write_json(out_dir / INDEX_META, {"state": state, "kind": kind, "rows": n, "dim": sig.dim,
                                             "flat_max_rows": flat_max_rows})
    return index, kind, n


def _to_gpu(index):
    faiss = _faiss()
    res = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(res, 0, index)


def load_index(
    sig: Signal, rebuild: bool = True, use_gpu: bool | None = None, flat_max_rows: int | None = None,
) -> SignalIndex:
    """The signal's index, rebuilt first when missing or stale (unless ``rebuild=False``)."""
    faiss = _faiss()
    d = sig.dir / INDEX_DIR
    status = index_status(sig)
    if status != "fresh":
        if not rebuild:
            raise StoreError(f"the index of signal {sig.name!r} is {status}", "run `flexfeed stage index`")
        if flat_max_rows is None:  # rebuild with the size rule the last build used
            flat_max_rows = _read_meta(d).get("flat_max_rows", FLAT_MAX_ROWS)
        return build_index(sig, flat_max_rows=flat_max_rows, use_gpu=use_gpu)
    meta = _read_meta(d)
    index = faiss.deserialize_index(np.frombuffer(Path(d / INDEX_FILE).read_bytes(), dtype=np.uint8))
    use_gpu = gpu_available() if use_gpu is None else use_gpu
    return SignalIndex(_to_gpu(index) if use_gpu else index, meta["kind"], meta["rows"], meta["dim"])
