"""Selectors that aim at a target set: less, near, tsds, cluster; each against a known answer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.strategies import SELECTORS, InMemorySignals, SignalNeed
from pipeline.strategies.selectors.less import checkpoint_pairs, less_scores
from pipeline.strategies.selectors.near import round_robin
from pipeline.strategies.selectors.tsds import tsds_probabilities
from store.errors import FlexfeedError


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def grads_signals(train_variants, target_variants):
    """Variants as (lr, array); the target's are SGD features, one list entry per checkpoint."""
    return InMemorySignals(variants={
        ("grads", "train"): [({"lr": lr}, g) for lr, g in train_variants],
        ("grads_sgd", "target"): [({"lr": lr}, g) for lr, g in target_variants],
    })


def less_by_hand(train_variants, target_variants, tasks, reduce="max"):
    """The LESS formula with explicit loops: sum_i lr_i * mean cos within each task, then max (or mean)."""
    n = train_variants[0][1].shape[0]
    out = np.zeros(n)
    for row in range(n):
        per_task = []
        for task in np.unique(tasks):
            total = 0.0
            for (lr, g), (_, t) in zip(train_variants, target_variants):
                cos = [np.dot(g[row], t[j]) / np.linalg.norm(g[row]) / np.linalg.norm(t[j])
                       for j in np.flatnonzero(tasks == task)]
                total += lr * np.mean(cos)
            per_task.append(total)
        out[row] = max(per_task) if reduce == "max" else np.mean(per_task)
    return out


# less --------------------------------------------------------------------------------------------

def test_less_picks_the_rows_aligned_with_the_target(make_ctx):
    rng = np.random.default_rng(0)
    d, n = 32, 120
    direction = unit(rng.normal(size=d))
    target = direction + 0.1 * rng.normal(size=(4, d))
    train = rng.normal(size=(n, d))
    planted = rng.choice(n, size=12, replace=False)
    train[planted] = direction + 0.2 * rng.normal(size=(12, d))
    signals = InMemorySignals(train={"grads": train}, target={"grads_sgd": target})  # one variant
    sel = SELECTORS.build("less")
    res = sel.select(make_ctx(n, signals=signals), 12)
    assert sorted(res.indices) == sorted(planted)
    np.testing.assert_allclose(res.scores, less_by_hand([(1.0, train)], [(1.0, target)], np.zeros(4)), atol=1e-5)
    assert sel.needs() == [SignalNeed("grads", "train"), SignalNeed("grads_sgd", "target")]


def test_less_learning_rates_weight_the_checkpoints(make_ctx):
    rng = np.random.default_rng(1)
    d, n = 16, 30
    u, v = np.eye(d)[0], np.eye(d)[1]
    g1, g2 = rng.normal(size=(n, d)) * 0.05, rng.normal(size=(n, d)) * 0.05
    g1[0] += u  # row 0 aligns with the target at checkpoint 1 only
    g2[1] += v  # row 1 aligns with the target at checkpoint 2 only
    t1, t2 = np.stack([u, u + 0.01]), np.stack([v, v + 0.01])
    for lrs, winner in (((2.0, 1.0), 0), ((1.0, 2.0), 1)):
        train = list(zip(lrs, (g1, g2)))
        target = list(zip(lrs, (t1, t2)))
        res = SELECTORS.build("less").select(make_ctx(n, signals=grads_signals(train, target)), 1)
        assert res.indices[0] == winner
        np.testing.assert_allclose(res.scores, less_by_hand(train, target, np.zeros(2)), atol=1e-5)


def test_less_takes_the_max_over_tasks_of_per_task_means(make_ctx):
    d = 8
    u, v = np.eye(d)[0], np.eye(d)[1]
    # Task 0 has one target (u), task 1 three (v): pooling all targets would favour v-like rows.
    target = np.stack([u, v, v, v])
    tasks = np.array([0, 1, 1, 1])
    train = np.stack([u, unit(u + v), 0.2 * u + v, -u])
    signals = InMemorySignals(train={"grads": train}, target={"grads_sgd": target})
    ctx = make_ctx(4, signals=signals, target_domain_ids=tasks)
    res = SELECTORS.build("less").select(ctx, 4)
    by_hand = less_by_hand([(1.0, train)], [(1.0, target)], tasks)
    np.testing.assert_allclose(res.scores, by_hand, atol=1e-6)
    np.testing.assert_allclose(by_hand, [1.0, np.sqrt(0.5), 1 / np.sqrt(1.04), 0.0], atol=1e-6)
    assert list(res.indices) == [0, 2, 1, 3]
    mean_scores = less_scores(make_ctx(4, signals=signals, target_domain_ids=tasks), task_reduce="mean")
    np.testing.assert_allclose(mean_scores, less_by_hand([(1.0, train)], [(1.0, target)], tasks, "mean"), atol=1e-6)


