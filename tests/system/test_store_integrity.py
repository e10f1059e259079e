"""Reads verify what they read: a committed shard whose bytes changed on disk (a NaN written over it, a flipped
byte) is an error naming it and `store repair` for every reader, is recomputed by `stage all` instead of being
counted as reused, and by a live (refreshing) route; it is hashed once per process, not at every read."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.stage_job import run_stage_job
from stages.args import RunnerArgs
from stages.base import SignalDesc, Stage
from stages.runner import run_stage
from store import integrity
from store.errors import CorruptShard
from store.maintenance import verify
from store.store import Store
from tests.helpers.run_fixtures import make_run_dir
from tests.helpers.store_helpers import RowIdData, fill, make_store


def damage(sig, shard: int, row: int = 0) -> None:
    """Write NaN over one value of a committed shard, in place (its commit record, checksum included, unchanged)."""
    rec = sig.record(shard)
    path = sig.chunk_path(shard, rec.slot)
    width = int(np.prod(sig.meta.row_shape)) * sig.dtype.itemsize
    with open(path, "r+b") as fh:
        fh.seek(row * width)
        fh.write(np.full(1, np.nan, dtype=sig.dtype).tobytes())
    st = os.stat(path)  # a rewrite lands a clock tick later: make that certain, whatever the timer's grain
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**7))


@pytest.fixture
def sig(tmp_path):
    st = make_store(tmp_path / "s", num_rows=10, shard_rows=4)
    signal = st.signal("emb", {"m": 1}, dim=3)
    return signal, fill(signal, seed=1)


def test_every_read_refuses_a_shard_overwritten_with_nan_naming_it_and_repair(sig):
    signal, full = sig
    damage(signal, 1, row=2)
    reads = {"read_all": signal.read_all, "read_shard": lambda: signal.read_shard(1),
             "read_rows": lambda: signal.read_rows([0, 6]), "iter_shards": lambda: list(signal.iter_shards())}
    for name, read in reads.items():
        with pytest.raises(CorruptShard) as exc:
            read()
        text = str(exc.value)
        assert "\n" not in text, name
        assert f"shard 1 of signal 'emb' ({signal.key})" in text and "non-finite value in row 2" in text, name
        assert f"flexfeed store repair {signal.dir.parents[1]}" in text and "stage all" in text, name
    assert np.array_equal(signal.read_shard(0), full[:4])  # the other shards read as ever
    assert signal.damaged_shards() == {1: pytest.approx(signal.damaged_shards()[1])}
    assert [f.shard for f in verify(Store.open(signal.dir.parents[1])).findings] == [1]


def test_a_flipped_byte_is_caught_too(sig):
    signal, _ = sig
    path = signal.chunk_path(2, signal.record(2).slot)
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShard, match="checksum mismatch"):
        signal.read_shard(2)


def test_a_shard_is_hashed_at_its_first_read_in_a_process_not_at_every_read(sig, monkeypatch):
    signal, _ = sig
    calls = []
    real = integrity.mismatch
    monkeypatch.setattr(integrity, "mismatch", lambda rec, values: calls.append(rec.shard) or real(rec, values))
    signal.read_all()
    assert calls == []  # this process wrote them: it knows their bytes
    integrity.forget_all()  # as in a new process
    signal.read_all()
    signal.read_all()
    signal.read_rows([1, 9])
    assert sorted(calls) == [0, 1, 2]
    damage(signal, 0)  # changed after it was checked: its new mtime makes the next read hash it again
    with pytest.raises(CorruptShard):
        signal.read_shard(0)


def test_records_written_before_the_fast_checksum_are_checked_with_blake2b(sig):
    signal, full = sig
    for shard in range(signal.num_shards):
        path = signal.dir / "commits" / f"{shard:06d}.json"
        record = json.loads(path.read_text())
        del record["fast_checksum"]
        path.write_text(json.dumps(record))
    integrity.forget_all()
    assert np.array_equal(signal.read_all(), full)
    damage(signal, 2)
    with pytest.raises(CorruptShard, match="shard 2 .* non-finite value in row 0"):
        signal.read_all()


class RowIds(Stage):
    """A deterministic stage: each row's value is its id (so a recomputed shard is checkable)."""

    def signal(self) -> SignalDesc:
        return SignalDesc("ids", {"v": 1})

    def compute(self, rows):
        return np.asarray(rows["row"], dtype=np.float32)


