"""Mixers: static, random, doremi and odm, each rule checked step by step against the formula by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.strategies import MIXERS, DecisionContext, InMemorySignals
from store.errors import FlexfeedError

NAMES = ["code", "prose", "math"]
# the ten rows most mixer tests decide over: six code, three prose, one math
MIX = {"domain_ids": (0, 0, 0, 0, 0, 0, 1, 1, 1, 2), "domain_names": NAMES}


def assert_hint(exc_info, *words):
    err = exc_info.value
    assert err.hint, "a FlexfeedError for a user mistake must carry a hint"
    for word in words:
        assert word in str(err)


# ---------------------------------------------------------------- static

def test_static_uniform_stratified_and_list(make_ctx):
    ctx = make_ctx(**MIX)
    np.testing.assert_allclose(MIXERS.build("static").proportions(ctx), [1 / 3, 1 / 3, 1 / 3])
    # 6, 3 and 1 rows per domain -> 0.6, 0.3, 0.1
    np.testing.assert_allclose(MIXERS.build("static", {"proportions": "stratified"}).proportions(ctx), [0.6, 0.3, 0.1])
    # [2, 1, 1] is normalised by its sum 4
    np.testing.assert_allclose(MIXERS.build("static", {"proportions": [2, 1, 1]}).proportions(ctx), [0.5, 0.25, 0.25])


def test_static_reads_a_doremi_weights_file_by_domain_name(tmp_path, make_ctx):
    path = tmp_path / "domain_weights.json"
    # keys in a different order than the run's domains, and not normalised
    path.write_text(json.dumps({"domain_weights": {"math": 1.0, "code": 2.0, "prose": 5.0}}))
    props = MIXERS.build("static", {"proportions": str(path)}).proportions(make_ctx(**MIX))
    np.testing.assert_allclose(props, [2 / 8, 5 / 8, 1 / 8])


def test_static_bad_params_are_errors_with_hints(tmp_path, make_ctx):
    with pytest.raises(FlexfeedError) as exc:
        MIXERS.build("static", {"proportions": [0.5, -0.1, 0.6]})
    assert_hint(exc, "non-negative")
    with pytest.raises(FlexfeedError) as exc:
        MIXERS.build("static", {"proportions": [0.5, 0.5]}).proportions(make_ctx(**MIX))
    assert_hint(exc, "2 values", "3 domains")
    with pytest.raises(FlexfeedError) as exc:
        MIXERS.build("static", {"proportions": str(tmp_path / "missing.json")}).proportions(make_ctx(**MIX))
    assert_hint(exc, "does not exist", "doremi")
    wrong = tmp_path / "other.json"
    wrong.write_text(json.dumps({"domain_weights": {"code": 1.0, "web": 1.0}}))
    with pytest.raises(FlexfeedError) as exc:
        MIXERS.build("static", {"proportions": str(wrong)}).proportions(make_ctx(**MIX))
    assert_hint(exc, "web", "same datasets")
    with pytest.raises(FlexfeedError) as exc:
        MIXERS.build("static", {"propotions": "uniform"})
    assert_hint(exc, "propotions", "proportions")


def test_static_state_keeps_resolved_proportions(tmp_path, make_ctx):
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"domain_weights": {"code": 1.0, "prose": 1.0, "math": 2.0}}))
    mixer = MIXERS.build("static", {"proportions": str(path)})
    first = mixer.proportions(make_ctx(**MIX))
    path.unlink()  # a resumed run no longer needs the file
    again = MIXERS.build("static", {"proportions": str(path)})
    again.load_state_dict(mixer.state_dict())
    np.testing.assert_array_equal(again.proportions(make_ctx(**MIX)), first)


# ---------------------------------------------------------------- random

def test_random_proportions_are_valid_and_follow_the_seed(make_ctx):
    mixer = MIXERS.build("random", {"alpha": 0.5})
    a = [mixer.proportions(make_ctx(**MIX, seed=7)) for _ in range(3)]
    b = mixer.proportions(make_ctx(**MIX, seed=8))
    for p in a + [b]:
        assert p.shape == (3,) and np.all(p >= 0) and math.isclose(p.sum(), 1.0)
    np.testing.assert_array_equal(a[0], a[1])  # same seed, same draw
    assert not np.allclose(a[0], b)
    # the draw is exactly numpy's Dirichlet from the context's rng
    np.testing.assert_allclose(a[0], np.random.default_rng(7).dirichlet([0.5, 0.5, 0.5]))
    ctx = make_ctx(**MIX, seed=3)
    first, second = mixer.proportions(ctx), mixer.proportions(ctx)
    assert not np.allclose(first, second)  # fresh proportions at each decision
    with pytest.raises(FlexfeedError):
        MIXERS.build("random", {"alpha": 0.0})


# ---------------------------------------------------------------- doremi

def test_doremi_update_follows_the_formula_step_by_step(make_ctx):
    eta, eps = 0.5, 0.1
    ref = np.array([1.0, 2.0, 1.5, 3.0, 0.5, 1.0, 2.0, 2.0, 1.0, 1.0])
    ctx = make_ctx(**MIX, train={"ref_loss": ref})
    mixer = MIXERS.build("doremi", {"reweight_eta": eta, "reweight_eps": eps})
    assert [(n.name, n.split, n.refresh) for n in mixer.needs()] == [("ref_loss", "train", False)]

    # update 1: rows 0 (code), 1 (code), 6 (prose); no math sample -> math excess 0
    mixer.observe(np.array([0, 0]), np.array([1.6, 1.5]), np.array([0, 1]), step=1)
    mixer.observe(np.array([1]), np.array([2.9]), np.array([6]), step=2)
    ex1 = [((1.6 - 1.0) + 0.0) / 2, 0.9, 0.0]  # row 1: 1.5 - 2.0 < 0 clips to 0
    a0 = np.full(3, 1 / 3)
    p1 = a0 * np.exp(eta * np.array(ex1))
    a1 = (1 - eps) * p1 / p1.sum() + eps / 3
    # DoReMi's form draws from the reference mixture (uniform here) and weights losses by alpha
    np.testing.assert_allclose(mixer.proportions(ctx), a0)
    np.testing.assert_allclose(mixer.alpha, a1)
    np.testing.assert_allclose(ctx.log["doremi/excess"], ex1)

    # update 2: only the new batch counts (rows 9 math, 3 code); prose got no rows and keeps its last excess
    mixer.observe(np.array([2, 0]), np.array([1.4, 2.0]), np.array([9, 3]), step=3)
    ex2 = [0.0, 0.9, 0.4]
    p2 = a1 * np.exp(eta * np.array(ex2))
    a2 = (1 - eps) * p2 / p2.sum() + eps / 3
    mixer.proportions(ctx)
    np.testing.assert_allclose(mixer.alpha, a2)

    # update 3: two math samples average their excess; code got no rows and keeps its last (0.0)
    mixer.observe(np.array([2, 2, 1]), np.array([2.0, 1.0, 1.0]), np.array([9, 9, 7]), step=4)
    ex3 = [0.0, 0.0, (1.0 + 0.0) / 2]
    p3 = a2 * np.exp(eta * np.array(ex3))
    a3 = (1 - eps) * p3 / p3.sum() + eps / 3
    mixer.proportions(ctx)
    np.testing.assert_allclose(mixer.alpha, a3)

    # the run's output is the average of alpha_1..alpha_3 (not alpha_0), keyed by domain name
    avg = (a1 + a2 + a3) / 3
    final = mixer.final_weights()
    assert list(final) == NAMES
    assert mixer.final_weights(NAMES) == final  # the trainer passes the run's domain names
    np.testing.assert_allclose(list(final.values()), avg)
    assert mixer.num_updates == 3


def test_doremi_without_observations_does_not_step(make_ctx):
    ctx = make_ctx(**MIX, train={"ref_loss": np.ones(10)})
    mixer = MIXERS.build("doremi")
    np.testing.assert_allclose(mixer.proportions(ctx), np.full(3, 1 / 3))
    assert mixer.num_updates == 0
    assert mixer.final_weights(NAMES) == {n: 1 / 3 for n in NAMES}  # a run that never updated: uniform


def test_doremi_writes_weights_the_static_mixer_reads(tmp_path, make_ctx):
    ctx = make_ctx(**MIX, train={"ref_loss": np.ones(10)})
    mixer = MIXERS.build("doremi", {"reweight_eta": 1.0, "reweight_eps": 0.0})
    mixer.observe(np.array([0, 1, 2]), np.array([3.0, 1.0, 2.0]), np.array([0, 6, 9]), step=1)
    mixer.proportions(ctx)
    path = mixer.write_final_weights(tmp_path / "out" / "domain_weights.json")
    saved = json.loads(path.read_text())
    assert saved["num_updates"] == 1
    e = np.exp([2.0, 0.0, 1.0])
    np.testing.assert_allclose([saved["domain_weights"][n] for n in NAMES], e / e.sum())
    static = MIXERS.build("static", {"proportions": str(path)})
    np.testing.assert_allclose(static.proportions(ctx), e / e.sum())


def test_doremi_state_round_trip_gives_identical_next_decision(make_ctx):
    ref = np.linspace(0.5, 3.0, 10)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 3, 6), rng.uniform(0, 4, 6), rng.integers(0, 10, 6)) for _ in range(5)]
    a = MIXERS.build("doremi", {"reweight_eta": 2.0})
    for i, (d, loss, r) in enumerate(batches[:2]):
        a.observe(d, loss, r, step=i)
    a.proportions(make_ctx(**MIX, train={"ref_loss": ref}))
    a.observe(*batches[2], step=2)  # buffered at save time
    b = MIXERS.build("doremi", {"reweight_eta": 2.0})
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m.observe(*batches[3], step=3)
    np.testing.assert_array_equal(a.proportions(make_ctx(**MIX, train={"ref_loss": ref})),
                                  b.proportions(make_ctx(**MIX, train={"ref_loss": ref})))
    np.testing.assert_array_equal(a.alpha, b.alpha)
    assert a.final_weights() == b.final_weights()


def test_doremi_refuses_rows_beyond_ref_loss(make_ctx):
    mixer = MIXERS.build("doremi")
    mixer.observe(np.array([0]), np.array([1.0]), np.array([12]), step=1)
    with pytest.raises(FlexfeedError) as exc:
        mixer.proportions(make_ctx(**MIX, train={"ref_loss": np.ones(10)}))
    assert_hint(exc, "ref_loss", "loss stage")
    with pytest.raises(FlexfeedError) as exc:
        MIXERS.build("doremi", {"reweight_eps": 1.5})
    assert_hint(exc, "reweight_eps")


# ---------------------------------------------------------------- odm

def exp3_by_hand(batches, k, alpha, scale=1.0, fixed_draw=None):
    """The EXP3 recursion of the ODM paper, written out in plain Python, one bandit round per batch."""
    r_hat = [0.0] * k
    pi = [1.0 / k] * k
    out = []
    for t, (domains, losses) in enumerate(batches, start=1):
        # the batch was drawn with the policy handed out before it (or a fixed warmup mixture)
        p_draw = list(pi) if fixed_draw is None else fixed_draw
        for arm in range(k):
            mine = [loss for d, loss in zip(domains, losses) if d == arm]
            if mine:  # only arms present in the batch are played
                reward = scale * sum(mine) / len(mine)
                r_hat[arm] = alpha * r_hat[arm] + (1 - alpha) * reward / p_draw[arm]
        eps_prev = 1.0 / k if t == 0 else min(1.0 / k, math.sqrt(math.log(k) / (k * t)))
        eps_next = min(1.0 / k, math.sqrt(math.log(k) / (k * (t + 1))))
        z = [math.exp(eps_prev * r) for r in r_hat]
        pi = [(1 - k * eps_next) * zi / sum(z) + eps_next for zi in z]
        out.append(pi)
    return out


def test_odm_follows_exp3_and_credits_each_domain_its_own_samples(make_ctx):
    k, alpha = 3, 0.7
    # mixed batches: scripted losses, math is always hardest
    batches = [
        ([0, 1, 2, 2], [1.0, 2.0, 5.0, 7.0]),
        ([0, 0, 2], [1.5, 0.5, 6.0]),
        ([1, 1, 1], [3.0, 3.0, 4.0]),
        ([0, 1, 2, 0], [1.0, 2.5, 6.5, 2.0]),
        ([2, 2, 2, 2], [5.0, 5.0, 5.0, 5.0]),
    ]
    expected = exp3_by_hand(batches, k, alpha)
    mixer = MIXERS.build("odm", {"alpha": alpha})
    ctx = make_ctx(**MIX)
    np.testing.assert_allclose(mixer.proportions(ctx), np.full(3, 1 / 3))  # pi_1 is uniform
    for t, (domains, losses) in enumerate(batches):
        mixer.observe(np.array(domains), np.array(losses), np.arange(len(domains)), step=t + 1)
        if t == 0:
            # each arm's own mean over p = 1/3, times (1 - alpha): code 1.0, prose 2.0, math (5 + 7) / 2 = 6
            np.testing.assert_allclose(mixer.r_hat, [0.3 * 1.0 * 3, 0.3 * 2.0 * 3, 0.3 * 6.0 * 3])
        got = mixer.proportions(ctx)  # update_step = 1: the sampler uses each new policy
        np.testing.assert_allclose(got, expected[t], rtol=1e-12)
        assert math.isclose(got.sum(), 1.0)
    assert mixer.t == 5
    # K = 3: eps_t = 1/K while sqrt(ln 3 / (3 t)) >= 1/3, i.e. t <= 3, so pi_2 and pi_3 are still uniform
    np.testing.assert_allclose(expected[0], np.full(3, 1 / 3))
    np.testing.assert_allclose(expected[1], np.full(3, 1 / 3))
    assert expected[3][2] > expected[3][1] > expected[3][0]  # then the hardest domain gains share


def test_odm_attribution_differs_from_whole_batch_credit(make_ctx):
    mixer = MIXERS.build("odm", {"alpha": 0.0})
    ctx = make_ctx(**MIX)
    mixer.proportions(ctx)
    mixer.observe(np.array([0, 2]), np.array([1.0, 9.0]), np.array([0, 9]), step=1)
    # alpha 0: R_hat = own mean / (1/3): code 3, math 27, prose (absent) 0
    np.testing.assert_allclose(mixer.r_hat, [3.0, 0.0, 27.0])


def test_odm_replays_batches_seen_before_the_first_decision(make_ctx):
    # warmup batches: 5 code, 2 prose, 3 math samples -> the warmup mixture is estimated as 0.5, 0.2, 0.3
    batches = [([0, 1, 0], [2.0, 1.0, 3.0]), ([2, 2, 0], [3.0, 4.0, 1.0]), ([1, 0, 2, 0], [5.0, 2.0, 6.0, 1.0])]
    early = MIXERS.build("odm", {"reward_scale": 0.1})
    for t, (d, loss) in enumerate(batches):
        early.observe(np.array(d), np.array(loss), np.zeros(len(d), int), step=t + 1)
    assert early.t == 0  # nothing is learned before K is known
    expected = exp3_by_hand(batches, 3, 0.9, scale=0.1, fixed_draw=[0.5, 0.2, 0.3])
    np.testing.assert_allclose(early.proportions(make_ctx(**MIX)), expected[-1], rtol=1e-12)
    # one EMA step per played arm, from 0: (1 - 0.9) * 0.1 * own mean / share; round 2 plays only math,
    # so code and prose keep their round-1 values (unplayed arms are not decayed)
    first = MIXERS.build("odm", {"reward_scale": 0.1})
    first.observe(np.array([0, 1, 0]), np.array([2.0, 1.0, 3.0]), np.zeros(3, int), step=1)
    first.observe(np.array([2]), np.array([1.0]), np.zeros(1, int), step=2)  # shares now 2/4, 1/4, 1/4
    first.proportions(make_ctx(**MIX))
    np.testing.assert_allclose(first.r_hat, [0.01 * 2.5 / 0.5, 0.01 * 1.0 / 0.25, 0.01 * 1.0 / 0.25])


def test_odm_state_round_trip_gives_identical_next_decision(make_ctx):
    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, 3, 5), rng.uniform(0, 5, 5)) for _ in range(6)]
    a = MIXERS.build("odm")
    a.observe(batches[0][0], batches[0][1], np.zeros(5, int), step=1)  # pending: before any decision
    b = MIXERS.build("odm")
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m.proportions(make_ctx(**MIX))
        for t, (d, loss) in enumerate(batches[1:4]):
            m.observe(d, loss, np.zeros(5, int), step=t + 2)
    c = MIXERS.build("odm")
    c.load_state_dict(a.state_dict())
    for m in (a, b, c):
        m.observe(batches[4][0], batches[4][1], np.zeros(5, int), step=6)
    pa, pb, pc = (m.proportions(make_ctx(**MIX)) for m in (a, b, c))
    np.testing.assert_array_equal(pa, pb)
    np.testing.assert_array_equal(pa, pc)
    with pytest.raises(FlexfeedError):
        MIXERS.build("odm", {"alpha": 1.0})


def test_registry_aliases_and_unknown_names():
    assert MIXERS.resolve("exp3") is MIXERS.resolve("odm")
    with pytest.raises(FlexfeedError) as exc:
        MIXERS.build("doremy")
    assert_hint(exc, "doremi")


# ---------------------------------------------------------------- with the scheduler

@pytest.mark.parametrize("name,args", [("doremi", {"reweight_eta": 3.0}), ("odm", {"alpha": 0.5}),
                                       ("random", {}), ("static", {"proportions": "stratified"})])
def test_mixer_in_the_scheduler_resumes_to_the_same_plans(name, args):
    import copy

    from pipeline.plan import Windows, rng_for
    from pipeline.scheduler import Scheduler

    domain_ids = np.repeat([0, 1, 2], [30, 20, 10])
    ref = np.where(domain_ids == 2, 1.0, 2.0)  # math's reference is far better: large excess there
    windows = Windows(global_batch=6, max_steps=20, warmup_step=4, update_step=2, update_times=None)

    def scheduler():
        def make_context(step, w):
            return DecisionContext(step=step, num_rows=len(domain_ids), domain_ids=domain_ids, domain_names=NAMES,
                                   rng=rng_for(0, 99, w), signals=InMemorySignals(train={"ref_loss": ref}))
        return Scheduler(kind="mix", strategy=MIXERS.build(name, args), windows=windows, domain_ids=domain_ids,
                         domain_names=NAMES, seed=0, make_context=make_context)

    def train(s, windows_range):
        plans = []
        for w in windows_range:
            plan = s.plan(w)
            plans.append(plan)
            for i in range(windows.num_steps(w)):
                rows = plan[i * 6:(i + 1) * 6]
                losses = 2.0 + 0.01 * rows  # a synthetic model: loss depends on the row only
                s.strategy.observe(domain_ids[rows], losses, rows, windows.start_step(w) + i)
        return plans

    full = train(scheduler(), range(windows.num_windows()))
    first = scheduler()
    head = train(first, range(4))
    resumed = scheduler()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    tail = train(resumed, range(4, windows.num_windows()))
    for a, b in zip(full, head + tail):
        np.testing.assert_array_equal(a, b)
    props = [d["proportions"] for d in resumed.decisions if d["decision"]]
    assert props and all(math.isclose(sum(p.values()), 1.0) for p in props)
    if name == "doremi":  # the domain with the largest excess over its reference gains weight
        alpha = [d["doremi/alpha"] for d in resumed.decisions if "doremi/alpha" in d]
        assert alpha[-1][2] > alpha[-1][0]


def test_doremi_keeps_the_last_excess_of_a_domain_that_got_no_rows(make_ctx):
    """A domain absent from a window must not read as 'no excess' (that would lock it out)."""
    import numpy as np

    from pipeline.strategies import MIXERS
    from pipeline.strategies.mixers.doremi import doremi_step

    mixer = MIXERS.build("doremi", {"reweight_eta": 1.0, "reweight_eps": 0.0})
    ref = np.zeros(4)
    ctx = make_ctx(domain_ids=[0, 0, 1, 1], domain_names=["x", "y"], train={"ref_loss": ref})
    mixer.observe(np.array([0, 1]), np.array([1.0, 2.0]), np.array([0, 2]), step=0)
    mixer.proportions(ctx)
    a1 = mixer.alpha.copy()
    np.testing.assert_allclose(a1, doremi_step(np.array([0.5, 0.5]), np.array([1.0, 2.0]), 1.0, 0.0))
    mixer.observe(np.array([0]), np.array([0.5]), np.array([1]), step=1)  # domain y got no rows
    mixer.proportions(ctx)
    a2 = mixer.alpha.copy()
    np.testing.assert_allclose(a2, doremi_step(a1, np.array([0.5, 2.0]), 1.0, 0.0))
    state = mixer.state_dict()
    again = MIXERS.build("doremi", {"reweight_eta": 1.0, "reweight_eps": 0.0})
    again.load_state_dict(state)
    np.testing.assert_array_equal(again.last_excess, mixer.last_excess)


def test_odm_importance_weights_use_the_proportions_a_batch_was_drawn_with(make_ctx):
    """The trainer tells the mixer which proportions drew each batch; ODM divides by those."""
    import numpy as np

    from pipeline.strategies import MIXERS

    ctx = make_ctx(domain_ids=[0, 0, 1, 1], domain_names=["x", "y"])
    a = MIXERS.build("odm", {"alpha": 0.5})
    b = MIXERS.build("odm", {"alpha": 0.5})
    a.proportions(ctx)
    b.proportions(ctx)
    b.drawn_with = np.array([0.8, 0.2])
    batch = (np.array([0, 1]), np.array([1.0, 1.0]), np.array([0, 2]))
    a.observe(*batch, step=0)
    b.observe(*batch, step=0)
    np.testing.assert_allclose(a.r_hat, 0.5 * np.array([1 / 0.5, 1 / 0.5]))
    np.testing.assert_allclose(b.r_hat, 0.5 * np.array([1 / 0.8, 1 / 0.2]))
