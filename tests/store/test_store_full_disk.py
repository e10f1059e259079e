"""`store gc`, the command that frees space, runs on a full disk (it writes nothing, not even a pid)."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from pipeline.cli import main
from store.maintenance import gc, verify
from tests.helpers.read_only import FullDisk
from tests.helpers.store_helpers import fill, make_store


def test_gc_frees_space_on_a_full_disk(tmp_path, monkeypatch):
    st = make_store(tmp_path / "s", num_rows=10, shard_rows=4)
    loss = st.signal("loss", {"m": 1})
    fill(loss)
    for shard in range(3):  # a superseded slot per shard: what an interrupted writer leaves
        loss.array[shard, 1 - loss.record(shard).slot] = np.ones(4, dtype=np.float32)
    (loss.dir / "commits" / ".000001.json.x1.tmp").write_bytes(b"y" * 100)
    (st.root / "signals" / "0123456789abcdef").mkdir()  # a signal whose creation died before its header
    (st.root / "locks" / "create-0123456789abcdef.lock").write_text("4242\n")
    full = FullDisk(st.root).install(monkeypatch)
    result = CliRunner().invoke(main, ["store", "gc", str(st.root)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("removed 5 items") and full.attempts == []
    assert gc(st).removed == [] and verify(st).ok
