"""A short last shard (a 500-row target set) takes only its own rows on disk; padded chunks of older stores still read."""

from __future__ import annotations

import numpy as np
import pytest

from store import integrity
from store.errors import CorruptShard
from store.maintenance import verify
from store.store import Store
from tests.helpers.store_helpers import fill, make_store


def test_a_small_split_and_a_short_last_shard_hold_only_their_rows(tmp_path):
    sig = make_store(tmp_path / "t", num_rows=500, shard_rows=4096).signal("g", {"m": 1}, dtype="float16", dim=32)
    values = fill(sig)
    # 500 rows x 32 dims x 2 bytes, not 4096 rows of which 3596 are zeros
    assert sig.chunk_path(0, 0).stat().st_size == 500 * 32 * 2
    np.testing.assert_array_equal(sig.read_all(), values)
    big = make_store(tmp_path / "b", num_rows=10, shard_rows=4).signal("g", {"m": 1}, dim=3)
    values = fill(big)
    sizes = [big.chunk_path(s, 0).stat().st_size for s in range(3)]
    assert sizes == [4 * 3 * 4, 4 * 3 * 4, 2 * 3 * 4]  # shards of 4, 4 and 2 float32 rows
    np.testing.assert_array_equal(big.read_all(), values)
    np.testing.assert_array_equal(big.read_rows([9, 0, 8]), values[[9, 0, 8]])
    assert verify(Store.open(tmp_path / "b")).findings == []
    big.write_shard(2, values[8:] + 1)  # a rewrite goes to the other slot, short as well
    assert big.chunk_path(2, 1).stat().st_size == 2 * 3 * 4 and not big.chunk_path(2, 0).exists()
    np.testing.assert_array_equal(big.read_shard(2), values[8:] + 1)


def test_a_padded_last_shard_written_before_still_reads_and_verifies(tmp_path):
    st = make_store(tmp_path / "s", num_rows=10, shard_rows=4)
    sig = st.signal("g", {"m": 1}, dim=3)
    values = fill(sig)
    # the chunk file as earlier flexfeed wrote it: the shard's 2 rows, then 2 rows of zeros
    padded = np.zeros((4, 3), dtype=np.float32)
    padded[:2] = values[8:]
    sig.chunk_path(2, 0).write_bytes(padded.tobytes())
    integrity.forget_all()
    reopened = Store.open(tmp_path / "s").get(sig.key)
    np.testing.assert_array_equal(reopened.read_all(), values)
    np.testing.assert_array_equal(reopened.read_shard(2), values[8:])
    assert reopened.damaged_shards() == {} and verify(Store.open(tmp_path / "s")).findings == []
    # a later commit of that shard writes it short
    reopened.write_shard(2, values[8:] * 2)
    assert reopened.chunk_path(2, 1).stat().st_size == 2 * 3 * 4
    np.testing.assert_array_equal(reopened.read_shard(2), values[8:] * 2)


def test_a_short_chunk_cut_shorter_is_reported_damaged(tmp_path):
    sig = make_store(tmp_path / "s", num_rows=10, shard_rows=4).signal("g", {"m": 1}, dim=3)
    fill(sig)
    path = sig.chunk_path(2, 0)
    path.write_bytes(path.read_bytes()[:-4])  # one float of the last row lost
    integrity.forget_all()
    with pytest.raises(CorruptShard, match="shard 2 .* ends after 20 of 24 bytes"):
        Store.open(tmp_path / "s").get(sig.key).read_shard(2)
