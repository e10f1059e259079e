"""The signal store's API: round trips, refusals of bad input, staleness, keys, format versions."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from store.errors import FlexfeedError, StoreError
from store.hashing import fingerprint_records
from store.layout import STORE_META
from store.store import Store
from tests.helpers.store_helpers import FINGERPRINT, child_env, fill, make_store, snapshot


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("dim", [None, 3])
def test_round_trip_every_dtype_and_shape(tmp_path, dtype, dim):
    st = make_store(tmp_path / "s", num_rows=10, shard_rows=4)  # shards of 4, 4 and a partial 2
    sig = st.signal("emb", {"model": "m", "dim": dim}, dtype=dtype, dim=dim)
    full = fill(sig, seed=1)
    assert sig.shard_range(2) == (8, 10)
    assert sig.record(2).rows == 2
    assert sig.read_all().dtype == np.dtype(dtype)
    np.testing.assert_array_equal(sig.read_all(), full)
    np.testing.assert_array_equal(sig.read_shard(2), full[8:10])
    rows = [9, 0, 5, 9, 3]
    np.testing.assert_array_equal(sig.read_rows(rows), full[rows])
    streamed = [(shard, start, values.copy()) for shard, start, values in sig.iter_shards()]
    assert [(s, st_) for s, st_, _ in streamed] == [(0, 0), (1, 4), (2, 8)]
    np.testing.assert_array_equal(np.concatenate([v for _, _, v in streamed]), full)
    # a second handle (another process would do the same) reads the same values
    again = Store.open(tmp_path / "s", dataset_fingerprint=FINGERPRINT).get(sig.key)
    np.testing.assert_array_equal(again.read_all(), full)


def test_recommit_replaces_values_and_counts_generations(tmp_path):
    sig = make_store(tmp_path / "s").signal("loss", {"v": 1})
    first = fill(sig, seed=1, version=0)
    second = np.arange(4, dtype=np.float32)
    rec = sig.write_shard(1, second, version=7, model="step7")
    assert (rec.version, rec.generation, rec.model) == (7, 1, "step7")
    np.testing.assert_array_equal(sig.read_shard(1), second)
    np.testing.assert_array_equal(sig.read_shard(0), first[:4])


def test_uncommitted_shards_are_refused_by_readers(tmp_path):
    sig = make_store(tmp_path / "s").signal("loss", {"v": 1})
    sig.write_shard(0, np.ones(4, dtype=np.float32))
    with pytest.raises(StoreError, match="shard 1 .* not committed"):
        sig.read_shard(1)
    with pytest.raises(StoreError, match="lacks 2 of 3 shards"):
        sig.read_all()
    assert [s for s, _, _ in sig.iter_shards()] == [0]


def test_same_spec_same_signal_other_spec_new_signal(tmp_path):
    st = make_store(tmp_path / "s")
    a = st.signal("emb", {"model": "m", "pool": "mean"}, dim=2)
    b = st.signal("emb", {"pool": "mean", "model": "m"}, dim=2)  # key order does not matter
    c = st.signal("emb", {"model": "m", "pool": "last"}, dim=2)
    assert a.key == b.key != c.key
    assert {s.key for s in st.find("emb")} == {a.key, c.key}
    assert st.get(a.key).meta.spec == {"model": "m", "pool": "mean"}


def test_fingerprint_is_the_same_in_another_process():
    records = [{"instruction": "add", "output": "2", "n": 1.5}, {"output": "x", "instruction": "é"}]
    here = fingerprint_records(records, {"cutoff_len": 64})
    code = ("import json, sys; from store.hashing import fingerprint_records; "
            "recs = json.loads(sys.argv[1]); "
            "recs = [dict(reversed(list(r.items()))) for r in recs]; "  # another key order
            "print(fingerprint_records(recs, {'cutoff_len': 64}))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(records)], capture_output=True, text=True,
                         env=child_env(PYTHONHASHSEED="12345"), check=True).stdout.strip()
    assert out == here
    assert fingerprint_records(records[::-1], {"cutoff_len": 64}) != here  # order is content


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def filled(tmp_path):
    st = make_store(tmp_path / "s")
    sig = st.signal("emb", {"m": 1}, dtype="float16", dim=3)
    fill(sig)
    return st, sig


def _refused(root, call, match: str) -> FlexfeedError:
    """``call`` raises one FlexfeedError matching ``match`` and leaves ``root`` byte for byte as it was."""
    before = snapshot(root)
    with pytest.raises(FlexfeedError, match=match) as info:
        call()
    assert info.value.hint, "every refusal carries a hint with the fix"
    assert snapshot(root) == before
    return info.value


@pytest.mark.parametrize(
    ("what", "values", "match"),
    [
        ("wrong dim", np.zeros((4, 2)), r"needs shape \(4, 3\), got \(4, 2\)"),
        ("wrong rows", np.zeros((3, 3)), r"needs shape \(4, 3\)"),
        ("integer dtype", np.zeros((4, 3), dtype=np.int64), "floating-point values"),
        ("strings", [["a"] * 3] * 4, "floating-point values"),
        ("ragged", [[1.0], [1.0, 2.0]], "not an array"),
        ("nan", np.full((4, 3), np.nan), "non-finite value at row 4"),
        ("inf", np.full((4, 3), np.inf), "non-finite"),
        ("float16 overflow", np.full((4, 3), 1e6), "overflows float16"),
    ],
)
def test_bad_values_are_refused_and_write_nothing(filled, what, values, match):
    st, sig = filled
    _refused(st.root, lambda: sig.write_shard(1, values), match)


def test_bad_shard_and_row_ids_are_refused(filled):
    st, sig = filled
    _refused(st.root, lambda: sig.write_shard(3, np.zeros((4, 3))), r"shard 3 is out of range .* 0\.\.2")
    _refused(st.root, lambda: sig.write_shard(-1, np.zeros((4, 3))), "out of range")
    _refused(st.root, lambda: sig.read_rows([0, 10]), r"row 10 is out of range .* 0\.\.9")
    _refused(st.root, lambda: sig.read_rows([-1]), "row -1 is out of range")
    _refused(st.root, lambda: list(sig.iter_shards([5])), "shard 5 is out of range")


@pytest.mark.parametrize("name", ["a/b", "..", "../x", "a..b", "", ".hidden", "x" * 200])
def test_invalid_signal_names_are_refused(filled, name):
    st, _ = filled
    _refused(st.root, lambda: st.signal(name, {}), "invalid signal name")


def test_bad_signal_settings_are_refused(filled):
    st, _ = filled
    _refused(st.root, lambda: st.signal("x", {}, dtype="int8"), "dtype 'int8' is not supported")
    _refused(st.root, lambda: st.signal("x", {}, dim=0), "positive integer")
    _refused(st.root, lambda: st.signal("x", {"f": {1, 2}}), "cannot be hashed")
    _refused(st.root, lambda: st.signal("x", {"f": float("nan")}), "cannot be hashed")
    _refused(st.root, lambda: st.get("0" * 20), "has no signal")
    _refused(st.root, lambda: st.get("../etc"), "invalid signal key")


def test_store_of_another_dataset_is_refused(filled):
    st, _ = filled
    _refused(st.root, lambda: Store.open(st.root, dataset_fingerprint="ffff"), "holds dataset 0123.*not ffff")
    _refused(st.root, lambda: Store.open_or_create(st.root, dataset_fingerprint="ffff", num_rows=10),
             "not ffff")
    _refused(st.root, lambda: Store.open_or_create(st.root, dataset_fingerprint=FINGERPRINT, num_rows=11),
             "has 10 rows, the dataset 11")
    _refused(st.root, lambda: Store.create(st.root, dataset_fingerprint=FINGERPRINT, num_rows=10),
             "exists already")


def test_missing_store_is_refused_and_not_created(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(StoreError, match=f"no flexfeed store at {missing}"):
        Store.open(missing)
    assert not missing.exists()
    with pytest.raises(StoreError, match="not a local path"):
        Store.open("s3://bucket/store")


def test_store_of_another_format_version_names_the_writer(filled):
    st, _ = filled
    header = st.root / STORE_META
    meta = json.loads(header.read_text())
    meta.update(format_version=3, flexfeed_version="9.9.0")
    header.write_text(json.dumps(meta))
    err = _refused(st.root, lambda: Store.open(st.root), "format version 3, written by flexfeed 9.9.0")
    assert "reads format 2" in err.message


# ----------------------------------------------------------------------------- staleness
def test_staleness_by_version_and_missing_shards(tmp_path):
    st = make_store(tmp_path / "s", num_rows=16, shard_rows=4)
    sig = st.signal("loss", {"v": 1})
    for shard, version in [(0, 0), (1, 5), (2, 10)]:  # shard 3 never computed
        sig.write_shard(shard, np.zeros(4, dtype=np.float32), version=version, model=f"step{version}")
    assert sig.stale_shards() == [3]  # without a current version only missing shards are stale
    assert sig.stale_shards(current_version=12, max_staleness=5) == [0, 1, 3]
    assert sig.stale_shards(current_version=12, max_staleness=12) == [3]
    assert sig.stale_shards(current_version=10, max_staleness=0) == [0, 1, 3]
    states = sig.shard_states(current_version=12, max_staleness=5)
    assert [(s.shard, s.committed, s.version, s.model, s.stale) for s in states] == [
        (0, True, 0, "step0", True), (1, True, 5, "step5", True), (2, True, 10, "step10", False),
        (3, False, None, None, True)]
    sig.write_shard(0, np.zeros(4, dtype=np.float32), version=12)  # a refresh makes it fresh again
    assert sig.stale_shards(current_version=12, max_staleness=5) == [1, 3]


def test_stage_log_appends_and_skips_a_torn_line(tmp_path):
    st = make_store(tmp_path / "s")
    st.log_stage(stage="embed", seconds=1.5)
    with open(st.root / "stage_log.jsonl", "a") as fh:
        fh.write('{"stage": "lo')  # what a crash mid-append leaves
    assert [e["stage"] for e in st.stage_log()] == ["embed"]
    st.log_stage(stage="loss", seconds=2.0)
    assert [e["stage"] for e in st.stage_log()] == ["embed", "loss"]
