"""Selectors that read no target: random, loss buckets, delta_loss; determinism and resume state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.strategies import SELECTORS
from pipeline.strategies.selectors.loss_buckets import bucket_quotas, terciles

# random ------------------------------------------------------------------------------------------

def test_random_is_uniform_without_replacement(make_ctx):
    sel = SELECTORS.build("random")
    counts = np.zeros(10)
    for seed in range(2000):
        idx = sel.select(make_ctx(10, num_domains=2, seed=seed), 5).indices
        assert len(np.unique(idx)) == 5
        counts[idx] += 1
    # Each row is in a selection with probability 1/2: Binomial(2000, 0.5), sd ~ 22.4.
    assert np.all(np.abs(counts - 1000) < 5 * 22.4), counts


def test_random_beyond_n_takes_full_passes(make_ctx):
    idx = SELECTORS.build("random").select(make_ctx(10, num_domains=2), 25).indices
    per_row = np.bincount(idx, minlength=10)
    assert len(idx) == 25 and set(per_row) <= {2, 3} and per_row.sum() == 25


def test_random_info_counts_domains(make_ctx):
    sel = SELECTORS.build("random")
    res = sel.select(make_ctx(10, num_domains=2), 10)
    assert res.info["selected_per_domain"] == {"d0": 5, "d1": 5}


# loss buckets ------------------------------------------------------------------------------------

def test_terciles_split_by_loss_rank():
    loss = np.array([5.0, 1.0, 3.0, 9.0, 0.0, 7.0])
    high, mid, low = terciles(loss)
    assert set(high) == {3, 5} and set(mid) == {0, 2} and set(low) == {1, 4}


def test_loss_bucket_quotas_follow_weights_by_largest_remainder():
    # 7 * (0.6, 0.3, 0.1) = (4.2, 2.1, 0.7): floors (4, 2, 0), the one left goes to the largest remainder.
    assert list(bucket_quotas(7, np.array([0.6, 0.3, 0.1]), np.array([10, 10, 10]))) == [4, 2, 1]
    # A full bucket spills its overflow to the others, zero-weight ones evenly when nothing else is open.
    assert list(bucket_quotas(150, np.array([1.0, 0.0, 0.0]), np.array([100, 100, 100]))) == [100, 25, 25]


def test_loss_selection_shares_and_within_bucket_weighting(make_ctx):
    rng = np.random.default_rng(1)
    n = 300
    loss = rng.permutation(np.linspace(0.5, 5.0, n))
    cut_hi, cut_lo = np.sort(loss)[200], np.sort(loss)[100]
    sel = SELECTORS.build("loss", {"bucket_weights": [6, 3, 1]})
    for seed in range(20):
        idx = sel.select(make_ctx(n, train={"loss": loss}, num_domains=2, seed=seed), 60).indices
        assert len(np.unique(idx)) == 60
        v = loss[idx]
        assert [(v >= cut_hi).sum(), ((v >= cut_lo) & (v < cut_hi)).sum(), (v < cut_lo).sum()] == [36, 18, 6]


def test_loss_within_bucket_draw_is_proportional_to_loss(make_ctx):
    # One row from the high tercile: the chance of each is its loss over the tercile's total loss.
    loss = np.concatenate([np.linspace(0.1, 1.0, 20), [1.2, 2.0, 3.0, 4.0, 10.0, 1.5, 2.5, 3.5, 4.5, 5.0]])
    sel = SELECTORS.build("loss", {"focus": "high"})
    draws = 4000
    counts = np.bincount([sel.select(make_ctx(30, train={"loss": loss}, num_domains=2, seed=s), 1).indices[0]
                          for s in range(draws)],
                         minlength=30)
    high = np.arange(20, 30)
    expected = draws * loss[high] / loss[high].sum()
    assert counts[:20].sum() == 0
    chi2 = ((counts[high] - expected) ** 2 / expected).sum()
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001


def test_loss_focus_and_uniform_within_bucket(make_ctx):
    loss = np.arange(30, dtype=float)
    sel = SELECTORS.build("loss", {"focus": "low", "within_bucket": "uniform"})
    idx = sel.select(make_ctx(30, train={"loss": loss}, num_domains=2), 10).indices
    assert sorted(idx) == list(range(10))
    assert sel.needs()[0].name == "loss" and len(sel.needs()) == 1


# delta_loss --------------------------------------------------------------------------------------

def test_delta_loss_picks_the_rows_whose_loss_dropped_most(make_ctx):
    rng = np.random.default_rng(0)
    n = 50
    first = rng.uniform(2.0, 3.0, n)
    now = first - rng.uniform(0.0, 0.05, n)
    planted = np.array([3, 7, 11, 20, 33, 41, 42, 45, 48, 49])
    now[planted] -= 1.0
    sel = SELECTORS.build("delta_loss", {"top_fraction": 1.0})
    first_res = sel.select(make_ctx(n, train={"loss": first}, num_domains=2, seed=1), 10)
    assert first_res.info["first_decision"] and len(np.unique(first_res.indices)) == 10
    res = sel.select(make_ctx(n, train={"loss": now}, num_domains=2, seed=2), 10)
    assert sorted(res.indices) == list(planted)
    np.testing.assert_allclose(res.scores, first - now)


def test_delta_loss_top_fraction_then_fill_from_others(make_ctx):
    n = 40
    first = np.full(n, 3.0)
    now = first.copy()
    now[:5] -= np.arange(5, 0, -1)  # rows 0..4 dropped 5, 4, 3, 2, 1
    sel = SELECTORS.build("delta_loss", {"top_fraction": 0.25})
    sel.select(make_ctx(n, train={"loss": first}, num_domains=2), 20)
    idx = sel.select(make_ctx(n, train={"loss": now}, num_domains=2), 20).indices
    assert list(idx[:5]) == [0, 1, 2, 3, 4]
    assert len(np.unique(idx)) == 20 and not set(idx[5:]) & set(range(5))


def test_delta_loss_window_compares_with_recent_decisions(make_ctx):
    n = 30
    l0 = np.full(n, 3.0)
    l1 = l0.copy()
    l1[:10] -= 1.0  # rows 0..9 dropped between decisions 0 and 1
    l2 = l1.copy()
    l2[10:20] -= 0.5  # rows 10..19 dropped between decisions 1 and 2
    picks = {}
    for window in (0, 1):
        sel = SELECTORS.build("delta_loss", {"top_fraction": 1.0, "window_decisions": window})
        for loss in (l0, l1):
            sel.select(make_ctx(n, train={"loss": loss}, num_domains=2), 10)
        picks[window] = sorted(sel.select(make_ctx(n, train={"loss": l2}, num_domains=2), 10).indices)
    assert picks[0] == list(range(10))  # since the first decision rows 0..9 dropped most (1.0 > 0.5)
    assert picks[1] == list(range(10, 20))  # over the last decision only rows 10..19 moved


def test_delta_loss_modes(make_ctx):
    first = np.array([4.0, 4.0, 2.0, 1.0])
    now = np.array([3.0, 2.0, 1.0, 1.5])  # drops 1, 2, 1, -0.5
    for mode, want in (("drop", [1, 0, 2, 3]), ("learnable", [1, 0, 2, 3]), ("forgotten", [3, 0, 2, 1])):
        sel = SELECTORS.build("delta_loss", {"top_fraction": 1.0, "mode": mode})
        sel.select(make_ctx(4, train={"loss": first}, num_domains=2), 4)
        assert list(sel.select(make_ctx(4, train={"loss": now}, num_domains=2), 4).indices) == want, mode
    sel = SELECTORS.build("delta_loss", {"top_fraction": 1.0, "mode": "learnable"})
    sel.select(make_ctx(4, train={"loss": first}, num_domains=2), 4)
    np.testing.assert_allclose(sel.select(make_ctx(4, train={"loss": now}, num_domains=2), 4).scores,
                               [3.0, 4.0, 1.0, 0.0])


def test_delta_loss_state_round_trip_resumes_identically(make_ctx):
    rng = np.random.default_rng(3)
    n = 60
    losses = [rng.uniform(1, 3, n) for _ in range(4)]
    params = {"window_decisions": 2, "top_fraction": 0.5}
    a = SELECTORS.build("delta_loss", params)
    for i in range(3):
        a.select(make_ctx(n, train={"loss": losses[i]}, num_domains=2, seed=i), 20)
    b = SELECTORS.build("delta_loss", params)
    b.load_state_dict(a.state_dict())
    ra = a.select(make_ctx(n, train={"loss": losses[3]}, num_domains=2, seed=9), 20)
    rb = b.select(make_ctx(n, train={"loss": losses[3]}, num_domains=2, seed=9), 20)
    np.testing.assert_array_equal(ra.indices, rb.indices)
    fresh = SELECTORS.build("delta_loss", params).select(
        make_ctx(n, train={"loss": losses[3]}, num_domains=2, seed=9), 20)
    assert fresh.info["first_decision"] and not ra.info["first_decision"]
    np.testing.assert_array_equal(a.state_dict()["history"], b.state_dict()["history"])


# determinism -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", [("random", {}), ("loss", {}), ("delta_loss", {"top_fraction": 0.5})])
def test_same_seed_same_selection(name, params, make_ctx):
    loss = np.random.default_rng(5).uniform(1, 3, 80)

    def run(seed):
        sel = SELECTORS.build(name, params)
        out = [sel.select(make_ctx(80, train={"loss": loss - 0.01 * i * np.arange(80) / 80}, num_domains=2,
                                   seed=seed + i), 30)
               for i in range(2)]
        return np.concatenate([o.indices for o in out])

    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(100))
    info = SELECTORS.build(name, params).select(make_ctx(80, train={"loss": loss}, num_domains=2), 30).info
    assert json.loads(json.dumps(info))["selected_per_domain"] == info["selected_per_domain"]
    assert sum(info["selected_per_domain"].values()) == 30
