"""Decisions that stream a stored signal shard by shard: the same scores as the whole arrays, per-row results cached."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.refresh import SignalRoute, StoreSignals
from pipeline.shard_scoring import ShardScorer, rank_shards
from pipeline.strategies import SELECTORS, InMemorySignals
from pipeline.strategies.row_maps import UnitProjection
from pipeline.strategies.selectors.less import less_scores
from store.errors import FlexfeedError
from tests.helpers.store_helpers import fill, make_store

ROWS, SHARD_ROWS, DIM, TARGETS = 50, 16, 8, 6  # four shards, the last one of 2 rows
LRS = (2e-4, 5e-5)


def store_source(chosen: dict, scorer: ShardScorer | None = None) -> StoreSignals:
    """The trainer's signal source over signals already made ready (what `prepare` leaves it with)."""
    source = StoreSignals(None, None, 0, {}, scorer=scorer)
    source._chosen.update(chosen)
    return source


@pytest.fixture
def less_store(tmp_path):
    """Two checkpoints of float16 train and target gradients in a store: (signals, train arrays, target arrays)."""
    train_store = make_store(tmp_path / "train", num_rows=ROWS, shard_rows=SHARD_ROWS)
    target_store = make_store(tmp_path / "target", num_rows=TARGETS, shard_rows=SHARD_ROWS)
    chosen = {("grads", "train"): [], ("grads_sgd", "target"): []}
    train, target = [], []
    for i, lr in enumerate(LRS):
        meta = {"lr": lr, "checkpoint": {"step": 10 * (i + 1), "lr": lr}}
        sig = train_store.signal("grads", {"checkpoint": i}, dtype="float16", dim=DIM)
        train.append(fill(sig, seed=i))
        tsig = target_store.signal("grads_sgd", {"checkpoint": i}, dtype="float16", dim=DIM)
        target.append(fill(tsig, seed=10 + i))
        chosen[("grads", "train")].append((meta, sig))
        chosen[("grads_sgd", "target")].append((meta, tsig))
    return chosen, train, target


def expected_less(train, target, task_of) -> np.ndarray:
    """LESS by hand over whole float32 arrays: sum_i lr_i * mean_{z in task} cos(g_i(x), g_i(z)), max over tasks."""
    total = 0.0
    for lr, g, t in zip(LRS, train, target):
        g = g.astype(np.float32) / np.linalg.norm(g.astype(np.float32), axis=1, keepdims=True)
        t = t.astype(np.float32) / np.linalg.norm(t.astype(np.float32), axis=1, keepdims=True)
        cos = (g @ t.T).astype(np.float64)  # (rows, targets)
        total = total + lr * np.stack([cos[:, task_of == k].mean(axis=1) for k in np.unique(task_of)], axis=1)
    return total.max(axis=1)


def test_less_streamed_from_the_store_scores_as_the_whole_arrays(less_store, make_ctx):
    chosen, train, target = less_store
    task_of = np.array([0, 1, 0, 1, 1, 0])
    source = store_source(chosen, ShardScorer(block_rows=5))  # blocks cross no shard edge, shards several blocks
    ctx = make_ctx(ROWS, signals=source, target_domain_ids=task_of)
    streamed = less_scores(ctx)
    want = expected_less(train, target, task_of)
    np.testing.assert_allclose(streamed, want, rtol=1e-5, atol=1e-10)  # float32 cosines times lr ~1e-4
    assert list(np.argsort(-streamed, kind="stable")) == list(np.argsort(-want, kind="stable"))
    whole = InMemorySignals(variants={k: [(m, s.read_all()) for m, s in v] for k, v in chosen.items()})
    np.testing.assert_allclose(less_scores(make_ctx(ROWS, signals=whole, target_domain_ids=task_of)), streamed,
                               rtol=1e-6)
    # the selector ranks the streamed scores; no train signal was kept whole for the run
    res = SELECTORS.build("less").select(make_ctx(ROWS, signals=source, target_domain_ids=task_of), 7)
    assert list(res.indices) == list(np.argsort(-want, kind="stable")[:7])
    assert not any(sig.key in source.cache._values for _, sig in chosen[("grads", "train")])


def test_per_row_results_are_reused_until_a_shard_changes(less_store, make_ctx, monkeypatch):
    chosen, train, target = less_store
    scorer = ShardScorer()
    reads: list[int] = []
    real = ShardScorer._here
    monkeypatch.setattr(ShardScorer, "_here", lambda self, sig, fn, shards: reads.append(len(shards)) or
                        real(self, sig, fn, shards))
    task_of = np.zeros(TARGETS, dtype=np.int64)
    first = less_scores(make_ctx(ROWS, signals=store_source(chosen, scorer), target_domain_ids=task_of))
    assert reads == [4, 4]  # every shard of each checkpoint, once
    again = less_scores(make_ctx(ROWS, signals=store_source(chosen, scorer), target_domain_ids=task_of))
    assert reads == [4, 4] and np.array_equal(first, again)  # the next decision reads nothing
    sig = chosen[("grads", "train")][1][1]
    new = -train[1][16:32]
    sig.write_shard(1, new)  # one shard rewritten (into its other slot): that checkpoint is read again
    train[1] = np.concatenate([train[1][:16], new, train[1][32:]])
    changed = less_scores(make_ctx(ROWS, signals=store_source(chosen, scorer), target_domain_ids=task_of))
    assert reads == [4, 4, 4]
    np.testing.assert_allclose(changed, expected_less(train, target, task_of), rtol=1e-5, atol=1e-10)  # float32 cosines times lr ~1e-4


