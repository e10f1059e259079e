"""Crash soak: writers, stage runs and training runs killed with SIGKILL at random moments, many times.

After every kill: the store opens, `verify` is clean, every committed shard holds exactly what its
producer meant for it, nothing a writer reported as committed is lost, and the next run completes
the rest with results identical to an uninterrupted run.

Most kills hit children forked from a forkserver (they start in milliseconds, so many kills fit in
the default run); a few hit freshly started interpreters running the real scripts and CLI. `FLEXFEED_SOAK=1` raises
the counts (see docs/hardening.md).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from store.maintenance import gc, verify
from store.store import Store
from tests.helpers.soak_stage import slow_loss_run
from tests.helpers.soak_store_writer import open_signals, run_child, soak_values, write_loop
from tests.helpers.store_helpers import child_env, make_store

pytestmark = pytest.mark.multiproc

SOAK = os.environ.get("FLEXFEED_SOAK") == "1"
REPO = Path(__file__).resolve().parents[2]
HELPERS = REPO / "tests" / "helpers"  # the child scripts
FOREVER = 10**6  # a generation target no killed writer reaches


# --------------------------------------------------------------------------- child processes
_CTX = None


def _context():
    """A forkserver whose server imported the heavy modules once: children start in milliseconds,
    from a process that never ran torch (forking the test process itself can deadlock in a child)."""
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["numpy", "zarr", "torch", "transformers", "store.store", "stages.loss",
                                     "stages.runner", "tests.helpers.soak_store_writer", "tests.helpers.soak_stage"])
    return _CTX


_LIVE: list = []


@pytest.fixture(autouse=True)
def _no_child_outlives_its_test():
    yield
    while _LIVE:
        child = _LIVE.pop()
        if child.status is None and child.alive():
            child.kill()


class Child:
    """A child process (forkserver or a fresh interpreter) writing one line per event to a file."""

    def __init__(self, out_path: Path, process=None, proc: subprocess.Popen | None = None):
        self.out_path, self.process, self.proc = Path(out_path), process, proc
        self.status: int | None = None
        _LIVE.append(self)

    @classmethod
    def start(cls, out_path, target, *args) -> Child:
        Path(out_path).write_text("")
        process = _context().Process(target=run_child, args=(target, args, str(out_path)), daemon=True)
        process.start()
        return cls(out_path, process=process)

    @classmethod
    def spawn(cls, out_path, *argv: str) -> Child:
        with open(out_path, "w") as out, open(f"{out_path}.err", "w") as err:
            proc = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=err, env=child_env(), cwd=REPO)
        return cls(out_path, proc=proc)

    def errors(self) -> str:
        err = Path(f"{self.out_path}.err")
        return err.read_text()[-3000:] if err.exists() else ""

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else self.process.pid

    def alive(self) -> bool:
        return self.proc.poll() is None if self.proc is not None else self.process.is_alive()

    @property
    def lines(self) -> list[str]:
        text = self.out_path.read_text() if self.out_path.exists() else ""
        return text.split("\n")[:-1]  # a line the kill cut short has no newline yet

    def wait_lines(self, n: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.lines) < n and self.alive():
            assert time.monotonic() < deadline, f"child printed {len(self.lines)} of {n} lines in {timeout_s} s"
            time.sleep(0.005)

    def kill(self) -> bool:
        """SIGKILL the child; True when it was still running (really killed)."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.wait() == -signal.SIGKILL

    def wait(self, timeout_s: float = 300.0) -> int:
        if self.proc is not None:
            try:
                self.status = self.proc.wait(timeout_s)
            finally:
                self.proc.kill()
                self.proc.wait()
        else:
            self.process.join(timeout_s)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
                raise AssertionError(f"child did not finish in {timeout_s} s")
            self.status = self.process.exitcode
        return self.status


# --------------------------------------------------------------------------- store writer soak
def _check_store_after_kill(root, acknowledged: dict) -> tuple[int, int]:
    """Verify clean and every committed shard exact; returns (#committed, #acknowledged commits lost)."""
    report = verify(Store.open(root))
    assert report.ok, report.problems
    committed = lost = 0
    for sig in open_signals(root):
        for shard, rec in sig.records().items():
            np.testing.assert_array_equal(sig.read_shard(shard), soak_values(sig, shard, rec.generation))
            assert rec.version == rec.generation
            committed += 1
        for (name, shard), gen in acknowledged.items():
            if name == sig.name:
                rec = sig.record(shard)
                lost += rec is None or rec.generation < gen
    return committed, lost


