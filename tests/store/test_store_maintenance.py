"""`verify` finds damaged shards; `gc` removes debris and never committed data; `info` sums it up."""

from __future__ import annotations

import numpy as np
import pytest

from store.layout import LOCKS_DIR, SIGNAL_META, SIGNALS_DIR
from store.locks import FileLock
from store.maintenance import gc, info, verify
from tests.helpers.store_helpers import fill, make_store, snapshot


@pytest.fixture
def two_signals(tmp_path):
    st = make_store(tmp_path / "s", num_rows=10, shard_rows=4)
    emb = st.signal("emb", {"m": 1}, dtype="float16", dim=3)
    loss = st.signal("loss", {"m": 1})
    return st, emb, fill(emb, seed=1, version=3), loss, fill(loss, seed=2, version=4)


def _flip_byte(path, offset: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_is_clean_on_a_fresh_store(two_signals):
    st, *_ = two_signals
    report = verify(st)
    assert report.ok and report.checked == 6


def test_verify_names_a_flipped_byte_and_a_missing_file(two_signals):
    st, emb, _, loss, _ = two_signals
    _flip_byte(emb.chunk_path(1, emb.record(1).slot))
    loss.chunk_path(2, loss.record(2).slot).unlink()
    report = verify(st)
    assert report.checked == 6
    assert report.problems == [
        f"signal emb ({emb.key}) shard 1: checksum mismatch",
        f"signal loss ({loss.key}) shard 2: data file of slot {loss.record(2).slot} is missing",
    ]


def test_verify_reports_a_truncated_chunk_and_a_damaged_record(two_signals):
    st, emb, _, loss, _ = two_signals
    path = emb.chunk_path(0, emb.record(0).slot)
    path.write_bytes(path.read_bytes()[:7])
    (loss.dir / "commits" / "000001.json").write_text("{not json")
    problems = verify(st).problems
    assert any(f"({emb.key}) shard 0: unreadable" in p for p in problems)
    assert any(loss.key in p and "damaged commit record" in p and "000001.json" in p for p in problems)


def test_gc_removes_debris_reports_bytes_and_keeps_committed_data(two_signals):
    st, emb, emb_values, loss, loss_values = two_signals
    committed = snapshot(st.root)
    debris = {}

    def put(path, nbytes):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * nbytes)
        debris[str(path)] = nbytes

    put(emb.dir / "commits" / ".000001.json.k3j2.tmp", 40)  # interrupted commit record
    put(st.root / ".store.json.ab12.tmp", 30)  # interrupted header write
    put(emb.chunk_path(2, 0).with_suffix(".9f8e.partial"), 24)  # interrupted zarr chunk write
    orphan = st.root / SIGNALS_DIR / ("ab" * 10)  # a signal whose creation died before its header
    put(orphan / "data.zarr" / "zarr.json", 100)
    # an uncommitted slot: data written by a writer that died before its commit record
    free_slot = 1 - loss.record(0).slot
    loss.array[0, free_slot] = np.ones(4, dtype=np.float32)
    debris[str(loss.chunk_path(0, free_slot))] = loss.chunk_path(0, free_slot).stat().st_size

    report = gc(st)
    removed = {p for p in report.removed}
    assert {str(orphan)} | set(debris) - {str(orphan / "data.zarr" / "zarr.json")} == removed
    assert report.bytes_freed == sum(debris.values())
    after = snapshot(st.root)
    kept = {k: v for k, v in committed.items() if "/locks/" not in k and not k.startswith(LOCKS_DIR)}
    assert {k: after.get(k) for k in kept} == kept  # every committed byte untouched
    np.testing.assert_array_equal(emb.read_all(), emb_values)
    np.testing.assert_array_equal(loss.read_all(), loss_values)
    assert verify(st).ok
    assert gc(st).removed == []


def test_gc_leaves_what_a_live_writer_owns(two_signals):
    st, emb, *_ = two_signals
    tmp = emb.dir / "commits" / ".000002.json.zz.tmp"
    tmp.write_text("{}")
    free = 1 - emb.record(2).slot
    emb.array[2, free] = np.ones((4, 3), dtype=np.float16)  # a live writer's not-yet-committed slot
    orphan = st.root / SIGNALS_DIR / ("cd" * 10)
    orphan.mkdir()
    with FileLock(emb.lock_path(2)), FileLock(st.root / LOCKS_DIR / f"create-{orphan.name}.lock"):
        assert gc(st).removed == []
    assert tmp.exists() and emb.chunk_path(2, free).exists() and orphan.exists()
    assert len(gc(st).removed) == 3


def test_gc_drops_a_signal_dir_without_header_but_not_a_real_signal(two_signals):
    st, emb, *_ = two_signals
    (emb.dir / SIGNAL_META).rename(emb.dir / "signal.json.bak")  # now it is creation debris
    report = gc(st)
    assert str(emb.dir) in report.removed and not emb.dir.exists()
    assert [s.name for s in st.signals()] == ["loss"]


def test_info_counts_shards_versions_and_staleness(two_signals):
    st, emb, *_ = two_signals
    emb.write_shard(0, np.zeros((4, 3)), version=9, model="step9", seconds=0.5)
    data = info(st, current_version=9, max_staleness=2)
    assert (data["num_rows"], data["num_shards"], data["shard_rows"]) == (10, 3, 4)
    by_name = {s["name"]: s for s in data["signals"]}
    assert by_name["emb"]["versions"] == [3, 9] and by_name["emb"]["shards_stale"] == 2
    assert by_name["emb"]["models"] == ["m", "step9"] and by_name["emb"]["compute_seconds"] == 0.5
    assert by_name["loss"]["shards_committed"] == 3 and by_name["loss"]["dim"] is None
    assert by_name["loss"]["index"] == "none" and by_name["loss"]["bytes"] > 0
