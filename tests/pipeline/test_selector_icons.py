"""`icons`: per-task influence votes on hand-made gradient features, its task split, and a brute-force check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.strategies import SELECTORS
from pipeline.strategies.context import InMemorySignals
from pipeline.strategies.selectors.icons import consensus_votes
from store.errors import FlexfeedError

S, C = math.sin(math.radians(30)), math.cos(math.radians(30))
# Six train rows at angles 0, 90, 45, 30, 60 and -30 degrees: influence on a task aimed at e1 is cos(angle),
# on a task aimed at e2 sin(angle).
TRAIN = np.array([[1, 0], [0, 1], [1, 1], [C, S], [S, C], [C, -S]], dtype=np.float64)
TWO_TASKS = np.array([[1, 0], [2, 0], [0, 3], [0, 1]], dtype=np.float64)  # task A: rows 0-1 (e1), task B: 2-3 (e2)


def _ctx(make_ctx, target, target_domain_ids=None, train=TRAIN):
    return make_ctx(len(train), train={"grads": train}, target={"grads_sgd": target},
                    target_domain_ids=target_domain_ids)


def test_each_task_votes_for_its_top_fraction_and_consensus_wins(make_ctx):
    # Budget 4 of 6: each task votes for its 4 highest influences.
    #   task A (cos): r0 1, r3 .866, r5 .866, r2 .707 | r4 .5, r1 0       -> votes r0 r3 r5 r2
    #   task B (sin): r1 1, r4 .866, r2 .707, r3 .5   | r0 0, r5 -.5      -> votes r1 r4 r2 r3
    # votes: r2 2, r3 2, the others 1. Summed influence: r2 1.414 > r3 1.366; among one vote r4 1.366,
    # then r0 and r1 (1 each, tie -> row id), r5 .366. Top 4: r2, r3, r4, r0.
    sel = SELECTORS.build("icons", {"task_boundaries": [2, 2]})
    res = sel.select(_ctx(make_ctx, TWO_TASKS), 4)
    assert res.indices.tolist() == [2, 3, 4, 0]
    assert res.scores.tolist() == [1, 1, 2, 2, 1, 1]
    assert res.info["num_tasks"] == 2 and res.info["unanimous_rows"] == 2
    # LESS (max over tasks) ranks r0, r1 first and would leave out r2, the row both tasks value
    less = SELECTORS.build("less").select(_ctx(make_ctx, TWO_TASKS, target_domain_ids=np.array([0, 0, 1, 1])), 4)
    assert 2 not in less.indices.tolist()


def test_task_boundaries_win_over_the_targets_datasets(make_ctx):
    sel = SELECTORS.build("icons", {"task_boundaries": [2, 2]})
    by_boundaries = sel.select(_ctx(make_ctx, TWO_TASKS, target_domain_ids=np.zeros(4, dtype=int)), 4)
    by_domains = SELECTORS.build("icons").select(_ctx(make_ctx, TWO_TASKS, target_domain_ids=np.array([0, 0, 1, 1])), 4)
    assert by_boundaries.indices.tolist() == by_domains.indices.tolist() == [2, 3, 4, 0]
    # one task (no boundaries, one target dataset): its centre is at 45 degrees, r2 sits on it
    one = SELECTORS.build("icons").select(_ctx(make_ctx, TWO_TASKS), 1)
    assert one.indices.tolist() == [2] and one.info["num_tasks"] == 1


def test_task_boundaries_must_cover_the_target_set(make_ctx):
    sel = SELECTORS.build("icons", {"task_boundaries": [2, 3]})
    with pytest.raises(FlexfeedError, match=r"sum to 5 but the target set has 4 rows"):
        sel.select(_ctx(make_ctx, TWO_TASKS), 2)
    for bad in ([], [2, 0], [1.5]):
        with pytest.raises(FlexfeedError, match="task_boundaries"):
            SELECTORS.build("icons", {"task_boundaries": bad})


def test_ties_at_a_tasks_threshold_all_vote():
    # one task, top 2 of [3, 1, 2, 2]: the 2nd largest is 2, and both rows at 2 vote
    assert consensus_votes(np.array([[3.0], [1.0], [2.0], [2.0]]), 2).tolist() == [1, 0, 1, 1]
    # a budget beyond the pool: every row votes in every task
    assert consensus_votes(np.array([[3.0, 0.0], [1.0, 5.0]]), 7).tolist() == [2, 2]


def test_matches_a_brute_force_vote_over_checkpoints(make_ctx):
    rng = np.random.default_rng(3)
    n, d, sizes, k = 40, 5, [3, 4, 2], 10
    lrs = [0.5, 0.2]
    train = [rng.normal(size=(n, d)) for _ in lrs]
    target = [rng.normal(size=(sum(sizes), d)) for _ in lrs]
    signals = InMemorySignals(variants={
        ("grads", "train"): [({"lr": lr}, g) for lr, g in zip(lrs, train)],
        ("grads_sgd", "target"): [({"lr": lr}, g) for lr, g in zip(lrs, target)]})
    ctx = make_ctx(n, signals=signals)
    res = SELECTORS.build("icons", {"task_boundaries": sizes}).select(ctx, k)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    starts = [0, 3, 7]
    influence = [[sum(lr * sum(cos(g[x], t[z]) for z in range(s, s + size)) / size
                      for lr, g, t in zip(lrs, train, target))
                  for s, size in zip(starts, sizes)] for x in range(n)]
    votes = [0] * n
    for task in range(len(sizes)):
        top = sorted(range(n), key=lambda x: -influence[x][task])[:k]
        for x in top:
            votes[x] += 1
    expected = sorted(range(n), key=lambda x: (-votes[x], -sum(influence[x]), x))[:k]
    assert res.indices.tolist() == expected
    assert res.scores.tolist() == votes


def test_consumes_the_pool_and_reads_lesss_signals():
    sel = SELECTORS.build("icons")
    assert sel.consume_once
    assert [(n.name, n.split) for n in sel.needs()] == [("grads", "train"), ("grads_sgd", "target")]
    assert sel.paper and sel.rule