def _debris(root) -> int:
    """Uncommitted slots and temp files: what a kill in mid-write leaves for gc."""
    n = sum(1 for p in Path(root).rglob("*") if p.name.endswith((".tmp", ".partial")))
    for sig in open_signals(root):
        recs = sig.records()
        for shard in range(sig.num_shards):
            for slot in (0, 1):
                if sig.chunk_path(shard, slot).exists() and (shard not in recs or recs[shard].slot != slot):
                    n += 1
    return n


def _soak_store(tmp_path, kills: int, spawned: bool, seed: int) -> dict:
    st = make_store(tmp_path / "s", num_rows=45, shard_rows=8)  # 6 shards, the last one of 5 rows
    open_signals(st.root)
    rng = random.Random(seed)
    acknowledged: dict[tuple[str, int], int] = {}
    stats = {"kills": 0, "mid_write": 0, "acknowledged": 0, "lost": 0, "gc_runs": 0}
    t0 = time.monotonic()
    for _ in range(kills):
        pause = rng.choice([0.0, 0.0, 0.005, 0.02])
        if spawned:
            child = Child.spawn(tmp_path / f"out{stats['kills']}.txt", str(HELPERS / "soak_store_writer.py"),
                                str(st.root), str(FOREVER), str(pause))
            child.wait_lines(1, timeout_s=120)  # past the interpreter's start-up
        else:
            child = Child.start(tmp_path / f"out{stats['kills']}.txt", write_loop, st.root, FOREVER, pause)
        child.wait_lines(rng.randint(0, 3))
        time.sleep(rng.uniform(0.0, 0.04))
        assert child.kill(), "the writer ended before it was killed"
        stats["kills"] += 1
        for line in child.lines:
            name, shard, gen = line.split()
            key = (name, int(shard))
            acknowledged[key] = max(acknowledged.get(key, -1), int(gen))
            stats["acknowledged"] += 1
        stats["mid_write"] += _debris(st.root) > 0
        stats["lost"] += _check_store_after_kill(st.root, acknowledged)[1]
        if rng.random() < 0.3:  # gc between crashes never touches committed data
            gc(Store.open(st.root))
            stats["gc_runs"] += 1
            assert _debris(st.root) == 0
            stats["lost"] += _check_store_after_kill(st.root, acknowledged)[1]
        assert stats["lost"] == 0, stats
    # the next run completes the rest
    target = max(acknowledged.values(), default=0) + 1
    child = Child.start(tmp_path / "final.txt", write_loop, st.root, target, 0.0)
    assert child.wait() == 0
    committed, lost = _check_store_after_kill(st.root, acknowledged)
    assert lost == 0
    sigs = open_signals(st.root)
    assert committed == sum(s.num_shards for s in sigs)
    assert all(r.generation == target for s in sigs for r in s.records().values())
    gc(Store.open(st.root))
    assert _debris(st.root) == 0 and verify(Store.open(st.root)).ok
    stats["seconds"] = round(time.monotonic() - t0, 1)
    return stats


def test_store_writer_killed_at_random_moments_loses_nothing(tmp_path):
    stats = _soak_store(tmp_path, kills=250 if SOAK else 40, spawned=False, seed=1)
    print("store soak (forkserver writers):", stats)
    assert stats["kills"] == (250 if SOAK else 40)
    assert stats["mid_write"] >= 1  # some kills really landed inside a write
    assert stats["lost"] == 0


def test_spawned_writer_script_killed_at_random_moments(tmp_path):
    stats = _soak_store(tmp_path, kills=25 if SOAK else 4, spawned=True, seed=2)
    print("store soak (spawned writers):", stats)
    assert stats["kills"] == (25 if SOAK else 4)


# --------------------------------------------------------------------------- stage runs
@pytest.fixture(scope="module")
def run_dir(tiny_checkpoint, tmp_path_factory):
    from tests.helpers.run_fixtures import make_run_dir

    root = tmp_path_factory.mktemp("soak_run")
    return make_run_dir(root, tiny_checkpoint), root


