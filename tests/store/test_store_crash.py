"""Crash safety and writer exclusion, with real processes: SIGKILL mid-commit, concurrent writers."""

from __future__ import annotations

import os
import random
import select
import signal
import time

import numpy as np
import pytest

from store.errors import LockBusy
from store.maintenance import gc, verify
from store.store import Store
from tests.helpers.store_helpers import fill, make_store, start_writer
from tests.helpers.store_writer import DIM, SPEC, shard_values

pytestmark = pytest.mark.multiproc


def _read_line(proc, timeout_s: float = 30.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    assert ready, f"writer printed nothing in {timeout_s} s: {proc.stderr.read() if proc.poll() else ''}"
    line = proc.stdout.readline()
    assert line, f"writer ended early: {proc.stderr.read()}"
    return line


def _check_committed_shards_match_records(sig) -> None:
    """Every visible shard holds exactly what its commit record says was written."""
    for shard, rec in sig.records().items():
        np.testing.assert_array_equal(sig.read_shard(shard), shard_values(sig, shard, rec.version))


def test_sigkill_mid_commit_never_shows_a_torn_shard_and_a_rerun_completes(tmp_path):
    st = make_store(tmp_path / "s", num_rows=40, shard_rows=8)
    sig = st.signal("crash", SPEC, dtype="float32", dim=DIM)
    rng = random.Random(0)
    kills = 0
    for attempt in range(10):
        # the pause sits between the data write and the commit record: most kills land in the
        # window where the new slot is written and not yet committed
        proc = start_writer(st.root, "1000", str(100 * attempt), STORE_WRITER_PAUSE_S="0.01")
        for _ in range(rng.randint(1, 4)):
            _read_line(proc)
        time.sleep(rng.uniform(0.0, 0.012))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        kills += proc.returncode == -signal.SIGKILL
        reader = Store.open(st.root).get(sig.key)
        _check_committed_shards_match_records(reader)
        report = verify(Store.open(st.root))
        assert report.ok, report.problems
    assert kills == 10
    # kills inside the pause leave a written, uncommitted slot: proof they hit mid-commit
    assert gc(Store.open(st.root)).removed
    # a rerun commits every shard over whatever the kills left
    proc = start_writer(st.root, "1", "999999")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    final = Store.open(st.root).get(sig.key)
    assert final.is_complete()
    assert {r.version for r in final.records().values()} == {999999}
    _check_committed_shards_match_records(final)
    assert verify(Store.open(st.root)).ok
    assert gc(Store.open(st.root)).removed == []  # nothing left behind by a clean run


def test_a_kill_while_paused_before_commit_keeps_the_previous_values(tmp_path):
    st = make_store(tmp_path / "s", num_rows=16, shard_rows=8)
    sig = st.signal("crash", SPEC, dtype="float32", dim=DIM)
    sig.write_shard(0, shard_values(sig, 0, 5), version=5)
    proc = start_writer(st.root, "1", "6", "0", STORE_WRITER_PAUSE_S="30")
    deadline = time.monotonic() + 30
    # wait until the new data is in the other slot and the writer sleeps before its commit
    while not sig.chunk_path(0, 1).exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    time.sleep(0.05)
    proc.kill()
    proc.communicate()
    assert sig.record(0).version == 5
    np.testing.assert_array_equal(sig.read_shard(0), shard_values(sig, 0, 5))
    assert verify(st).ok
    report = gc(st)
    assert str(sig.chunk_path(0, 1)) in report.removed and report.bytes_freed >= 8 * DIM * 4
    np.testing.assert_array_equal(sig.read_shard(0), shard_values(sig, 0, 5))


def test_two_processes_writing_different_shards_lose_nothing(tmp_path):
    st = make_store(tmp_path / "s", num_rows=64, shard_rows=4)  # 16 shards
    evens = [str(s) for s in range(0, 16, 2)]
    odds = [str(s) for s in range(1, 16, 2)]
    # both create the signal at once (creation is locked) and then commit shards side by side
    procs = [start_writer(st.root, "3", "0", *evens), start_writer(st.root, "3", "10", *odds)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    sig = st.find("crash")[0]
    assert len(st.find("crash")) == 1
    recs = sig.records()
    assert sorted(recs) == list(range(16))
    assert {recs[s].version for s in range(0, 16, 2)} == {2}
    assert {recs[s].version for s in range(1, 16, 2)} == {12}
    assert {r.generation for r in recs.values()} == {2}
    _check_committed_shards_match_records(sig)
    assert verify(st).ok


def test_second_writer_of_a_shard_fails_clearly_or_waits(tmp_path):
    st = make_store(tmp_path / "s", num_rows=16, shard_rows=8)
    sig = st.signal("crash", SPEC, dtype="float32", dim=DIM)
    # the child holds shard 0's lock for a while (paused before its commit record)
    proc = start_writer(st.root, "1", "1", "0", STORE_WRITER_PAUSE_S="1.0")
    deadline = time.monotonic() + 30
    while not sig.chunk_path(0, 0).exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    mine = shard_values(sig, 0, 2)
    with pytest.raises(LockBusy, match="shard 0 of 'crash' is being written by another process") as info:
        sig.write_shard(0, mine, version=2)
    assert "lock timeout" in info.value.hint
    with pytest.raises(LockBusy):
        sig.write_shard(0, mine, version=2, lock_timeout_s=0.1)
    rec = sig.write_shard(0, mine, version=2, lock_timeout_s=30)  # waits for the child, then commits
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (rec.version, rec.generation) == (2, 1)
    np.testing.assert_array_equal(sig.read_shard(0), mine)
    assert verify(st).ok


def test_reader_in_another_process_never_sees_a_torn_shard(tmp_path):
    st = make_store(tmp_path / "s", num_rows=8, shard_rows=8)
    sig = st.signal("crash", SPEC, dtype="float32", dim=DIM)
    sig.write_shard(0, shard_values(sig, 0, 0), version=0)
    proc = start_writer(st.root, "100", "1", "0")
    seen = set()
    try:
        while proc.poll() is None:
            for shard, _, values in sig.iter_shards():
                rec_version = int(values[0, 0]) - shard * 1000
                np.testing.assert_array_equal(values, shard_values(sig, shard, rec_version))
                seen.add(rec_version)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert len(seen) > 1  # the reader really overlapped with the writer


def test_signal_key_is_the_same_in_a_writer_process(tmp_path):
    # the spec, dtype, dim and dataset alone make the key, in any process
    st = make_store(tmp_path / "s")
    key = st.signal("crash", SPEC, dtype="float32", dim=DIM).key
    proc = start_writer(st.root, "1", "0")
    proc.communicate(timeout=60)
    assert [s.key for s in st.signals()] == [key]
    assert os.path.isdir(st.root / "signals" / key / "commits")
    other = st.signal("other", {"x": 1})
    fill(other)
    assert verify(st).checked == st.meta.num_shards * 2
