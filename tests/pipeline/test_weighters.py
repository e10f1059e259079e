"""Weighters: loss-based (four strategies) and adapt (embedding similarity), checked against the formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.strategies import WEIGHTERS
from store.errors import FlexfeedError

LOSSES = np.array([1.0, 2.0, 4.0, 5.0])


def by_hand(strategy: str, losses, delta: float, r: float) -> list[float]:
    """Normalise to [-delta, delta], apply f, softmax with temperature r, scale to mean 1 (plain Python)."""
    lo, hi = min(losses), max(losses)
    xs = [delta * (2 * v - hi - lo) / (hi - lo) for v in losses]
    f = {
        "linupper": lambda x: min(x + delta, delta),
        "uniform": lambda x: 0.0,
        "quadratic": lambda x: 1 - x * x / (delta * delta),
        "extremes": lambda x: abs(x),
    }[strategy]
    e = [math.exp(f(x) / r) for x in xs]
    return [len(losses) * v / sum(e) for v in e]


@pytest.mark.parametrize("strategy", ["linupper", "uniform", "quadratic", "extremes"])
@pytest.mark.parametrize("delta,r", [(1.0, 1.0), (2.0, 0.5)])
def test_loss_weights_follow_the_formula_and_average_one(strategy, delta, r):
    w = WEIGHTERS.build("loss", {"strategy": strategy, "delta": delta, "r": r}).weights(LOSSES, None, None, 1)
    np.testing.assert_allclose(w, by_hand(strategy, LOSSES.tolist(), delta, r), rtol=1e-12)
    assert math.isclose(w.mean(), 1.0)


def test_loss_weight_values_for_delta_one():
    # losses 1, 2, 4, 5 normalise to x = -1, -0.5, 0.5, 1
    w = WEIGHTERS.build("loss", {"strategy": "linupper"}).weights(LOSSES, None, None, 1)
    e = np.exp([0.0, 0.5, 1.0, 1.0])  # min(x + 1, 1)
    np.testing.assert_allclose(w, 4 * e / e.sum())
    assert w[2] == w[3] > w[1] > w[0]  # capped: the two hardest samples weigh the same
    q = WEIGHTERS.build("loss", {"strategy": "quadratic"}).weights(LOSSES, None, None, 1)
    assert q[1] == q[2] > q[0] == q[3]  # medium losses favoured
    x = WEIGHTERS.build("loss", {"strategy": "extremes"}).weights(LOSSES, None, None, 1)
    assert x[0] == x[3] > x[1] == x[2]  # both ends favoured
    np.testing.assert_array_equal(WEIGHTERS.build("loss", {"strategy": "uniform"}).weights(LOSSES, None, None, 1),
                                  np.ones(4))


def test_loss_weights_equal_losses_and_bad_params():
    w = WEIGHTERS.build("loss", {"strategy": "extremes"}).weights(np.full(5, 2.5), None, None, 1)
    np.testing.assert_array_equal(w, np.ones(5))
    with pytest.raises(FlexfeedError) as exc:
        WEIGHTERS.build("loss", {"strategy": "quadratik"})
    assert exc.value.hint and "quadratic" in exc.value.hint
    with pytest.raises(FlexfeedError) as exc:
        WEIGHTERS.build("loss", {"r": 0})
    assert exc.value.hint
    with pytest.raises(FlexfeedError):
        WEIGHTERS.build("loss").weights(np.array([1.0, np.nan]), None, None, 3)
    with pytest.raises(FlexfeedError) as exc:
        WEIGHTERS.build("losss")
    assert "loss" in exc.value.hint


TRAIN = [[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]]
TARGET = [[2.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize("anchor", ["mean", "max"])
def test_adapt_weights_follow_the_formula(anchor, make_ctx):
    tau = 0.5
    weighter = WEIGHTERS.build("adapt", {"tau": tau, "anchor": anchor})
    assert [(n.name, n.split, n.refresh) for n in weighter.needs()] == [("embed", "train", True),
                                                                         ("embed", "target", True)]
    rows = np.array([2, 0, 3, 0])
    np.testing.assert_array_equal(weighter.weights(None, rows, None, 1), np.ones(4))  # before any update
    weighter.update(make_ctx(len(TRAIN), train={"embed": TRAIN}, target={"embed": TARGET}))
    # cosines of rows 0, 2, 3 with the unit anchors (1, 0) and (0, 1)
    s = math.sqrt(0.5)
    cos = {0: (1.0, 0.0), 2: (s, s), 3: (-1.0, 0.0)}
    score = {r: (sum(c) / 2 if anchor == "mean" else max(c)) for r, c in cos.items()}
    sig = [1 / (1 + math.exp(-score[r] / tau)) for r in rows]
    expected = [v * len(sig) / sum(sig) for v in sig]
    w = weighter.weights(np.zeros(4), rows, np.zeros(4, int), 2)
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    assert math.isclose(w.mean(), 1.0)


def test_adapt_max_in_chunks_equals_direct():
    from pipeline.strategies.row_maps import apply_blocks
    from pipeline.strategies.weighters import adapt

    rng = np.random.default_rng(0)
    train, target = rng.normal(size=(50, 8)), rng.normal(size=(7, 8))
    chunked = apply_blocks(adapt.anchor_rule(train.shape, target, "max"), train, block_rows=16)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(chunked, (unit(train) @ unit(target).T).max(axis=1))


def test_adapt_state_round_trip_and_errors(make_ctx):
    a = WEIGHTERS.build("adapt")
    a.update(make_ctx(len(TRAIN), train={"embed": TRAIN}, target={"embed": TARGET}))
    b = WEIGHTERS.build("adapt")
    b.load_state_dict(a.state_dict())
    rows = np.array([1, 2, 3])
    np.testing.assert_array_equal(a.weights(None, rows, None, 3), b.weights(None, rows, None, 3))
    with pytest.raises(FlexfeedError) as exc:
        a.weights(None, np.array([9]), None, 3)
    assert exc.value.hint
    with pytest.raises(FlexfeedError) as exc:
        other_model = {"embed": [[1.0, 0.0, 0.0]]}  # three dims where the train features have two
        WEIGHTERS.build("adapt").update(make_ctx(len(TRAIN), train={"embed": TRAIN}, target=other_model))
    assert "same model" in exc.value.hint
    with pytest.raises(FlexfeedError) as exc:
        WEIGHTERS.build("adapt", {"anchor": "min"})
    assert "mean" in exc.value.hint


def test_adapt_absolute_weights_are_the_capped_sigmoids(make_ctx):
    # DataFlex's form: no batch normalisation. TRAIN rows 0, 2, 3 score (mean anchor) 0.5, sqrt(0.5), -0.5
    weighter = WEIGHTERS.build("adapt", {"scale": "absolute", "tau": 1.0, "clip": 0.65})
    weighter.update(make_ctx(len(TRAIN), train={"embed": TRAIN}, target={"embed": TARGET}))
    w = weighter.weights(None, np.array([0, 2, 3]), None, 1)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # sigmoid(0.5) = 0.6225, sigmoid(0.7071) = 0.6698 -> capped at 0.65, sigmoid(-0.5) = 0.3775
    np.testing.assert_allclose(w, [sig(0.5), 0.65, sig(-0.5)], rtol=1e-12)
    with pytest.raises(FlexfeedError):
        WEIGHTERS.build("adapt", {"scale": "sum"})
    with pytest.raises(FlexfeedError):
        WEIGHTERS.build("adapt", {"clip": 0.0})


def test_adapt_rescores_the_rows_at_each_decision_from_the_embeddings_then(make_ctx):
    weighter = WEIGHTERS.build("adapt", {"scale": "absolute"})
    weighter.update(make_ctx(len(TRAIN), train={"embed": TRAIN}, target={"embed": TARGET}))
    before = weighter.weights(None, np.array([3]), None, 1)
    # refreshed embeddings: row 3 now points along the first anchor (score 0.5 instead of -0.5)
    moved = [list(r) for r in TRAIN]
    moved[3] = [1.0, 0.0]
    weighter.update(make_ctx(len(TRAIN), train={"embed": moved}, target={"embed": TARGET}))
    after = weighter.weights(None, np.array([3]), None, 2)
    np.testing.assert_allclose([before[0], after[0]], [1 / (1 + math.exp(0.5)), 1 / (1 + math.exp(-0.5))])


@pytest.mark.parametrize("staleness,live", [(None, False), (3, True)])
def test_adapt_embeddings_are_refreshed_when_the_run_sets_a_staleness(tiny_checkpoint, tmp_path, staleness, live):
    from pipeline.config import load_config
    from pipeline.refresh import plan_routes
    from tests.helpers.run_fixtures import make_run_dir

    path = make_run_dir(tmp_path, tiny_checkpoint)
    extra = [] if staleness is None else [f"refresh.max_staleness={staleness}"]
    cfg = load_config(path, ["train_type=weight", "component=adapt", *extra])
    routes = plan_routes(cfg, WEIGHTERS.build("adapt").needs(), "adapt")
    assert {key: r.live for key, r in routes.items()} == {("embed", "train"): live, ("embed", "target"): live}
    assert all(r.max_staleness == staleness for r in routes.values())