def test_a_rule_over_other_dims_is_refused(less_store):
    chosen, _, _ = less_store
    source = store_source(chosen)
    with pytest.raises(FlexfeedError, match="reads 3"):
        source.map_rows("grads", UnitProjection(np.ones((3, 1))), "train")


def test_rank_shares_cover_every_shard_once_in_order():
    for shards, world in ((4, 2), (5, 2), (3, 4), (13, 3)):
        parts = [list(rank_shards(shards, r, world)) for r in range(world)]
        assert sum(parts, []) == list(range(shards))


@pytest.fixture
def embed_store(tmp_path):
    """float16 train and target embeddings in stores: (signals, train array, target array)."""
    train_sig = make_store(tmp_path / "train", num_rows=ROWS, shard_rows=SHARD_ROWS).signal(
        "embed", {"model": "m"}, dtype="float16", dim=DIM)
    target_sig = make_store(tmp_path / "target", num_rows=TARGETS, shard_rows=SHARD_ROWS).signal(
        "embed", {"model": "m"}, dtype="float16", dim=DIM)
    chosen = {("embed", "train"): [({}, train_sig)], ("embed", "target"): [({}, target_sig)]}
    return chosen, fill(train_sig, seed=3), fill(target_sig, seed=4)


@pytest.mark.parametrize("anchor", ["mean", "max"])
def test_adapt_streamed_scores_are_the_cosines_to_the_anchors(embed_store, anchor, make_ctx):
    from pipeline.strategies import WEIGHTERS

    chosen, train, target = embed_store
    weighter = WEIGHTERS.build("adapt", {"anchor": anchor})
    weighter.update(make_ctx(ROWS, signals=store_source(chosen, ShardScorer(block_rows=5))))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cos = unit(train.astype(np.float64)) @ unit(target.astype(np.float64)).T
    np.testing.assert_allclose(weighter.scores, cos.mean(axis=1) if anchor == "mean" else cos.max(axis=1),
                               rtol=1e-12, atol=1e-15)


def test_rows_of_a_stored_signal_are_read_without_the_whole_signal(embed_store, monkeypatch):
    chosen, train, _ = embed_store
    source = store_source(chosen)
    source.routes = {("embed", "train"): SignalRoute("embed", "train", live=False, stages=[])}
    monkeypatch.setattr(type(chosen[("embed", "train")][0][1]), "read_all", None)  # a whole read would fail
    rows = np.array([40, 3, 3, 17])
    ((_, values),) = source.get_rows_all("embed", rows, "train")
    assert values.dtype == np.float32 and np.array_equal(values, train[rows].astype(np.float32))