def test_less_ties_broken_by_row_id_and_ranking_repeats_beyond_n(make_ctx):
    train = np.stack([np.eye(4)[1], np.eye(4)[0], np.eye(4)[0], np.eye(4)[2]])
    signals = InMemorySignals(train={"grads": train}, target={"grads_sgd": np.eye(4)[:1]})
    res = SELECTORS.build("less").select(make_ctx(4, signals=signals), 6)
    assert list(res.indices) == [1, 2, 0, 3, 1, 2]


def _less_pairs(make_ctx, metas):
    g = np.eye(3, dtype=np.float32)
    signals = InMemorySignals(variants={("grads", "train"): [(m, g) for m in metas],
                                        ("grads_sgd", "target"): [({}, g[:1])]})
    return checkpoint_pairs(make_ctx(3, signals=signals))


def test_less_refuses_a_missing_rate_among_several_checkpoints(make_ctx):
    # the trainer's signal source fills a missing lr with 1.0; the checkpoint record still says None
    metas = [{"lr": 1.0, "checkpoint": {"step": 5, "lr": None}}, {"lr": 2e-4, "checkpoint": {"step": 10, "lr": 2e-4}}]
    with pytest.raises(FlexfeedError, match="no learning rate") as exc:
        _less_pairs(make_ctx, metas)
    assert "step 5" in str(exc.value)
    with pytest.raises(FlexfeedError, match="no learning rate"):
        _less_pairs(make_ctx, [{}, {"lr": 2e-4}])
    # recorded rates are the weights; one checkpoint needs none (its weight changes no ranking)
    assert [p[0] for p in _less_pairs(make_ctx, [{"checkpoint": {"lr": 7e-4}}, {"lr": 2e-4}])] == [7e-4, 2e-4]
    assert _less_pairs(make_ctx, [{"checkpoint": {"lr": None}}])[0][0] == 1.0


# near --------------------------------------------------------------------------------------------

class FaissSignals(InMemorySignals):
    """Search through a FAISS inner-product index, as the store does for small signals."""

    def search(self, name, queries, k, split="train"):
        import faiss

        base = np.ascontiguousarray(self.get(name, split), dtype=np.float32)
        index = faiss.IndexFlatIP(base.shape[1])
        index.add(base)
        return index.search(np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32), min(k, len(base)))


def round_robin_by_hand(sims, count):
    """Rank 0 of every target (closest pair first), then rank 1, ...; a row enters once."""
    order = np.argsort(-sims, axis=1, kind="stable")
    seen = []
    for rank in range(sims.shape[1]):
        level = sorted(range(sims.shape[0]), key=lambda q: (-sims[q, order[q, rank]], q))
        for q in level:
            row = order[q, rank]
            if row not in seen:
                seen.append(row)
            if len(seen) == count:
                return seen
    return seen


@pytest.mark.parametrize("source", [InMemorySignals, FaissSignals])
def test_near_returns_exact_neighbours_in_round_robin(source, make_ctx):
    rng = np.random.default_rng(2)
    emb = unit(rng.normal(size=(200, 8))).astype(np.float32)
    targets = unit(rng.normal(size=(5, 8))).astype(np.float32)
    signals = source(train={"embed": emb}, target={"embed": targets})
    sims = targets.astype(np.float64) @ emb.T.astype(np.float64)
    for count in (5, 23, 120):
        res = SELECTORS.build("near").select(make_ctx(200, signals=signals), count)
        assert list(res.indices) == round_robin_by_hand(sims, count)


def test_near_score_order_is_best_similarity_to_any_target(make_ctx):
    rng = np.random.default_rng(3)
    emb = unit(rng.normal(size=(150, 6))).astype(np.float32)
    targets = unit(rng.normal(size=(4, 6))).astype(np.float32)
    signals = InMemorySignals(train={"embed": emb}, target={"embed": targets})
    best = (targets @ emb.T).max(axis=0)
    res = SELECTORS.build("near", {"order": "score"}).select(make_ctx(150, signals=signals), 40)
    assert list(res.indices) == list(np.argsort(-best, kind="stable")[:40])