@pytest.fixture(scope="module")
def loss_setup(run_dir):
    from stages.args import DataArgs, LossArgs, ModelArgs, RunnerArgs
    from stages.data import load_data
    from stages.loss import LossStage
    from stages.models import load_tokenizer
    from stages.runner import run_stage

    _, root = run_dir
    margs = ModelArgs(model_name_or_path=str(root / "model"), finetuning_type="lora", attn_implementation="eager")
    data = load_data(DataArgs(dataset=["a", "b"], dataset_dir=str(root / "data"), cutoff_len=48),
                     load_tokenizer(margs))
    clean = Store.create(root / "clean_loss", dataset_fingerprint=data.fingerprint, num_rows=len(data), shard_rows=4)
    result = run_stage(LossStage(margs, LossArgs(batch_size=4)), data, clean, RunnerArgs(scheduler="inline"),
                       progress=False)
    return margs, data, clean.get(result.key).read_all()


def _committed(store_path) -> dict[int, object]:
    if not (Path(store_path) / "store.json").exists():
        return {}
    sigs = Store.open(store_path).find("loss")
    return sigs[0].records() if sigs else {}


def test_stage_run_killed_at_random_moments_resumes_identically(loss_setup, tmp_path):
    margs, data, reference = loss_setup
    path = tmp_path / "killed"
    rng = random.Random(3)
    kills = 12 if SOAK else 4
    num_shards = -(-len(data) // 4)
    killed, landed_between = 0, 0
    for _ in range(kills):
        before = set(_committed(path))
        if len(before) >= num_shards - 1:
            break
        child = Child.start(tmp_path / f"out{killed}.txt", slow_loss_run, margs, data, path, 4, 0.08)
        # a random moment: after some more commits (or none), then a random part of a shard's time
        want = len(before) + rng.randint(0, 2)
        deadline = time.monotonic() + 120
        while len(_committed(path)) < want and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))
        if not child.kill():
            break
        killed += 1
        after = _committed(path)
        assert before <= set(after), "a committed shard disappeared"
        landed_between += len(after) > len(before)
        if not after:
            continue  # killed before its first commit (loading the model, creating the store)
        assert verify(Store.open(path)).ok
        sig = Store.open(path).find("loss")[0]
        for shard in after:
            start, stop = sig.shard_range(shard)
            np.testing.assert_array_equal(sig.read_shard(shard), reference[start:stop])
    assert killed >= min(kills, 3)
    done = set(_committed(path))
    assert len(done) < num_shards
    rerun = Child.start(tmp_path / "rerun.txt", slow_loss_run, margs, data, path, 4, 0.0)
    assert rerun.wait() == 0
    out = json.loads(rerun.lines[-1])
    assert set(out["computed"]) == set(range(num_shards)) - done  # exactly the rest
    final = Store.open(path)
    np.testing.assert_array_equal(final.get(out["key"]).read_all(), reference)
    gc(final)
    assert verify(final).ok
    np.testing.assert_array_equal(final.get(out["key"]).read_all(), reference)
    print(f"stage soak: {killed} kills, {landed_between} after new commits, {len(done)}/{num_shards} shards kept")


def _loss_store(root: Path) -> Path:
    """The store (one per dataset fingerprint under `store:`) that holds the train rows' loss signal."""
    (found,) = [d for d in root.iterdir() if (d / "store.json").exists() and Store.open(d).find("loss")]
    return found


