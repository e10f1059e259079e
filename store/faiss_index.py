"""FAISS index per signal, saved beside it, rebuilt when any shard changes, and loaded once per process.

Size rule (``IndexRule``): exact inner-product search (``IndexFlatIP``) while the signal has at most
``flat_max_rows`` committed rows; above that an inverted-file index with
``nlist = clamp(4 * sqrt(N), 16, 65536)`` lists, trained (10 k-means rounds) on up to ``40 * nlist``
sampled rows and filled shard by shard. Its vectors are float32 (``ivf``), 8-bit scalar-quantised from ``sq8_min_rows`` rows
(``ivf-sq8``, a quarter of the memory) and product-quantised from ``pq_min_rows`` (``ivf-pq``, one byte
per 8 dims), so that a 10M-row index fits in memory. A search probes ``nprobe`` lists (default
``max(8, nlist // 64)``, about 1.5 % of the rows); a build measures the recall@10 of that setting against exact search on
sampled rows and keeps it with the index. L2-normalised signals (embeddings, gradient features) make
inner product the cosine.

Saved indexes are memory-mapped when loaded (FAISS maps an IVF index's lists and a flat index's
vectors), so every rank of a machine shares one copy in the page cache; ``shared_index`` keeps the
loaded index for the rest of the process while the signal's state hash is unchanged.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write_json, fsync_dir
from .errors import StoreError
from .layout import INDEX_DIR, INDEX_LOCK, LOCKS_DIR
from .locks import FileLock
from .signal import Signal

FLAT_MAX_ROWS = 100_000
INDEX_FILE = "index.faiss"
INDEX_META = "index.json"
RECALL_K = 10
RECALL_QUERIES = 64


def _faiss():
    import faiss  # deferred: opening a store, info and gc need no FAISS

    return faiss


def gpu_available() -> bool:
    faiss = _faiss()
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:
        return False


@dataclass(frozen=True, kw_only=True)
class IndexRule:
    """How a signal of N rows is indexed (what stages.args.IndexArgs configures)."""

    flat_max_rows: int = FLAT_MAX_ROWS
    sq8_min_rows: int = 1_000_000
    pq_min_rows: int = 20_000_000
    nprobe: int | None = None
    """IVF lists searched per query; None: max(8, nlist // 64). Not part of a build: a search sets it."""

    def kind(self, num_rows: int) -> str:
        """'flat', 'ivf', 'ivf-sq8' or 'ivf-pq' for an index of ``num_rows`` vectors."""
        if num_rows <= self.flat_max_rows:
            return "flat"
        if num_rows >= self.pq_min_rows:
            return "ivf-pq"
        return "ivf-sq8" if num_rows >= self.sq8_min_rows else "ivf"

    def build_fields(self) -> dict:
        """The fields that decide what a build makes (an index built with the same ones is reused)."""
        return {k: v for k, v in asdict(self).items() if k != "nprobe"}

    def nprobe_for(self, nlist: int) -> int:
        return int(min(nlist, self.nprobe if self.nprobe is not None else max(8, nlist // 64)))


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


def pq_subquantizers(dim: int) -> int:
    """Sub-quantizers of an IVF-PQ code: one byte per 8 dims, a divisor of ``dim``."""
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)


class SignalIndex:
    """A built index with its row ids; search returns (scores, row_ids)."""

    def __init__(self, index, kind: str, num_rows: int, dim: int, built: bool = True, *,
                 nlist: int = 0, nprobe: int = 0, recall: float | None = None):
        self.index = index
        self.kind = kind
        self.num_rows = num_rows
        self.dim = dim
        self.built = built
        """False when build_index found the index another job built while it waited for the lock."""
        self.nlist = nlist
        self.nprobe = nprobe
        """Lists a search probes unless it names another number (0 for an exact index)."""
        self.recall = recall
        """recall@10 against exact search on sampled rows at the build's nprobe (None for an exact index)."""

    def describe(self) -> str:
        """One line for the stage log: kind, size, and for IVF the lists probed and the measured recall."""
        text = f"{self.kind} index over {self.num_rows} rows"
        if self.nlist:
            text += f", nprobe {self.nprobe} of {self.nlist} lists"
        if self.recall is not None:
            text += f", recall@{RECALL_K} {self.recall:.3f} against exact search on {RECALL_QUERIES} sampled rows"
        return text

    def search(self, queries, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows by inner product for each query; ``nprobe`` overrides the index's lists probed."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise StoreError(f"query vectors need dimension {self.dim}, got shape {q.shape}",
                             "embed the queries with the same model and settings as the signal")
        k = int(min(k, self.num_rows))
        if k <= 0:
            raise StoreError("k must be positive", "ask for at least one neighbour")
        if self.nlist:
            want = int(min(self.nlist, nprobe or self.nprobe))
            if want != getattr(self.index, "nprobe", want):
                self.index.nprobe = want
        return self.index.search(q, k)


def build_index(sig: Signal, rule: IndexRule | None = None, use_gpu: bool | None = None) -> SignalIndex:
    """Build from the committed shards, streaming; save beside the signal with its state hash and rule."""
    rule = rule or IndexRule()
    if sig.dim is None:
        raise StoreError(f"signal {sig.name!r} is one-dimensional", "index an embedding or gradient signal")
    # one builder at a time; gc leaves the index alone while this is held
    with FileLock(sig.dir / LOCKS_DIR / INDEX_LOCK, timeout_s=600, what=f"index of {sig.name!r}"):
        if index_status(sig) == "fresh" and _last_rule(sig.dir / INDEX_DIR).build_fields() == rule.build_fields():
            # built by another job (a second `stage all` on this store) while this one waited for the lock
            found = load_index(sig, rebuild=False, use_gpu=use_gpu, rule=rule)
            found.built = False
            return found
        _build(sig, rule)
        return _open(sig.dir / INDEX_DIR, use_gpu)


def _empty_index(kind: str, dim: int, nlist: int):
    faiss = _faiss()
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf-sq8":
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivf-pq":
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_subquantizers(dim), 8, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    return index  # FAISS's Python wrapper keeps the quantizer alive with the index


def _committed_rows(sig: Signal, shards: list[int]) -> np.ndarray:
    return np.concatenate([np.arange(*sig.shard_range(s)) for s in shards])


def _build(sig: Signal, rule: IndexRule) -> None:
    state = sig.state_hash()
    records = sig.records()
    shards = sorted(records)
    n = sum(r.rows for r in records.values())
    if n == 0:
        raise StoreError(f"signal {sig.name!r} has no committed shards", "run its stage first")
    kind = rule.kind(n)
    nlist = 0 if kind == "flat" else ivf_nlist(n)
    index = _empty_index(kind, sig.dim, nlist)
    if nlist:
        rng = np.random.default_rng(0)
        # FAISS asks for 39 rows per list; k-means costs rows x lists x rounds, most of a large build
        sample = np.sort(rng.choice(_committed_rows(sig, shards), size=min(n, 40 * nlist), replace=False))
        index.cp.niter = 10
        index.train(_float32_rows(sig, sample))
    for _, start, values in sig.iter_shards(shards):
        ids = np.arange(start, start + len(values), dtype=np.int64)
        index.add_with_ids(np.ascontiguousarray(values, dtype=np.float32), ids)
    nprobe = rule.nprobe_for(nlist) if nlist else 0
    recall = None
    if nlist:
        index.nprobe = nprobe
        recall = sampled_recall(index, sig, shards)
    out_dir = sig.dir / INDEX_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_index(index, out_dir / INDEX_FILE)
    del index
    atomic_write_json(out_dir / INDEX_META, {"state": state, "kind": kind, "rows": n, "dim": sig.dim,
                                             "rule": rule.build_fields(), "nlist": nlist, "nprobe": nprobe,
                                             "recall": recall})


def _float32_rows(sig: Signal, rows: np.ndarray) -> np.ndarray:
    """float32 values of sorted row ids, converted shard by shard (no whole float16 copy beside them)."""
    out = np.empty((rows.size, sig.dim), dtype=np.float32)
    shard_of = rows // sig.shard_rows
    bounds = np.searchsorted(shard_of, np.arange(sig.num_shards + 1))
    for shard in np.unique(shard_of):
        lo, hi = bounds[shard], bounds[shard + 1]
        out[lo:hi] = sig.read_shard(int(shard))[rows[lo:hi] - shard * sig.shard_rows]
    return out


def exact_top_k(sig: Signal, shards: list[int], queries: np.ndarray, k: int) -> np.ndarray:
    """Row ids of each query's exact top-``k`` by inner product, streaming the signal shard by shard."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for _, start, values in sig.iter_shards(shards):
        scores = queries @ np.asarray(values, dtype=np.float32).T
        ids = np.broadcast_to(np.arange(start, start + len(values)), scores.shape)
        cand_scores = np.concatenate([best_scores, scores], axis=1)
        cand_ids = np.concatenate([best_ids, ids], axis=1)
        keep = np.argsort(-cand_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(cand_scores, keep, axis=1)
        best_ids = np.take_along_axis(cand_ids, keep, axis=1)
    return best_ids


def sampled_recall(index, sig: Signal, shards: list[int]) -> float:
    """Mean recall@10 of ``index`` on sampled committed rows as queries, against exact search."""
    rows = np.sort(np.random.default_rng(1).choice(_committed_rows(sig, shards), size=RECALL_QUERIES))
    queries = _float32_rows(sig, rows)
    k = min(RECALL_K, index.ntotal)
    truth = exact_top_k(sig, shards, queries, k)
    _, found = index.search(queries, k)
    return round(float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)])), 4)


def _write_index(index, path: Path) -> None:
    """Write the index file atomically, straight from FAISS (no serialized copy held in memory)."""
    faiss = _faiss()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _to_gpu(index):
    faiss = _faiss()
    res = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(res, 0, index)


def _read_index(path: Path, kind: str):
    """Memory-mapped where FAISS can: an IVF index's lists, a flat index's vectors."""
    faiss = _faiss()
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if kind == "flat" else faiss.IO_FLAG_MMAP)


def load_index(
    sig: Signal, rebuild: bool = True, use_gpu: bool | None = None, rule: IndexRule | None = None,
) -> SignalIndex:
    """The signal's index, rebuilt first when missing or stale (unless ``rebuild=False``) with ``rule``, else
    with the rule of the last build."""
    d = sig.dir / INDEX_DIR
    status = index_status(sig)
    if status != "fresh":
        if not rebuild:
            raise StoreError(f"the index of signal {sig.name!r} is {status}", "run `flexfeed stage index`")
        return build_index(sig, rule or _last_rule(d), use_gpu=use_gpu)
    return _open(d, use_gpu)


def _open(index_dir: Path, use_gpu: bool | None) -> SignalIndex:
    meta = _read_meta(index_dir)
    kind = meta["kind"]
    index = _read_index(index_dir / INDEX_FILE, kind)
    nlist = int(getattr(index, "nlist", 0))
    # an index saved before nprobe was recorded beside it keeps the one FAISS saved in it
    nprobe = int(meta.get("nprobe") or index.nprobe) if nlist else 0
    if nlist:
        index.nprobe = nprobe
    use_gpu = gpu_available() if use_gpu is None else use_gpu
    return SignalIndex(_to_gpu(index) if use_gpu else index, kind, meta["rows"], meta["dim"], nlist=nlist,
                       nprobe=nprobe, recall=meta.get("recall"))


def _last_rule(index_dir: Path) -> IndexRule:
    """The rule of the last build (its flat_max_rows only, for indexes saved before the others existed)."""
    meta = _read_meta(index_dir)
    fields = meta.get("rule") or {"flat_max_rows": meta.get("flat_max_rows", FLAT_MAX_ROWS)}
    try:
        return IndexRule(**fields)
    except TypeError:
        return IndexRule()


_SHARED: dict[str, tuple[str, SignalIndex]] = {}
_SHARED_LOCK = threading.Lock()


def shared_index(sig: Signal, rule: IndexRule | None = None, use_gpu: bool | None = None) -> SignalIndex:
    """The signal's index, loaded (or built) once per process and kept while the signal's state is unchanged.

    Decisions search the same index again and again (a selector widening k searches twice): reading it
    from disk each time cost more than the search at a million rows.
    """
    state = sig.state_hash()
    key = str(sig.dir)
    with _SHARED_LOCK:
        hit = _SHARED.get(key)
        if hit is not None and hit[0] == state:
            return hit[1]
        index = load_index(sig, use_gpu=use_gpu, rule=rule)
        _SHARED[key] = (state, index)
        return index


def forget_shared() -> None:
    """Drop every index ``shared_index`` holds (the next search loads it again)."""
    with _SHARED_LOCK:
        _SHARED.clear()