def test_two_ranks_each_read_half_the_shards_and_gather_the_same_scores(less_store, tmp_path):
    """Two gloo processes: each reads its contiguous half of the shards; both end with every row's results."""
    import json
    import socket
    import subprocess
    import sys

    from tests.helpers.store_helpers import REPO, child_env

    chosen, train, _ = less_store
    sig = chosen[("grads", "train")][0][1]
    directions = np.random.default_rng(5).normal(size=(DIM, 3))
    np.save(tmp_path / "dirs.npy", directions)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = REPO / "tests" / "helpers" / "rank_scoring.py"
    procs = [subprocess.Popen([sys.executable, str(script), str(sig.dir.parents[1]), sig.key,
                               str(tmp_path / "dirs.npy"), str(tmp_path)],
                              env=child_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    g = train[0].astype(np.float32)
    want = (g / np.linalg.norm(g, axis=1, keepdims=True)) @ directions.astype(np.float32)
    for r in (0, 1):
        np.testing.assert_allclose(np.load(tmp_path / f"rank{r}.npy"), want, rtol=1e-5, atol=1e-6)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [[0, 1], [2, 3]]
    assert np.array_equal(np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy"))  # identical on every rank


def test_dask_workers_score_the_committed_slots_as_in_process(less_store):
    """Two Dask workers, one task per shard, each reading the slot its commit record names (checksum-checked)."""
    from distributed import LocalCluster

    from store.errors import CorruptShard

    chosen, train, _ = less_store
    sig = chosen[("grads", "train")][0][1]
    sig.write_shard(2, -train[0][32:48])  # rewritten: its values now live in the shard's other slot
    rule = UnitProjection(np.random.default_rng(6).normal(size=(DIM, 2)))
    here = ShardScorer(block_rows=5).map_rows(sig, rule)
    g = np.concatenate([train[0][:32], -train[0][32:48], train[0][48:]]).astype(np.float32)
    np.testing.assert_allclose(here, (g / np.linalg.norm(g, axis=1, keepdims=True)) @ rule.directions.astype(
        np.float32), rtol=1e-5, atol=1e-6)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                      worker_dashboard_address=None) as cluster:
        scorers = [ShardScorer(scheduler=cluster.scheduler_address, block_rows=5) for _ in range(2)]
        try:
            assert np.array_equal(scorers[0].map_rows(sig, rule), here)
            path = sig.chunk_path(1, sig.record(1).slot)
            data = bytearray(path.read_bytes())
            data[0] ^= 0xFF  # damage on disk, the commit record unchanged: the workers' first read hashes it
            path.write_bytes(bytes(data))
            with pytest.raises(CorruptShard, match="shard 1"):
                scorers[1].map_rows(sig, rule)
        finally:
            for scorer in scorers:
                scorer.close()


def test_rules_scale_their_own_copy_never_the_callers_array():
    from pipeline.strategies.row_maps import UnitMaxCosine, apply_blocks

    values = np.random.default_rng(7).normal(size=(10, 4)).astype(np.float32)
    before = values.copy()
    apply_blocks(UnitProjection(np.ones((4, 1))), values, block_rows=3)
    apply_blocks(UnitMaxCosine(np.eye(4)), values.astype(np.float64), block_rows=3)
    assert np.array_equal(values, before)


def test_a_pool_searches_and_scores_only_its_rows():
    from pipeline.strategies.pool_view import PoolSignals

    emb = np.random.default_rng(8).normal(size=(30, 4)).astype(np.float32)
    base = InMemorySignals(train={"embed": emb})
    pool = np.array([25, 3, 7, 11, 19])
    view = PoolSignals(base, pool)
    query = emb[7:8] + 0.01
    scores, ids = view.search("embed", query, 3)
    sims = emb[pool] @ query[0]  # by hand: pool positions ranked by inner product
    assert list(ids[0]) == list(np.argsort(-sims)[:3]) and ids[0][0] == 2  # pool position 2 is row 7
    np.testing.assert_allclose(scores[0], np.sort(sims)[::-1][:3], rtol=1e-6)
    assert [r.tolist() for _, _, r in base.rows_read] == [pool.tolist()]
    rule = UnitProjection(np.eye(4)[:, :1])
    np.testing.assert_allclose(view.map_rows("embed", rule), emb[pool, :1] / np.linalg.norm(emb[pool], axis=1,
                                                                                            keepdims=True), rtol=1e-6)
    assert view.variants("embed") == [({"lr": 1.0}, (5, 4))]


@pytest.mark.parametrize("scheduler,dask", [("tcp://10.0.0.7:8786", True), ("inline", False), (None, False)])
def test_runner_scheduler_sends_the_run_decisions_to_dask(scheduler, dask):
    """runner.scheduler names the cluster decisions score on (inline or unset: in the training processes)."""
    from types import SimpleNamespace

    from pipeline.decision_context import DecisionContexts, ScorerDisconnect
    from stages.args import RunnerArgs

    callbacks = []
    trainer = SimpleNamespace(accelerator=SimpleNamespace(process_index=1, num_processes=2),
                              add_callback=callbacks.append)
    prepared = SimpleNamespace(train=SimpleNamespace(domain_ids=lambda: np.zeros(4, dtype=np.int64)), target=None)
    contexts = DecisionContexts(SimpleNamespace(runner=RunnerArgs(scheduler=scheduler)), prepared, {}, seed=0,
                                init_proportions=np.ones(1))
    contexts.bind(trainer, scheduler=None)
    scorer = contexts.scorer
    assert (scorer.rank, scorer.world_size, scorer.gather is not None) == (1, 2, True)
    assert scorer.scheduler == (scheduler if dask else None)
    assert [type(c) for c in callbacks] == ([ScorerDisconnect] if dask else [])


def test_variants_are_the_shapes_get_all_returns_without_reading(less_store, tmp_path, monkeypatch):
    chosen, _, _ = less_store
    loss = make_store(tmp_path / "loss", num_rows=ROWS, shard_rows=SHARD_ROWS).signal("loss", {}, dtype="float32",
                                                                                       dim=2)
    fill(loss)
    source = store_source({**chosen, ("loss", "train"): [({}, loss)]})
    monkeypatch.setattr(type(loss), "read_all", None)  # no values are read
    assert source.variants("grads") == [(meta, (ROWS, DIM)) for meta, _ in chosen[("grads", "train")]]
    assert source.variants("loss") == [({}, (ROWS,))]  # a loss signal's first column, as get returns it
