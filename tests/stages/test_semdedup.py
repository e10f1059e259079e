"""SemDeDup's keep mask: the per-cluster rule on hand-made vectors, planted near-duplicates, and the stored signal."""

from __future__ import annotations

import numpy as np
import pytest

from stages.derived import derive_signal
from stages.semdedup import SemDedupMask, dedup_cluster
from tests.helpers.store_helpers import make_store


def test_the_least_typical_row_of_a_duplicate_pair_is_kept():
    c99 = np.sqrt(1 - 0.99**2)
    x = np.array([[1.0, 0.0, 0.0], [0.99, c99, 0.0], [0.0, 0.0, 1.0]])  # rows 0 and 1: cosine 0.99
    # centroid (0.6, 0.8, 0): cosines 0.6, 0.99*0.6 + 0.141*0.8 = 0.707, 0 -> visited 2, 0, 1: row 1 dropped
    assert dedup_cluster(x, np.array([0.6, 0.8, 0.0]), eps=0.05).tolist() == [True, False, True]
    # centroid (0.8, -0.6, 0): cosines 0.8, 0.707, 0 -> visited 2, 1, 0: row 0 dropped
    assert dedup_cluster(x, np.array([0.8, -0.6, 0.0]), eps=0.05).tolist() == [False, True, True]
    # eps 0.005: 0.99 is not above 0.995, nothing is a duplicate
    assert dedup_cluster(x, np.array([0.6, 0.8, 0.0]), eps=0.005).tolist() == [True, True, True]


def test_a_row_is_compared_with_kept_rows_only():
    # a ~ b (cos 0.96), b ~ c (cos 0.96), a and c cos 0.96^2 - 0.28^2 = 0.843: b drops, c stays
    angle = np.arccos(0.96)
    x = np.array([[np.cos(t), np.sin(t)] for t in (0.0, angle, 2 * angle)])
    centroid = np.array([np.cos(angle), np.sin(angle)])  # b most typical; a and c tie at 0.96: a first (row id)
    assert dedup_cluster(x, centroid, eps=0.05).tolist() == [True, False, True]


def planted(seed: int, num_unique: int = 300, num_groups: int = 80, d: int = 32):
    """Unit vectors: `num_unique` random directions, of which `num_groups` get 1 to 3 near copies (cosine ~0.995).
    Returns (vectors, group id per row: -1 for a row without copies)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((num_unique, d))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    rows, group = [base], np.full(num_unique, -1)
    group[:num_groups] = np.arange(num_groups)
    copies, copy_group = [], []
    for g in range(num_groups):
        for _ in range(rng.integers(1, 4)):
            v = base[g] + 0.1 * rng.standard_normal(d) / np.sqrt(d)
            copies.append(v / np.linalg.norm(v))
            copy_group.append(g)
    x = np.concatenate([*rows, np.array(copies)])
    order = rng.permutation(x.shape[0])  # copies spread through the rows, not after their originals
    return x[order], np.concatenate([group, copy_group])[order]


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_near_duplicates_are_removed_with_high_recall_and_precision(seed):
    x, group = planted(seed)
    keep = SemDedupMask(num_clusters=8, cluster_size=64, eps=0.05, seed=seed).derive(x.astype(np.float16)) > 0.5
    removed = ~keep
    # per planted group, all but one row should go; rows outside groups should stay
    sizes = np.bincount(group[group >= 0])
    gone = np.bincount(group[(group >= 0) & removed], minlength=sizes.size)
    correct = int(np.minimum(gone, sizes - 1).sum())
    precision = correct / max(1, int(removed.sum()))
    recall = correct / int((sizes - 1).sum())
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert (gone <= sizes - 1).all()  # no group loses every row


def test_the_mask_is_stored_reused_and_recomputed_when_the_embeddings_change(tmp_path):
    x, _ = planted(0, num_unique=40, num_groups=10, d=8)
    store = make_store(tmp_path / "s", num_rows=x.shape[0], shard_rows=16)
    emb = store.signal("embed", {"kind": "embed", "model": "m"}, dtype="float16", dim=8)
    for shard in range(emb.num_shards):
        start, stop = emb.shard_range(shard)
        emb.write_shard(shard, x[start:stop], model="m")
    stage = SemDedupMask(num_clusters=3, cluster_size=64, eps=0.05, seed=0)
    first, computed = derive_signal(stage, emb, store)
    assert computed and np.array_equal(first, stage.derive(emb.read_all()))
    again, computed = derive_signal(stage, emb, store)
    assert not computed and np.array_equal(again, first)
    assert len(store.find("semdedup")) == 1
    # other parameters: another signal beside it
    derive_signal(SemDedupMask(num_clusters=3, cluster_size=64, eps=0.2, seed=0), emb, store)
    assert len(store.find("semdedup")) == 2
    # the same embeddings recommitted: still reused; other values in one shard: recomputed
    emb.write_shard(0, x[:16], model="m")
    assert not derive_signal(stage, emb, store)[1]
    emb.write_shard(0, x[16:32], model="m")
    values, computed = derive_signal(stage, emb, store)
    assert computed and np.array_equal(values, stage.derive(emb.read_all()))
