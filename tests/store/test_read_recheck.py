"""A read re-checks the shard's commit record after reading its data: a commit in between moves it to the new slot."""

from __future__ import annotations

import numpy as np

from store.store import Store
from tests.helpers.store_helpers import fill, make_store


def test_a_commit_after_the_records_were_read_is_seen_by_the_read(tmp_path):
    sig = make_store(tmp_path / "s", num_rows=10, shard_rows=4).signal("g", {"m": 1}, dim=3)
    values = fill(sig)
    records = sig.records()  # what a streaming reader lists before it reads
    other = Store.open(tmp_path / "s").get(sig.key)  # another writer (its own handle, as another process)
    other.write_shard(1, values[4:8] + 5)
    np.testing.assert_array_equal(sig._read_committed(records[1]), values[4:8] + 5)
    np.testing.assert_array_equal(sig._read_committed(records[0]), values[:4])  # unchanged: read as listed
    other.write_shard(1, values[4:8] + 7)  # and once more, back to the first slot
    np.testing.assert_array_equal(sig.read_shard(1), values[4:8] + 7)
    assert [s for s, _, _ in sig.iter_shards()] == [0, 1, 2]