def test_flexfeed_stage_cli_killed_then_rerun_matches_an_uninterrupted_run(run_dir, tmp_path):
    from pipeline.cli import main

    cfg, _ = run_dir
    rng = random.Random(4)
    stores = {"killed": tmp_path / "killed", "clean": tmp_path / "clean"}
    child = Child.spawn(tmp_path / "cli.txt", str(HELPERS / "soak_stage.py"), "0.25", "stage", "loss", str(cfg),
                        "shard_rows=4", f"store={stores['killed']}")
    deadline = time.monotonic() + 180
    while not list(stores["killed"].glob("*/signals/*/commits/*.json")):
        assert time.monotonic() < deadline and child.proc.poll() is None, child.errors()
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 1.0))
    assert child.kill()
    store_dir = _loss_store(stores["killed"])
    done = set(_committed(store_dir))
    assert 1 <= len(done) < 16
    assert verify(Store.open(store_dir)).ok
    runner = CliRunner()
    again = runner.invoke(main, ["stage", "loss", str(cfg), "shard_rows=4", f"store={stores['killed']}"])
    assert again.exit_code == 0, again.output
    assert f"recomputed_shards={16 - len(done)}" in again.output
    clean = runner.invoke(main, ["stage", "loss", str(cfg), "shard_rows=4", f"store={stores['clean']}"])
    assert clean.exit_code == 0, clean.output
    a, b = (Store.open(_loss_store(stores[k])).find("loss")[0] for k in ("killed", "clean"))
    assert a.key == b.key
    np.testing.assert_array_equal(a.read_all(), b.read_all())


# --------------------------------------------------------------------------- training
COMMON = ["train_type=select", "component=loss", "warmup_step=2", "update_step=3", "save_steps=5",
          "refresh.max_staleness=2"]


def _batches(path: Path) -> list[list[int]]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line torn by the kill
    return out


def _record_in_process(monkeypatch, rows_file: Path) -> None:
    from pipeline.trainer import FlexfeedTrainer
    from tests.helpers import soak_train

    monkeypatch.setattr(FlexfeedTrainer, "compute_loss", FlexfeedTrainer.compute_loss)
    soak_train.record_batches(str(rows_file))


def test_flexfeed_train_killed_after_a_checkpoint_resumes_with_identical_batches(run_dir, tmp_path, monkeypatch):
    from pipeline.config import load_config
    from pipeline.stage_job import run_stage_job
    from pipeline.train import train

    cfg, _ = run_dir
    run_stage_job(load_config(cfg), "loss", progress=False)
    _record_in_process(monkeypatch, tmp_path / "full.jsonl")
    train(load_config(cfg, [f"output_dir={tmp_path / 'full'}", *COMMON]))
    full = _batches(tmp_path / "full.jsonl")
    assert len(full) == 12
    rng = random.Random(5)
    cycles = 3 if SOAK else 1
    resumed_from = []
    for cycle in range(cycles):
        out, rows_file = tmp_path / f"cut{cycle}", tmp_path / f"cut{cycle}.jsonl"
        child = Child.spawn(tmp_path / f"train{cycle}.txt", str(HELPERS / "soak_train.py"), str(rows_file), "0.3", str(cfg), f"output_dir={out}",
                            *COMMON)
        first = out / "checkpoint-5" / "flexfeed_state.json"
        deadline = time.monotonic() + 240
        while not first.exists():
            assert time.monotonic() < deadline and child.proc.poll() is None, child.errors()
            time.sleep(0.02)
        # a random moment after the first checkpoint: mid-step, or while checkpoint-10 is written
        time.sleep(rng.uniform(0.0, 1.6))
        assert child.kill(), "training ended before the kill"
        seen = _batches(rows_file)
        assert len(seen) >= 5 and seen == full[: len(seen)]  # the killed run trained the same batches
        # resume from the newest checkpoint whose flexfeed state is complete (a torn one is skipped)
        step = max(int(p.parent.name.split("-")[1]) for p in out.glob("checkpoint-*/flexfeed_state.json"))
        resumed_from.append(step)
        monkeypatch.undo()
        _record_in_process(monkeypatch, tmp_path / f"resumed{cycle}.jsonl")
        train(load_config(cfg, [f"output_dir={out}", *COMMON, f"resume_from_checkpoint={out / f'checkpoint-{step}'}"]))
        assert _batches(tmp_path / f"resumed{cycle}.jsonl") == full[step:]
        a = json.loads((tmp_path / "full" / "flexfeed_state.json").read_text())
        b = json.loads((out / "flexfeed_state.json").read_text())
        assert a["strategy"] == b["strategy"]
        assert [d["per_domain"] for d in a["decisions"]] == [d["per_domain"] for d in b["decisions"]]
    print(f"train soak: {cycles} kills, resumed from checkpoints {resumed_from}")