def test_near_union_of_neighbours_then_next_nearest(make_ctx):
    # Row 1 is the nearest row of both targets; rank 1 brings rows 2 (0.916) and 0 (0.888); rank 2 of
    # target 0 is row 3 (0.781) while target 1's (row 0) is already in, so the 4th row is row 3.
    emb = unit(np.array([[1, 0.2], [1, 1], [0.2, 1], [1, 0], [-1, 0], [0, -1]], dtype=float))
    targets = unit(np.array([[1, 0.8], [0.7, 1]]))
    signals = InMemorySignals(train={"embed": emb.astype(np.float32)}, target={"embed": targets.astype(np.float32)})
    res = SELECTORS.build("near").select(make_ctx(6, signals=signals), 4)
    assert list(res.indices) == [1, 2, 0, 3]
    assert list(res.indices) == round_robin_by_hand(targets @ emb.T, 4)
    rows, _ = round_robin(np.array([[0.9, 0.8]]), np.array([[3, -1]]))  # FAISS pads missing ids with -1
    assert list(rows) == [3]


# tsds --------------------------------------------------------------------------------------------

def test_tsds_probabilities_match_the_formula_on_a_hand_case(make_ctx):
    emb = unit(np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])).astype(np.float32)
    target = np.array([[1.0, 0.0]], dtype=np.float32)
    signals = InMemorySignals(train={"embed": emb}, target={"embed": target})
    params = SELECTORS.resolve("tsds").Params(num_neighbors=3, temperature=0.5, alpha=0.0)
    prob = tsds_probabilities(make_ctx(4, signals=signals), params)
    sims = np.array([1.0, 0.8, 0.0])
    want = np.exp(sims / 0.5) / np.exp(sims / 0.5).sum()
    np.testing.assert_allclose(prob, [*want, 0.0], rtol=1e-5)
    # With the density term each row's mass is divided by its Gaussian KDE over its 2 nearest rows.
    params = SELECTORS.resolve("tsds").Params(num_neighbors=3, temperature=0.5, alpha=1.0, kde_neighbors=2,
                                               kde_bandwidth=0.5)
    prob = tsds_probabilities(make_ctx(4, signals=signals), params)
    gram = emb.astype(np.float64) @ emb.T
    second = np.sort(gram, axis=1)[:, -2]
    density = 1 + np.exp(-(2 - 2 * second) / (2 * 0.25))
    mass = np.append(want, 0.0) / density
    np.testing.assert_allclose(prob, mass / mass.sum(), rtol=1e-5)


def test_tsds_gives_each_target_its_share_however_dense_its_neighbours(make_ctx):
    # target A = e1 has 10 exact duplicates of itself as neighbours; target B = e2 has 10 distinct rows
    # b_i = unit(e2 + 0.5 e_{2+i}) (cos(b_i, b_j) = 0.8, so their kernels barely overlap at h = 0.1)
    d = 13
    eye = np.eye(d)
    dups = np.tile(eye[0], (10, 1))
    distinct = unit(eye[1] + 0.5 * eye[2:12])
    emb = np.vstack([dups, distinct]).astype(np.float32)
    targets = eye[:2].astype(np.float32)
    signals = InMemorySignals(train={"embed": emb}, target={"embed": targets})
    params = SELECTORS.resolve("tsds").Params(num_neighbors=10, temperature=0.1, alpha=1.0, kde_neighbors=10,
                                               kde_bandwidth=0.1)
    prob = tsds_probabilities(make_ctx(20, signals=signals), params)
    # by hand: each target carries 1/2, split evenly over its 10 equally near neighbours -> 0.05 per row.
    # (Dividing the summed mass by density instead gives A's rows 0.05 / 10 each: A would keep 0.05 / 0.55
    # = 9% of the selection and B 91%.)
    np.testing.assert_allclose(prob[:10].sum(), 0.5, rtol=1e-6)
    np.testing.assert_allclose(prob, np.full(20, 0.05), rtol=1e-6)


def test_tsds_prefers_target_like_rows_and_spreads_over_duplicates(make_ctx):
    rng = np.random.default_rng(4)
    d = 16
    centre = unit(rng.normal(size=d))
    near_rows = unit(centre + 0.15 * rng.normal(size=(40, d)))
    far_rows = unit(0.3 * rng.normal(size=(200, d)) - centre)
    duplicate = unit(centre + 0.03 * rng.normal(size=d))
    emb = np.vstack([np.tile(duplicate, (20, 1)), near_rows, far_rows]).astype(np.float32)  # rows 0..19 equal
    targets = unit(centre + 0.15 * rng.normal(size=(8, d))).astype(np.float32)
    signals = InMemorySignals(train={"embed": emb}, target={"embed": targets})
    n = emb.shape[0]
    dup_counts = {}
    for alpha in (0.0, 1.0):
        sel = SELECTORS.build("tsds", {"num_neighbors": 60, "alpha": alpha, "kde_neighbors": 30,
                                       "temperature": 0.1})
        dups, near = [], []
        for seed in range(20):
            idx = sel.select(make_ctx(n, signals=signals, seed=seed), 20).indices
            assert len(np.unique(idx)) == 20
            dups.append(np.sum(idx < 20))
            near.append(np.sum(idx < 60))
        dup_counts[alpha] = np.mean(dups)
        assert np.mean(near) == 20  # never a far row
    assert dup_counts[0.0] > 10 and dup_counts[1.0] < 3, dup_counts


