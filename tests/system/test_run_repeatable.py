"""A fresh run is the same run whatever earlier runs left in the store.

A refreshing run writes its live signals into its own copy in the store. The copy is keyed by a random run
id (pipeline/decision_context.new_run_id), saved in checkpoints so that a resumed run continues with it
(tests/system/test_soak.py checks resumed batches). A fresh run gets a new id, so it starts from an empty
copy, seeded from the offline signal like every other fresh run.

Were the copy keyed by the output folder (issue 20: `make demo` selected the target domain at 94 % under
`less`, and at 83 % when the same command ran again), a rerun into the same folder would find the first
run's copy: its shards computed at step 8 count as newer than the rerun's step 4, so the rerun recomputes
them at step 4 with the live model, where a fresh run reads the offline values of step 0, and ranks other
values. The last test runs exactly that variant and shows the decisions differ.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import pipeline.train as train_module
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.stage_job import run_stage_job
from tests.helpers.run_fixtures import make_run_dir

# decisions at steps 4 and 8; the offline values (step 0) serve step 4 (4 <= 5 steps old), step 8 recomputes
RUN = ["train_type=select", "component=less", "warmup_step=4", "update_step=4", "max_steps=12", "save_steps=100",
       "refresh.max_staleness=5"]


@pytest.fixture(scope="module")
def staged(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("repeat_run")
    cfg = make_run_dir(root, tiny_checkpoint)
    run_stage_job(load_config(cfg, RUN, training=False), "all", progress=False)
    return cfg, root


def _without(obj, drop=("seconds", "key")):
    """A decision record without what differs between identical runs: timings and the run copy's key."""
    if isinstance(obj, dict):
        return {k: _without(v, drop) for k, v in obj.items() if k not in drop}
    if isinstance(obj, list):
        return [_without(v, drop) for v in obj]
    return obj


def train(cfg, out, monkeypatch, run_id=None) -> tuple[list[dict], list[list[int]]]:
    """One fresh run into ``out``: its decisions and the row ids of every training batch."""
    from tests.helpers import soak_train

    rows = out.parent / f"{out.name}-{len(list(out.parent.glob(f'{out.name}-*.rows')))}.rows"
    from pipeline.trainer import FlexfeedTrainer

    monkeypatch.setattr(FlexfeedTrainer, "compute_loss", FlexfeedTrainer.compute_loss)
    soak_train.record_batches(str(rows))
    if run_id is not None:
        monkeypatch.setattr(train_module, "new_run_id", lambda: run_id)
    (out / "flexfeed_decisions.jsonl").unlink(missing_ok=True)
    result = CliRunner().invoke(main, ["train", str(cfg), f"output_dir={out}", *RUN])
    assert result.exit_code == 0, result.output
    decisions = [d for d in map(json.loads, (out / "flexfeed_decisions.jsonl").read_text().splitlines())
                 if d.get("decision")]
    batches = [json.loads(line) for line in rows.read_text().splitlines()]
    return [_without(d) for d in decisions], batches


def test_a_fresh_run_decides_the_same_whatever_earlier_runs_left_in_the_store(staged, tmp_path, monkeypatch):
    cfg, _ = staged
    first = train(cfg, tmp_path / "out1", monkeypatch)
    second = train(cfg, tmp_path / "out2", monkeypatch)  # another folder, after the first run's copy exists
    again = train(cfg, tmp_path / "out1", monkeypatch)  # the same command again, into the same folder
    decisions, batches = first
    assert [d["step"] for d in decisions] == [4, 8]
    assert decisions[0]["refresh"]["grads/train"]["stale"] == 0  # step 4 reads the offline values of step 0
    assert decisions[1]["refresh"]["grads/train"]["stale"] > 0  # step 8 recomputes them
    assert second == first and again == first  # decisions (rows per domain, scores, versions) and every batch


def test_keyed_by_its_output_folder_the_rerun_would_decide_differently(staged, tmp_path, monkeypatch):
    cfg, _ = staged
    out = tmp_path / "out"
    first = train(cfg, out, monkeypatch, run_id="keyed-by-" + out.name)
    again = train(cfg, out, monkeypatch, run_id="keyed-by-" + out.name)
    assert again[0][0]["refresh"]["grads/train"]["stale"] > 0  # the first run's step-8 shards, "newer" than 4
    assert again[0][0]["signals"] != first[0][0]["signals"]  # computed at step 4, not the offline step 0
    assert again[0] != first[0]  # so the test above would fail
    assert again[1] != first[1]  # and it trains other rows (8 of the 12 batches differ, measured)


def test_store_gc_drops_the_copies_of_finished_runs_only_when_asked(staged, tmp_path, monkeypatch):
    from store.maintenance import gc, verify
    from store.runs import finished_runs, run_of
    from store.store import Store

    cfg, root = staged
    train(cfg, tmp_path / "out", monkeypatch)
    stores = [Store.open(p) for p in sorted((root / "store").iterdir()) if p.is_dir()]
    copies = {st.root: [s.key for s in st.signals() if run_of(s)] for st in stores}
    assert all(copies.values()) and all(finished_runs(st) for st in stores)
    # what stays: offline signals, and copies of runs that never marked themselves finished (the variant above)
    kept = {st.root: [s.key for s in st.signals() if run_of(s) not in finished_runs(st)] for st in stores}
    for st in stores:
        gc(st)
        assert [s.key for s in st.signals() if run_of(s)] == copies[st.root]  # plain gc keeps committed data
    result = CliRunner().invoke(main, ["store", "gc", "--finished-runs", str(stores[0].root)])
    assert result.exit_code == 0, result.output
    for st in stores[1:]:
        gc(st, drop_finished_runs=True)
    for st in stores:
        assert [s.key for s in st.signals()] == kept[st.root] and not finished_runs(st) and verify(st).ok
