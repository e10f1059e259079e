"""A damaged store: `verify` names every problem, other commands name the file and point to `repair`,
`repair` sets the damage aside (never deletes) so that exactly those shards are recomputed."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from store.errors import DamagedFile, StoreError
from store.layout import QUARANTINE_DIR
from store.maintenance import gc, verify_path
from store.repair import repair
from store.store import Store
from tests.helpers.store_helpers import fill, make_store


def cli(*args: str):
    return CliRunner().invoke(main, ["store", *args])


@pytest.fixture
def store3(tmp_path):
    """Three signals of 3 shards each, all committed."""
    st = make_store(tmp_path / "s", num_rows=10, shard_rows=4)
    sigs = {name: st.signal(name, {"m": 1}, dtype="float16" if name == "emb" else "float32",
                            dim=3 if name == "emb" else None) for name in ("emb", "loss", "grads")}
    for i, sig in enumerate(sigs.values()):
        fill(sig, seed=i, version=2)
    return st, sigs


def _record(sig, shard: int):
    return sig.dir / "commits" / f"{shard:06d}.json"


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", [
    lambda p: os.truncate(p, 60),
    lambda p: p.write_text("{}"),
    lambda p: p.write_bytes(b"\xff\xfe\x00"),
    lambda p: p.write_text("[1, 2]"),
    lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "slot": 7})),
    lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "rows": 3})),
    lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "shard": 2})),
], ids=["truncated-60", "empty-object", "binary", "list", "bad-slot", "wrong-rows", "other-shard"])
def test_a_damaged_commit_record_is_a_verify_finding_and_points_every_other_command_to_repair(store3, damage):
    st, sigs = store3
    path = _record(sigs["loss"], 1)
    damage(path)
    result = cli("verify", str(st.root))
    assert result.exit_code == 1, result.output
    bad = [line for line in result.stderr.splitlines() if line.startswith("bad: ")]
    assert len(bad) == 1 and f"({sigs['loss'].key}) shard 1: damaged commit record" in bad[0] and str(path) in bad[0]
    assert f"flexfeed store repair {st.root}" in result.stderr and "Traceback" not in result.output
    assert "verified 8 shards: 1 bad" in result.stdout  # the other 8 records were checked all the same
    with pytest.raises(DamagedFile) as info:
        Store.open(st.root).get(sigs["loss"].key).records()
    assert info.value.path == path and f"flexfeed store repair {st.root}" in str(info.value)
    assert "__init__" not in str(info.value)  # the missing fields are named, not a Python signature
    result = cli("info", str(st.root))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert str(path) in result.stderr and f"flexfeed store repair {st.root}" in result.stderr
    assert cli("gc", str(st.root)).exit_code == 0  # gc leaves a damaged shard alone and does its work


def test_an_empty_record_names_its_missing_fields(store3):
    st, sigs = store3
    _record(sigs["emb"], 0).write_text('{"shard": 0, "slot": 0}')
    with pytest.raises(DamagedFile, match="lacks rows, version, model, checksum, committed_at, generation"):
        sigs["emb"].record(0)


def _damage_four(sigs) -> Path:
    """A truncated record (emb 0), an empty one (loss 2), a garbled signal header (grads) and flipped shard
    bytes (loss 0, whose record stays intact); returns that shard's data file."""
    os.truncate(_record(sigs["emb"], 0), 60)
    _record(sigs["loss"], 2).write_text("{}")
    (sigs["grads"].dir / "signal.json").write_bytes(b"\x00")
    chunk = sigs["loss"].chunk_path(0, sigs["loss"].record(0).slot)
    chunk.write_bytes(bytes(b ^ 0xFF for b in chunk.read_bytes()))
    return chunk


