"""Claims: a shard one job computes is skipped by another job on the same store, waited for at the end, and
taken over once its claim is stale (no heartbeat, or its owner process is gone)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np

from stages.args import RunnerArgs
from stages.base import SignalDesc, Stage
from stages.runner import run_stage
from store.claims import ClaimedShards, ShardClaims, claim_path
from store.maintenance import gc, verify
from tests.helpers.store_helpers import RowIdData, make_store


def _sig(tmp_path):
    st = make_store(tmp_path / "s", num_rows=10, shard_rows=4)
    return st, st.signal("x", {"m": 1})


def _foreign_claim(sig, shard: int, *, host: str, pid: int, age_s: float) -> None:
    path = claim_path(sig, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "token": "other", "claimed_at": time.time() - age_s,
                                "heartbeat_at": time.time() - age_s}))


def test_a_claimed_shard_is_refused_to_another_job_until_released(tmp_path):
    _, sig = _sig(tmp_path)
    a, b = ShardClaims(sig), ShardClaims(sig)
    assert a.try_claim(0) and not b.try_claim(0) and b.try_claim(1)
    assert b.holder(0)["token"] == a.token
    a.close()
    assert not claim_path(sig, 0).exists() and b.try_claim(0)
    b.close()
    assert not list((sig.dir / "claims").glob("*.json"))


def test_a_claim_without_heartbeat_is_taken_over_after_the_timeout_a_live_one_is_not(tmp_path):
    _, sig = _sig(tmp_path)
    _foreign_claim(sig, 0, host="another-host", pid=1, age_s=120)  # older than the 60 s default
    _foreign_claim(sig, 1, host="another-host", pid=1, age_s=1)
    claims = ShardClaims(sig)
    assert claims.try_claim(0) and not claims.try_claim(1)
    assert ShardClaims(sig, stale_s=0.5).try_claim(1)  # 1 s without a heartbeat is stale under a 0.5 s timeout
    claims.close()


def test_a_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    _, sig = _sig(tmp_path)
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _foreign_claim(sig, 2, host=socket.gethostname(), pid=int(child.stdout), age_s=0)
    claims = ShardClaims(sig)
    assert claims.try_claim(2)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exited, not yet reaped: a killed job's state
    deadline = time.monotonic() + 30
    while open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[-1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    _foreign_claim(sig, 1, host=socket.gethostname(), pid=zombie.pid, age_s=0)
    assert claims.try_claim(1)
    zombie.wait()
    claims.close()


def test_the_heartbeat_keeps_a_long_computation_claimed(tmp_path):
    _, sig = _sig(tmp_path)
    a = ShardClaims(sig, heartbeat_s=0.05)
    assert a.try_claim(0)
    time.sleep(0.6)
    assert not ShardClaims(sig, stale_s=0.3).try_claim(0)  # 0.6 s after the claim, but beaten every 0.05 s
    a._stop.set()
    a._thread.join()
    time.sleep(0.4)  # no beat for longer than the other job's timeout
    assert ShardClaims(sig, stale_s=0.3).try_claim(0)


def test_gc_removes_stale_claims_and_keeps_live_ones(tmp_path):
    st, sig = _sig(tmp_path)
    _foreign_claim(sig, 0, host="another-host", pid=1, age_s=3600)
    live = ShardClaims(sig)
    assert live.try_claim(1)
    report = gc(st)
    assert str(claim_path(sig, 0)) in report.removed and claim_path(sig, 1).exists()
    live.close()


def test_a_job_waits_at_the_end_for_the_shards_another_job_holds(tmp_path):
    _, sig = _sig(tmp_path)
    other = ShardClaims(sig)
    assert other.try_claim(0)
    queue = ClaimedShards(sig, [0, 1, 2], ShardClaims(sig), poll_s=0.02)
    assert [queue.take(), queue.take()] == [1, 2]
    assert queue.take(block=False) is None and queue.waiting == [0]

    def commit_then_release():
        time.sleep(0.2)
        sig.write_shard(0, np.zeros(4, dtype=np.float32))
        other.release(0)

    threading.Thread(target=commit_then_release).start()
    t0 = time.monotonic()
    assert queue.take() is None and queue.elsewhere == [0]  # committed by its holder: nothing left to do
    assert time.monotonic() - t0 >= 0.15
    queue.claims.close()


class Slow(Stage):
    """Each row's value is its id, after a pause per shard (so two jobs overlap)."""

    def signal(self) -> SignalDesc:
        return SignalDesc("slow", {"v": 1})

    def compute(self, rows):
        time.sleep(0.1)
        return np.asarray(rows["row"], dtype=np.float32)


def test_two_jobs_on_one_store_compute_each_shard_once(tmp_path):
    st = make_store(tmp_path / "s", num_rows=40, shard_rows=4)
    results = []

    def job():
        results.append(run_stage(Slow(), RowIdData(), st, RunnerArgs(scheduler="inline"), progress=False))

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    computed = sorted(s for r in results for s in r.computed)
    assert computed == list(range(10))  # each shard once, by one of the two jobs
    assert all(r.computed for r in results)  # both worked
    for r in results:
        assert sorted(r.computed + r.elsewhere) == list(range(10)) or r.skipped
    assert verify(st).ok and np.array_equal(st.find("slow")[0].read_all(), np.arange(40, dtype=np.float32))
    assert not list((st.find("slow")[0].dir / "claims").glob("*.json"))
