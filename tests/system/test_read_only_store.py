"""A complete store on a read-only file system serves every reader; a run that must write says so first.

The read-only mount is simulated in-process (tests/helpers/read_only.py): every write under the store
fails with EROFS and is recorded, so "readers never write" is checked as "nothing was attempted".
"""

from __future__ import annotations

import errno

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.stage_job import run_stage_job
from store.store import Store
from tests.helpers.read_only import ReadOnlyTree
from tests.helpers.run_fixtures import make_run_dir


@pytest.fixture(scope="module")
def complete_run(tiny_checkpoint, tmp_path_factory):
    """(config, store folder) of the tiny run with `stage all` done."""
    root = tmp_path_factory.mktemp("ro_run")
    cfg = make_run_dir(root, tiny_checkpoint)
    run_stage_job(load_config(cfg, training=False), "all", progress=False)
    return cfg, root / "store"


@pytest.fixture
def read_only(complete_run, monkeypatch):
    cfg, store_root = complete_run
    return cfg, store_root, ReadOnlyTree(store_root).install(monkeypatch)


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_store_commands_read_a_read_only_store(read_only):
    _, store_root, ro = read_only
    for store in sorted(p for p in store_root.iterdir() if p.is_dir()):
        assert Store.open(store).read_only
        for command in ("info", "verify"):
            result = invoke("store", command, str(store))
            assert result.exit_code == 0, result.output
    assert ro.attempts == []


def test_stage_all_on_a_complete_read_only_store_writes_nothing(read_only):
    cfg, _, ro = read_only
    result = invoke("stage", "all", str(cfg))
    assert result.exit_code == 0, result.output
    assert "recomputed_shards=0" in result.stdout
    assert ro.attempts == []


def test_train_without_refresh_reads_a_read_only_store(read_only, tmp_path):
    cfg, _, ro = read_only
    result = invoke("train", str(cfg), f"output_dir={tmp_path / 'out'}", "train_type=select", "component=near",
                    "warmup_step=4", "update_step=4", "max_steps=8", "save_steps=100")
    assert result.exit_code == 0, result.output
    assert "trained 8 steps" in result.stdout
    assert ro.attempts == []


def test_a_run_that_refreshes_a_read_only_store_says_so_before_training(read_only, tmp_path):
    cfg, store_root, ro = read_only
    out = tmp_path / "out"
    result = invoke("train", str(cfg), f"output_dir={out}", "train_type=select", "component=loss",
                    "warmup_step=4", "update_step=4", "max_steps=8")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "read-only" in lines[0]
    assert str(store_root) in lines[0] and "refresh.enabled: false" in lines[0]
    assert not any(out.glob("checkpoint-*")) and ro.attempts == []


def test_a_stage_that_must_compute_on_a_read_only_store_is_one_line(read_only):
    cfg, _, ro = read_only
    result = invoke("stage", "embed", str(cfg), "embed.pooling=mean")  # a new signal: it must be written
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot write to a read-only file system") and "Traceback" not in result.output
    assert ro.attempts and all(p.startswith(str(ro.root)) for _, p in ro.attempts)


def test_a_full_disk_while_a_stage_writes_is_one_line_and_keeps_committed_shards(complete_run, monkeypatch):
    cfg, store_root = complete_run
    ro = ReadOnlyTree(store_root, errno_code=errno.ENOSPC).install(monkeypatch)
    result = invoke("stage", "loss", str(cfg), "loss.batch_size=8")  # same signal key, already complete
    assert result.exit_code == 0, result.output
    result = invoke("stage", "embed", str(cfg), "embed.pooling=mean")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith("error: no space left on the device")
    assert "flexfeed store gc" in result.stderr and ro.attempts


def test_refresh_store_lets_a_run_refresh_over_a_read_only_store(read_only, tmp_path):
    """refresh.store: the run's refreshed copies go to a writable folder; the shared store stays untouched."""
    cfg, store_root, ro = read_only
    out, copies = tmp_path / "out", tmp_path / "run_store"
    result = invoke("train", str(cfg), f"output_dir={out}", "train_type=select", "component=loss",
                    "warmup_step=4", "update_step=4", "max_steps=8", "save_steps=100", f"refresh.store={copies}")
    assert result.exit_code == 0, result.output
    assert "trained 8 steps" in result.stdout and ro.attempts == []
    written = [Store.open(p) for p in copies.iterdir() if p.is_dir()]
    # the train rows' loss copy: its key holds the run, and its store the train set's fingerprint
    assert [s.root.name for s in written] == [p.name for p in store_root.iterdir() if p.is_dir() and
                                              p.name in {w.root.name for w in written}]
    losses = [sig for s in written for sig in s.find("loss")]
    assert losses and all(sig.records() for sig in losses)
