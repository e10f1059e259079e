"""Curriculum patterns on small hand-checked lists, and the permutation property for every pattern."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.strategies.reorders.patterns import (
    PATTERNS,
    boundary_blend,
    folding,
    jitter,
    order_rows,
    rank_rows,
    segment,
    zigzag,
)


def test_rank_rows_is_stable_and_follows_polarity():
    scores = np.array([3.0, 1.0, 2.0, 1.0])
    assert rank_rows(scores).tolist() == [1, 3, 2, 0]  # ties (rows 1, 3) keep row order
    assert rank_rows(scores, "higher_earlier").tolist() == [0, 2, 1, 3]
    assert rank_rows(scores, "higher_is_better").tolist() == [1, 3, 2, 0]
    assert rank_rows(scores, "lower_is_better").tolist() == [0, 2, 1, 3]
    with pytest.raises(ValueError, match="polarity"):
        rank_rows(scores, "up")


def test_folding_and_zigzag_by_hand():
    seq = list(range(10))
    assert folding(seq, 3).tolist() == [0, 3, 6, 9, 1, 4, 7, 2, 5, 8]
    assert zigzag(seq, 3).tolist() == [0, 3, 6, 9, 7, 4, 1, 2, 5, 8]
    assert folding(seq, 1).tolist() == seq


def test_segment_blocks_come_from_the_chosen_ends():
    rng = np.random.default_rng(0)
    out = segment(list(range(10)), 20, 30, front_is_high=False, back_is_high=True, rng=rng)
    assert set(out[:2]) == {0, 1} and set(out[-3:]) == {7, 8, 9} and set(out[2:7]) == {2, 3, 4, 5, 6}
    out = segment(list(range(10)), 20, 30, front_is_high=True, back_is_high=False, rng=rng)
    assert set(out[:2]) == {8, 9} and set(out[-3:]) == {0, 1, 2}
    out = segment(list(range(10)), 20, 30, front_is_high=True, back_is_high=True, rng=rng)
    assert set(out[:2]) | set(out[-3:]) == {5, 6, 7, 8, 9} and set(out[2:7]) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="sum <= 100"):
        segment(list(range(10)), 60, 50, front_is_high=False, back_is_high=True, rng=rng)


def test_stair_and_saw_blend_only_the_boundary_window():
    seq = list(range(20))
    # one boundary at 10, radius 0.1 * 20 = 2: rows 8..11 folded (stair) or zigzagged (saw) with 2 layers
    assert boundary_blend(seq, 2, 0.1, 2, zig=False).tolist() == [*range(8), 8, 10, 9, 11, *range(12, 20)]
    assert boundary_blend(seq, 2, 0.1, 2, zig=True).tolist() == [*range(8), 8, 10, 11, 9, *range(12, 20)]
    with pytest.raises(ValueError, match="overlap"):
        boundary_blend(seq, 4, 0.2, 2, zig=False)  # 2 * 0.2 >= 1 / 4


def test_jitter_shuffles_inside_windows_only():
    out = jitter(list(range(12)), 4, np.random.default_rng(1))
    for start in (0, 4, 8):
        assert sorted(out[start:start + 4]) == list(range(start, start + 4))
    assert out.tolist() != list(range(12))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_pattern_returns_a_permutation(pattern):
    rng = np.random.default_rng(7)
    for n in (0, 1, 2, 3, 7, 50, 333):
        rows = rng.choice(10_000, size=n, replace=False)
        scores = rng.integers(0, 5, size=n).astype(float)  # many ties
        for window in (0, 3):
            out = order_rows(pattern, rows, scores, seed=int(n), layers=3, num_sections=3, folding_ratio=0.1,
                             window_size=window)
            assert sorted(out.tolist()) == sorted(rows.tolist())


def test_sorting_orders_the_given_rows_by_their_scores():
    rows = np.array([40, 10, 30, 20])
    out = order_rows("sorting", rows, np.array([0.4, 0.1, 0.3, 0.2]), seed=0)
    assert out.tolist() == [10, 20, 30, 40]
    out = order_rows("sorting", rows, np.array([0.4, 0.1, 0.3, 0.2]), seed=0, polarity="higher_earlier")
    assert out.tolist() == [40, 30, 20, 10]
