"""`flexfeed store info|verify|gc` through click, as a user runs them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from tests.helpers.store_helpers import fill, make_store


@pytest.fixture
def store_dir(tmp_path):
    st = make_store(tmp_path / "s", num_rows=10, shard_rows=4)
    fill(st.signal("emb", {"m": 1}, dtype="float16", dim=3), version=2)
    fill(st.signal("loss", {"m": 1}), version=5)
    return st


def run(*args: str):
    return CliRunner().invoke(main, ["store", *args])


def test_info_table_and_json(store_dir):
    result = run("info", str(store_dir.root))
    assert result.exit_code == 0, result.output
    for text in ("emb", "loss", "float16", "3/3", "10 rows in 3 shards of 4", "format 2"):
        assert text in result.output
    result = run("info", str(store_dir.root), "--json", "--step", "6", "--max-staleness", "2")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    by_name = {s["name"]: s for s in data["signals"]}
    assert by_name["emb"]["shards_stale"] == 3 and by_name["loss"]["shards_stale"] == 0
    assert by_name["emb"]["versions"] == [2] and data["num_rows"] == 10


def test_verify_ok_then_exit_1_naming_the_bad_shard(store_dir):
    result = run("verify", str(store_dir.root))
    assert result.exit_code == 0, result.output
    assert "verified 6 shards: ok" in result.stdout
    emb = store_dir.find("emb")[0]
    chunk = emb.chunk_path(2, emb.record(2).slot)
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0x01
    chunk.write_bytes(bytes(data))
    result = run("verify", str(store_dir.root))
    assert result.exit_code == 1
    assert f"bad: signal emb ({emb.key}) shard 2: checksum mismatch" in result.stderr
    assert "verified 6 shards: 1 bad" in result.stdout


def test_gc_reports_what_it_freed(store_dir):
    loss = store_dir.find("loss")[0]
    loss.array[1, 1 - loss.record(1).slot] = np.ones(4, dtype=np.float32)
    (loss.dir / "commits" / ".000001.json.x1.tmp").write_bytes(b"y" * 100)
    result = run("gc", str(store_dir.root))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "removed 2 items, freed 116 B"
    assert run("gc", str(store_dir.root)).stdout.strip() == "removed 0 items, freed 0 B"
    assert run("verify", str(store_dir.root)).exit_code == 0


@pytest.mark.parametrize("command", ["info", "verify", "gc"])
def test_missing_store_is_one_error_line_and_exit_2(tmp_path, command):
    result = run(command, str(tmp_path / "nowhere"))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no flexfeed store at {tmp_path / 'nowhere'}")
    assert "Traceback" not in result.output
