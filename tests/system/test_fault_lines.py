"""A line where a traceback or a useless success used to be: Ctrl-C, a full disk while training, data that
trains nothing, an index summary of "0 rows", an empty signal left by a failed stage."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config
from stages.args import RunnerArgs
from stages.base import SignalDesc, Stage
from stages.runner import run_stage
from store.maintenance import verify
from store.store import Store
from tests.helpers.run_fixtures import make_run_dir
from tests.helpers.store_helpers import FINGERPRINT, REPO, child_env, make_store

SOAK_STAGE = REPO / "tests" / "helpers" / "soak_stage.py"


@pytest.fixture(scope="module")
def run_dir(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return make_run_dir(root, tiny_checkpoint), root


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_ctrl_c_during_stage_all_is_one_line_exit_130_and_keeps_committed_shards(run_dir, tmp_path):
    cfg, _ = run_dir
    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, str(SOAK_STAGE), "0.3", "stage", "all", str(cfg), "shard_rows=4",
                             f"store={store}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), cwd=REPO)
    deadline = time.monotonic() + 180
    while not list(store.glob("*/signals/*/commits/*.json")):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted; committed shards are kept, rerun to continue"
    assert "Traceback" not in err
    for folder in store.iterdir():
        assert verify(Store.open(folder)).ok


def test_a_full_disk_while_training_is_one_line(run_dir, tmp_path, monkeypatch):
    from transformers import Trainer

    cfg, _ = run_dir
    out = tmp_path / "out"

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "checkpoint-2" / "model.safetensors"))

    monkeypatch.setattr(Trainer, "_save_checkpoint", full)
    result = invoke("train", str(cfg), f"output_dir={out}", "max_steps=2", "save_steps=2")
    assert result.exit_code == 2 and "Traceback" not in result.output
    line = result.stderr.strip().splitlines()[-1]
    line = line[line.index("error: "):]  # after the training progress bar, which ends without a newline
    assert line.startswith(f"error: no space left on the device writing {out / 'checkpoint-2'}")


def test_a_cutoff_len_that_cuts_every_answer_is_refused_before_any_work(run_dir, tmp_path):
    cfg, _ = run_dir
    result = invoke("stage", "all", str(cfg), "cutoff_len=1", f"store={tmp_path / 'store'}")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no training row keeps a trained token")
    assert "cutoff_len 1" in lines[0] and "raise cutoff_len" in lines[0]
    assert not list((tmp_path / "store").glob("*/signals/*"))


def test_stage_all_says_what_the_index_did_never_0_rows(run_dir, tmp_path):
    cfg, _ = run_dir
    store = f"store={tmp_path / 'store'}"
    first = invoke("stage", "all", str(cfg), store)
    assert first.exit_code == 0, first.output
    assert "(0 rows)" not in first.stdout
    assert "index:embed: built flat index over 64 rows" in first.stdout
    again = invoke("stage", "all", str(cfg), store)
    assert "index:embed: index up to date, reused" in again.stdout and "recomputed_shards=0" in again.stdout


class Failing(Stage):
    """A stage whose every shard fails (a model that cannot load, a bug in the producer)."""

    def signal(self) -> SignalDesc:
        return SignalDesc("doomed", {"v": 1})

    def compute(self, rows):
        raise RuntimeError("boom")


class Rows:
    fingerprint = FINGERPRINT

    def rows(self, start, stop):
        return {"input_ids": [[1]] * (stop - start)}


def test_a_stage_that_fails_before_its_first_commit_leaves_no_empty_signal(tmp_path):
    st = make_store(tmp_path / "s", num_rows=10, shard_rows=4)
    with pytest.raises(RuntimeError, match="boom"):
        run_stage(Failing(), Rows(), st, RunnerArgs(scheduler="inline"), progress=False)
    assert st.find("doomed") == [] and verify(st).ok
    # one that committed a shard before failing keeps it
    sig = st.signal("doomed", {"v": 1})
    sig.write_shard(0, np.zeros(4, dtype=np.float32))
    with pytest.raises(RuntimeError, match="boom"):
        run_stage(Failing(), Rows(), st, RunnerArgs(scheduler="inline"), progress=False)
    assert [s.committed_shards() for s in st.find("doomed")] == [[0]]
def test_resume_from_checkpoint_true_means_the_last_checkpoint(run_dir, tmp_path):
    cfg, _ = run_dir
    out = tmp_path / "out"
    assert invoke("train", str(cfg), f"output_dir={out}", "max_steps=4", "save_steps=2").exit_code == 0
    loaded = load_config(cfg, [f"output_dir={out}", "max_steps=6", "resume_from_checkpoint=true"])
    assert loaded.training["resume_from_checkpoint"] is True
    result = invoke("train", str(cfg), f"output_dir={out}", "max_steps=6", "save_steps=2", "resume_from_checkpoint=true")
    assert result.exit_code == 0, result.output
    assert "trained 6 steps" in result.stdout
