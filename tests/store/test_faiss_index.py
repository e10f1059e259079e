"""FAISS indexes over a signal: exact flat search, IVF above the size rule, staleness and rebuilds."""

from __future__ import annotations

import numpy as np
import pytest

from store.errors import StoreError
from store.faiss_index import IndexRule, build_index, index_status, ivf_nlist, load_index
from store.maintenance import gc
from tests.helpers.store_helpers import make_store


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write(sig, values: np.ndarray) -> None:
    for shard in range(sig.num_shards):
        start, stop = sig.shard_range(shard)
        sig.write_shard(shard, values[start:stop])


def _brute_force(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def clustered():
    """Unit vectors around 24 centres: the kind of data (embeddings) an IVF index is made for."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((24, 16))
    base = _unit(centres[rng.integers(0, 24, 1500)] + 0.3 * rng.standard_normal((1500, 16)))
    queries = _unit(centres[rng.integers(0, 24, 40)] + 0.3 * rng.standard_normal((40, 16)))
    return base, queries


def test_flat_index_gives_the_exact_neighbours(tmp_path, clustered):
    base, queries = clustered
    sig = make_store(tmp_path / "s", num_rows=300, shard_rows=64).signal("emb", {"m": 1}, dim=16)
    _write(sig, base[:300])
    index = build_index(sig)
    assert (index.kind, index.num_rows, index_status(sig)) == ("flat", 300, "fresh")
    scores, ids = index.search(queries, 10)
    np.testing.assert_array_equal(ids, _brute_force(base[:300], queries, 10))
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ base[:300].T, ids, axis=1), rtol=1e-5)
    one_scores, one_ids = index.search(queries[0], 3)  # a single query vector works too
    np.testing.assert_array_equal(one_ids[0], ids[0, :3])


def test_ivf_above_the_size_rule_has_good_recall_and_survives_a_reload(tmp_path, clustered):
    base, queries = clustered
    sig = make_store(tmp_path / "s", num_rows=1500, shard_rows=256).signal("emb", {"m": 1}, dim=16)
    _write(sig, base)
    index = build_index(sig, IndexRule(flat_max_rows=1000))
    assert index.kind == "ivf" and index.index.nlist == ivf_nlist(1500)
    _, ids = index.search(queries, 10)
    truth = _brute_force(base, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
    print(f"ivf recall@10 {recall:.3f}")
    assert recall >= 0.9
    again = load_index(sig, use_gpu=False)  # fresh: read from disk, not rebuilt
    assert again.kind == "ivf"
    np.testing.assert_array_equal(again.search(queries, 10)[1], ids)


def test_recommit_makes_the_index_stale_and_load_rebuilds_it(tmp_path, clustered):
    base, _ = clustered
    st = make_store(tmp_path / "s", num_rows=200, shard_rows=50)
    sig = st.signal("emb", {"m": 1}, dim=16)
    _write(sig, base[:200])
    build_index(sig, IndexRule(flat_max_rows=100))
    assert index_status(sig) == "fresh"
    moved = base[:50].copy()
    moved[7] = -base[0]  # row 7 now points away from row 0
    sig.write_shard(0, moved)
    assert index_status(sig) == "stale"
    with pytest.raises(StoreError, match="is stale"):
        load_index(sig, rebuild=False)
    index = load_index(sig, use_gpu=False)
    assert index_status(sig) == "fresh"
    assert index.kind == "ivf"  # rebuilt with the size rule of the last build
    _, ids = index.search(-base[0], 1)
    assert ids[0, 0] == 7  # the rebuilt index holds the recommitted values
    sig.write_shard(1, base[50:100])  # same values, new commit: still a change of state
    assert index_status(sig) == "stale"
    assert str(sig.dir / "index") in gc(st).removed
    assert index_status(sig) == "none"


def test_bad_queries_and_signals_are_refused(tmp_path, clustered):
    base, _ = clustered
    st = make_store(tmp_path / "s", num_rows=100, shard_rows=50)
    sig = st.signal("emb", {"m": 1}, dim=16)
    with pytest.raises(StoreError, match="no committed shards"):
        build_index(sig)
    _write(sig, base[:100])
    index = build_index(sig)
    with pytest.raises(StoreError, match=r"query vectors need dimension 16, got shape \(2, 8\)"):
        index.search(np.zeros((2, 8)), 5)
    with pytest.raises(StoreError, match="k must be positive"):
        index.search(base[:1], 0)
    with pytest.raises(StoreError, match="one-dimensional"):
        build_index(st.signal("loss", {"m": 1}))


@pytest.mark.parametrize("rule, kind", [
    (IndexRule(flat_max_rows=1000, sq8_min_rows=1400), "ivf-sq8"),
    (IndexRule(flat_max_rows=1000, sq8_min_rows=1400, pq_min_rows=1500), "ivf-pq"),
])
def test_compressed_ivf_above_its_size_rule_is_smaller_and_finds_neighbours(tmp_path, clustered, rule, kind):
    base, queries = clustered
    sig = make_store(tmp_path / "s", num_rows=1500, shard_rows=256).signal("emb", {"m": 1}, dim=16)
    _write(sig, base)
    index = build_index(sig, rule, use_gpu=False)
    assert index.kind == kind
    # a row's float32 vector is 64 bytes; its SQ8 code 16, its PQ code 2 (one byte per 8 dims); each row
    # also keeps an 8-byte id, the lists their float32 centres, PQ its 256-entry codebook
    code_bytes, extra = {"ivf-sq8": (16, 0), "ivf-pq": (2, 256 * 16 * 4)}[kind]
    budget = 1500 * (code_bytes + 8) + ivf_nlist(1500) * 16 * 4 + extra + 2048
    assert (sig.dir / "index" / "index.faiss").stat().st_size < budget < 1500 * (64 + 8)
    _, ids = index.search(queries, 10)
    truth = _brute_force(base, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
    assert recall >= (0.8 if kind == "ivf-sq8" else 0.3)


def test_probing_every_list_is_exact_and_the_build_records_its_recall(tmp_path, clustered):
    base, queries = clustered
    sig = make_store(tmp_path / "s", num_rows=1500, shard_rows=256).signal("emb", {"m": 1}, dim=16)
    _write(sig, base)
    index = build_index(sig, IndexRule(flat_max_rows=1000, nprobe=10**6), use_gpu=False)
    assert index.nprobe == index.nlist == ivf_nlist(1500)
    assert index.recall == 1.0  # every list probed: the search is exhaustive
    assert "recall@10 1.000" in index.describe()
    np.testing.assert_array_equal(index.search(queries, 10)[1], _brute_force(base, queries, 10))
    # one list per query misses neighbours in the lists next to it; a search may name its own nprobe
    _, one = index.search(queries, 10, nprobe=1)
    assert index.search(queries, 10, nprobe=1)[1].tolist() == one.tolist()
    assert not np.array_equal(one, _brute_force(base, queries, 10))
    assert not any(p.name.endswith(".tmp") for p in (sig.dir / "index").iterdir())


def test_shared_index_is_loaded_once_and_replaced_when_the_signal_changes(tmp_path, clustered):
    from store.faiss_index import forget_shared, shared_index

    base, _ = clustered
    sig = make_store(tmp_path / "s", num_rows=200, shard_rows=50).signal("emb", {"m": 1}, dim=16)
    _write(sig, base[:200])
    forget_shared()
    first = shared_index(sig, use_gpu=False)
    assert shared_index(sig, use_gpu=False) is first  # no second read from disk
    moved = base[:50].copy()
    moved[7] = -base[0]
    sig.write_shard(0, moved)
    again = shared_index(sig, use_gpu=False)
    assert again is not first and index_status(sig) == "fresh"
    assert again.search(-base[0], 1)[1][0, 0] == 7
    forget_shared()


def test_an_index_saved_before_the_rule_fields_still_loads(tmp_path, clustered):
    import json

    import faiss

    base, queries = clustered
    sig = make_store(tmp_path / "s", num_rows=1500, shard_rows=256).signal("emb", {"m": 1}, dim=16)
    _write(sig, base)
    build_index(sig, IndexRule(flat_max_rows=1000), use_gpu=False)
    meta_path = sig.dir / "index" / "index.json"
    meta = json.loads(meta_path.read_text())
    old = {k: meta[k] for k in ("state", "kind", "rows", "dim")} | {"flat_max_rows": 1000}
    meta_path.write_text(json.dumps(old))
    # the earlier build's nprobe rule, max(8, nlist // 16), as FAISS saved it inside the index file
    saved = faiss.read_index(str(sig.dir / "index" / "index.faiss"))
    saved.nprobe = max(8, ivf_nlist(1500) // 16)
    faiss.write_index(saved, str(sig.dir / "index" / "index.faiss"))
    index = load_index(sig, use_gpu=False)
    assert (index.kind, index.nprobe, index.recall) == ("ivf", 9, None)
    assert index.search(queries, 5)[1].shape == (40, 5)
    # the same rule as the old build: reused, not rebuilt
    assert build_index(sig, IndexRule(flat_max_rows=1000), use_gpu=False).built is False