def test_run_stage_recomputes_a_damaged_shard_instead_of_counting_it_reused(tmp_path):
    st = make_store(tmp_path / "s", num_rows=10, shard_rows=4)
    first = run_stage(RowIds(), RowIdData(), st, RunnerArgs(scheduler="inline"), progress=False)
    assert first.computed == [0, 1, 2]
    sig = st.find("ids")[0]
    damage(sig, 1)
    integrity.forget_all()  # a new `stage all` process
    again = run_stage(RowIds(), RowIdData(), st, RunnerArgs(scheduler="inline"), progress=False)
    assert again.computed == [1] and again.damaged == [1] and again.skipped == 2
    assert "1 of them committed but damaged: 1" in again.summary()
    assert np.array_equal(sig.read_all(), np.arange(10, dtype=np.float32)) and verify(st).ok


@pytest.fixture(scope="module")
def staged(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity_run")
    cfg = make_run_dir(root, tiny_checkpoint)
    run_stage_job(load_config(cfg, [f"store={root / 'store'}", "train_type=select", "component=less"],
                              training=False), "all", progress=False)
    return cfg, root


def _train_grads(root):
    (train_store,) = [Store.open(p) for p in sorted((root / "store").iterdir())
                      if Store.open(p).meta.num_rows == 64]
    (grads,) = train_store.find("grads_sgd")  # grad_type sgd: the train rows' signal is grads_sgd too
    return train_store, grads


def test_train_with_less_refuses_a_damaged_gradient_shard_and_stage_all_recomputes_it(staged, tmp_path):
    cfg, root = staged
    train_store, grads = _train_grads(root)
    damage(grads, 2)
    args = ["train", str(cfg), f"output_dir={tmp_path / 'out'}", "train_type=select", "component=less",
            "warmup_step=4", "update_step=4", "max_steps=8", "save_steps=100", "refresh.enabled=false"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    line = line[line.index("error: "):]  # after the training progress bar, which ends without a newline
    assert line.startswith("error: shard 2 of signal 'grads_sgd'") and grads.key in line
    assert f"flexfeed store repair {train_store.root}" in line and "Traceback" not in result.output
    again = CliRunner().invoke(main, ["stage", "all", str(cfg), "train_type=select", "component=less"])
    assert again.exit_code == 0, again.output
    assert "recomputed_shards=1" in again.stdout and "committed but damaged: 2" in again.stdout
    assert verify(train_store).ok
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output


def test_a_refreshing_run_computes_a_damaged_offline_shard_live(staged, tmp_path):
    cfg, root = staged
    train_store, grads = _train_grads(root)
    damage(grads, 1)  # the offline twin the run's copy starts from: that shard is computed live instead
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["train", str(cfg), f"output_dir={out}", "train_type=select",
                                       "component=less", "warmup_step=4", "update_step=4", "max_steps=8",
                                       "save_steps=100", "refresh.max_staleness=100"])
    assert result.exit_code == 0, result.output
    decisions = [d for d in map(json.loads, (out / "flexfeed_decisions.jsonl").read_text().splitlines())
                 if d.get("decision")]
    first = decisions[0]["signals"]["grads/train"][0]
    assert first["source"] == "live" and first["shards"] == first["of"] and first["versions"] == [0, 4]
    assert decisions[0]["refresh"]["grads/train"]["stale"] == 1


def test_a_live_refresh_recomputes_a_damaged_shard_of_the_runs_copy(tmp_path, monkeypatch):
    from pipeline.refresh import Refresher, run_signal

    st = make_store(tmp_path / "s", num_rows=10, shard_rows=4)
    recomputed = []

    def recompute(self, stage, data, sig, shards, step, state):
        recomputed.append(list(shards))
        for shard in shards:
            start, stop = sig.shard_range(shard)
            sig.write_shard(shard, np.arange(start, stop, dtype=np.float32), version=step)

    monkeypatch.setattr(Refresher, "_recompute", recompute)
    monkeypatch.setattr(Refresher, "_state_for", lambda self, stage: {})
    refresher = Refresher(model=None, tokenizer=None, max_staleness=100, run_id="r1")
    refresher.refresh(RowIds(), RowIdData(), st, step=0)
    damage(run_signal(RowIds(), st, "r1"), 2)
    integrity.forget_all()
    info, sig = refresher.refresh(RowIds(), RowIdData(), st, step=4)
    assert recomputed == [[0, 1, 2], [2]] and info["stale"] == 1
    assert np.array_equal(sig.read_all(), np.arange(10, dtype=np.float32))