def test_verify_reports_every_problem_and_never_stops_at_the_first(store3):
    st, sigs = store3
    _damage_four(sigs)
    report = verify_path(st.root)
    assert sorted(p.split(":")[0] for p in report.problems) == sorted([
        f"signal emb ({sigs['emb'].key}) shard 0", f"signal loss ({sigs['loss'].key}) shard 0",
        f"signal loss ({sigs['loss'].key}) shard 2", f"signal {sigs['grads'].key}"])
    assert report.checked == 4  # emb 1, 2 and loss 0, 1: every readable record of a readable signal


def test_repair_quarantines_what_verify_found_and_exactly_those_shards_become_missing(store3):
    st, sigs = store3
    chunk = _damage_four(sigs)
    before = {p: _digest(p) for p in (_record(sigs["emb"], 0), _record(sigs["loss"], 2), chunk,
                                       sigs["grads"].dir / "signal.json", _record(sigs["loss"], 0))}
    result = cli("repair", str(st.root))
    assert result.exit_code == 0, result.output
    assert result.stdout.count("set aside: ") == 4 and "run `flexfeed stage all CONFIG`" in result.stdout
    folders = list((st.root / QUARANTINE_DIR).iterdir())
    assert len(folders) == 1
    q = folders[0]
    for path, digest in before.items():  # moved, never deleted, byte for byte
        assert not path.exists() and _digest(q / path.relative_to(st.root)) == digest
    note = (q / "note.txt").read_text()
    assert "checksum mismatch" in note and "damaged commit record" in note and "unreadable header" in note
    assert cli("verify", str(st.root)).exit_code == 0
    again = Store.open(st.root)
    assert [s.name for s in again.signals()] == ["emb", "loss"]  # grads goes whole: its header said what it was
    assert again.get(sigs["emb"].key).stale_shards() == [0]
    assert again.get(sigs["loss"].key).stale_shards() == [0, 2]
    assert cli("repair", str(st.root)).stdout.strip() == "nothing to repair: verify finds no damage"
    gc(again)
    assert (q / "note.txt").exists()  # gc never touches what repair set aside
    loss = again.get(sigs["loss"].key)
    loss.write_shard(0, np.ones(4, dtype=np.float32), version=5)  # a rerun commits into the freed shard
    assert loss.record(0).generation == 0 and cli("verify", str(st.root)).exit_code == 0


def test_repair_refuses_a_damaged_store_header_and_moves_nothing(store3):
    st, _ = store3
    (st.root / "store.json").write_text('{"format": "flexfeed-store"}')
    result = cli("repair", str(st.root))
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "lacks format_version, dataset_fingerprint, num_rows, shard_rows" in result.stderr
    assert "restore" in result.stderr and not (st.root / QUARANTINE_DIR).exists()


def test_a_store_header_with_missing_fields_names_them_not_a_version_mismatch(store3):
    st, _ = store3
    header = st.root / "store.json"
    meta = json.loads(header.read_text())
    for key in ("format_version", "num_rows", "flexfeed_version"):
        meta.pop(key)
    header.write_text(json.dumps({**meta, "shard_rows": "four"}))
    with pytest.raises(StoreError) as info:
        Store.open(st.root)
    text = str(info.value)
    assert "lacks format_version, num_rows" in text and "shard_rows is 'four', not a positive integer" in text
    assert "written by flexfeed" not in text and "?" not in text
    result = cli("verify", str(st.root))
    assert result.exit_code == 1 and "Traceback" not in result.output
    bad = [line for line in result.stderr.splitlines() if line.startswith("bad: ")]
    assert len(bad) == 2 and "lacks format_version, num_rows" in bad[0] and "shard_rows" in bad[1]


def test_repair_leaves_a_shard_a_live_writer_holds(store3):
    from store.locks import FileLock

    st, sigs = store3
    _record(sigs["loss"], 1).write_text("{}")
    with FileLock(sigs["loss"].lock_path(1)):
        report = repair(st.root)
    assert not report.moved and len(report.busy) == 1 and _record(sigs["loss"], 1).exists()
    result = cli("repair", str(st.root))
    assert result.exit_code == 0 and not _record(sigs["loss"], 1).exists()