# cluster -----------------------------------------------------------------------------------------

def three_clusters(rng, per=40, d=8):
    centres = np.eye(d)[:3]
    emb = unit(np.repeat(centres, per, axis=0) + 0.05 * rng.normal(size=(3 * per, d))).astype(np.float32)
    return emb, np.repeat(np.arange(3), per)


def test_cluster_favours_the_cluster_whose_gradients_align_with_the_target(make_ctx):
    rng = np.random.default_rng(5)
    emb, truth = three_clusters(rng)
    n, d = emb.shape[0], 16
    target_dir = unit(rng.normal(size=d))
    grads = rng.normal(size=(n, d))
    grads[truth == 1] = target_dir + 0.3 * rng.normal(size=(40, d))
    signals = InMemorySignals(train={"embed": emb}, variants={
        ("grads", "train"): [({"lr": 1e-5}, grads)],
        ("grads_sgd", "target"): [({"lr": 1e-5}, target_dir + 0.05 * rng.normal(size=(3, d)))]})
    sel = SELECTORS.build("cluster", {"num_clusters": 3, "temperature": 0.5})
    res = sel.select(make_ctx(n, signals=signals, seed=1), 30)
    share = np.bincount(truth[res.indices], minlength=3) / 30
    assert share[1] > 0.8, share
    # k-means recovered the planted clusters: each true cluster has one label.
    assert all(len(np.unique(sel.assignment[truth == c])) == 1 for c in range(3))
    assert len(np.unique(sel.assignment)) == 3
    assert [s.name for s in sel.needs()] == ["embed", "grads", "grads_sgd"]


def test_cluster_with_loss_scores_and_state_round_trip(make_ctx):
    rng = np.random.default_rng(6)
    emb, truth = three_clusters(rng)
    loss = np.where(truth == 2, 4.0, 1.0) + 0.1 * rng.random(len(truth))
    signals = InMemorySignals(train={"embed": emb, "loss": loss})
    sel = SELECTORS.build("cluster", {"num_clusters": 3, "score": "loss", "temperature": 0.5})
    assert [s.name for s in sel.needs()] == ["embed", "loss"]
    res = sel.select(make_ctx(len(truth), signals=signals, seed=2), 30)
    assert np.mean(truth[res.indices] == 2) > 0.8
    again = SELECTORS.build("cluster", {"num_clusters": 3, "score": "loss", "temperature": 0.5})
    again.load_state_dict(sel.state_dict())
    np.testing.assert_array_equal(again.assignment, sel.assignment)
    np.testing.assert_array_equal(again.select(make_ctx(len(truth), signals=signals, seed=3), 30).indices,
                                  sel.select(make_ctx(len(truth), signals=signals, seed=3), 30).indices)
    # Beyond a cluster's size the draw moves on to the next clusters instead of repeating rows.
    wide = sel.select(make_ctx(len(truth), signals=signals, seed=4), 100)
    assert len(np.unique(wide.indices)) == 100


# determinism -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["less", "near", "tsds", "cluster"])
def test_same_seed_same_selection(name, make_ctx):
    rng = np.random.default_rng(7)
    emb = unit(rng.normal(size=(90, 8))).astype(np.float32)
    signals = InMemorySignals(train={"embed": emb, "grads": rng.normal(size=(90, 12))},
                              target={"embed": emb[:3] + 0.01, "grads_sgd": rng.normal(size=(3, 12))})

    def run(seed):
        sel = SELECTORS.build(name, {"num_clusters": 4} if name == "cluster" else {})
        return np.concatenate([sel.select(make_ctx(90, signals=signals, seed=seed + i), 20).indices
                               for i in range(2)])

    np.testing.assert_array_equal(run(0), run(0))
    sel = SELECTORS.build(name, {"num_clusters": 4} if name == "cluster" else {})
    info = sel.select(make_ctx(90, signals=signals), 20).info
    assert json.loads(json.dumps(info))["num_selected"] == 20 and "score_mean" in info
