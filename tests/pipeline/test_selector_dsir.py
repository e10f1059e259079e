"""`dsir`: importance weights from hand-made bucket counts, the Gumbel draw's probabilities, state and needs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.strategies import SELECTORS
from pipeline.strategies.context import InMemorySignals
from pipeline.strategies.row_maps import apply_blocks
from pipeline.strategies.selectors import dsir
from pipeline.strategies.selectors.dsir import gumbel_top_k
from store.errors import FlexfeedError

TRAIN = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [2, 0, 0]], dtype=np.float64)
TARGET = np.array([[2, 0, 0], [1, 1, 0]], dtype=np.float64)


def _expected_log_weights(eps: float) -> list[float]:
    # by hand: target buckets sum to (3, 1, 0) -> theta_t = (3/4, 1/4, 0); train sums (4, 2, 1) -> (4/7, 2/7, 1/7)
    theta_t, theta_r = [0.75, 0.25, 0.0], [4 / 7, 2 / 7, 1 / 7]
    ratio = [math.log(t + eps) - math.log(r + eps) for t, r in zip(theta_t, theta_r)]
    return [sum(c * q for c, q in zip(row, ratio)) for row in TRAIN.tolist()]


def _ctx(make_ctx, train=TRAIN, seed=0):
    return make_ctx(len(train), train={"ngram": train}, target={"ngram": TARGET}, seed=seed)


def test_log_importance_weights_and_top_k(make_ctx):
    res = SELECTORS.build("dsir", {"top_k": True}).select(_ctx(make_ctx), 3)
    expected = _expected_log_weights(1e-8)
    np.testing.assert_allclose(res.scores, expected, rtol=1e-9)
    # weights: row 4 (two counts of the target's main bucket) 2 log(21/16), row 0 log(21/16), row 3
    # log(21/16) + log(7/8), row 1 log(7/8), row 2 about log(1e-8 * 7) = -16.5: the row the target never uses
    assert res.indices.tolist() == [4, 0, 3]
    assert expected[2] < -16


def test_smoothing_sets_the_cost_of_buckets_the_target_never_uses(make_ctx):
    res = SELECTORS.build("dsir", {"top_k": True, "smoothing": 0.01}).select(_ctx(make_ctx), 5)
    np.testing.assert_allclose(res.scores, _expected_log_weights(0.01), rtol=1e-9)
    assert res.indices.tolist()[-1] == 2


def test_resampling_draws_rows_in_proportion_to_their_weights(make_ctx):
    # one row per decision: row i comes first with probability w_i / sum(w)
    logw = np.log(np.array([1.0, 2.0, 3.0, 4.0]))
    draws = 4000
    firsts = [gumbel_top_k(np.random.default_rng(s), logw, 1)[0] for s in range(draws)]
    counts = np.bincount(firsts, minlength=4)
    expected = draws * np.array([1, 2, 3, 4]) / 10
    assert ((counts - expected) ** 2 / expected).sum() < 16.3  # chi-square, 3 degrees of freedom, p = 0.001
    # without replacement, and the ranking repeats beyond the rows
    drawn = gumbel_top_k(np.random.default_rng(0), logw, 6)
    assert sorted(drawn[:4].tolist()) == [0, 1, 2, 3] and drawn[4:].tolist() == drawn[:2].tolist()


def test_the_selector_resamples_with_the_contexts_rng(make_ctx):
    sel = SELECTORS.build("dsir")
    a = sel.select(_ctx(make_ctx, seed=1), 3).indices
    b = SELECTORS.build("dsir").select(_ctx(make_ctx, seed=1), 3).indices
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 3
    seen = {tuple(SELECTORS.build("dsir").select(_ctx(make_ctx, seed=s), 2).indices.tolist()) for s in range(60)}
    assert len(seen) > 3  # a draw, not a ranking
    assert all(2 not in pair for pair in seen)  # weight ~7e-8 of the others': never drawn in 60 tries


def test_the_raw_model_is_fit_once_and_kept_in_the_state(make_ctx):
    sel = SELECTORS.build("dsir", {"top_k": True})
    first = sel.select(_ctx(make_ctx), 2).scores
    # a later decision sees only a pool (rows 1-4): the raw model stays the one fit on every row
    later = sel.select(_ctx(make_ctx, train=TRAIN[1:]), 2).scores
    np.testing.assert_allclose(later, first[1:])
    resumed = SELECTORS.build("dsir", {"top_k": True})
    resumed.load_state_dict(sel.state_dict())
    np.testing.assert_allclose(resumed.select(_ctx(make_ctx, train=TRAIN[1:]), 2).scores, first[1:])


def test_mismatched_or_empty_counts_are_refused(make_ctx):
    sel = SELECTORS.build("dsir")
    with pytest.raises(FlexfeedError, match="same ngram settings"):
        sel.select(make_ctx(5, train={"ngram": TRAIN}, target={"ngram": np.ones((2, 4))}), 2)
    with pytest.raises(FlexfeedError, match="no n-grams"):
        SELECTORS.build("dsir").select(make_ctx(2, train={"ngram": np.zeros((2, 3))}, target={"ngram": TARGET}), 1)
    with pytest.raises(FlexfeedError, match="smoothing"):
        SELECTORS.build("dsir", {"smoothing": 0})


def test_reads_the_ngram_counts_of_both_splits_offline():
    sel = SELECTORS.build("dsir")
    assert [(n.name, n.split, n.refresh) for n in sel.needs()] == [("ngram", "train", False),
                                                                   ("ngram", "target", False)]
    assert sel.consume_once and sel.paper and sel.rule


class NoWholeTrain(InMemorySignals):
    """Never hands over the train counts whole: blocks of rows (recorded) and per-row rules only."""

    def get(self, name, split="train"):
        assert split != "train", "the train counts were read whole"
        return super().get(name, split)

    def get_all(self, name, split="train"):
        assert split != "train", "the train counts were read whole"
        return super().get_all(name, split)

    def variants(self, name, split="train"):
        return [({}, np.shape(self._data[split][name]))]

    def get_rows_all(self, name, rows, split="train"):
        self.rows_read.append((name, split, np.asarray(rows).copy()))
        return [({}, self._data[split][name][np.asarray(rows)])]

    def map_rows(self, name, fn, split="train", variant=-1):
        return apply_blocks(fn, self._data[split][name])


def test_train_counts_are_summed_block_by_block_and_scored_per_row(make_ctx, monkeypatch):
    monkeypatch.setattr(dsir, "BLOCK_ROWS", 2)  # 5 rows: blocks of 2, 2 and 1
    signals = NoWholeTrain(train={"ngram": TRAIN}, target={"ngram": TARGET})
    res = SELECTORS.build("dsir", {"top_k": True}).select(make_ctx(5, signals=signals), 3)
    np.testing.assert_allclose(res.scores, _expected_log_weights(1e-8), rtol=1e-9)
    assert [r.tolist() for _, _, r in signals.rows_read] == [[0, 1], [2, 3], [4]]
