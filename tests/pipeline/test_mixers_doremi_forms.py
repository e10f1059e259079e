"""DoReMi measures every domain: the reference-mixture draw with alpha/q loss weights (its own form, the default),
and the sampling form's random counts; expected numbers come from the formulas, iterated here by hand."""

from __future__ import annotations

import numpy as np

from pipeline.plan import Windows, rng_for
from pipeline.scheduler import Scheduler
from pipeline.strategies import MIXERS, DecisionContext, InMemorySignals

NAMES = ["web", "code", "books"]
DOMAINS = np.repeat([0, 1, 2], 40)
BATCH = 8


def _scheduler(mixer, max_steps: int, init=None) -> Scheduler:
    """A mix run with one decision per step (update_step 1, DoReMi's setting); reference losses are 0."""
    windows = Windows(global_batch=BATCH, max_steps=max_steps, warmup_step=0, update_step=1, update_times=None)
    signals = InMemorySignals(train={"ref_loss": np.zeros(len(DOMAINS))})

    def context(step, w):
        return DecisionContext(step=step, num_rows=len(DOMAINS), domain_ids=DOMAINS, domain_names=NAMES,
                               rng=rng_for(0, 99, w), signals=signals, init_proportions=init)

    return Scheduler(kind="mix", strategy=mixer, windows=windows, domain_ids=DOMAINS, domain_names=NAMES, seed=0,
                     make_context=context, init_proportions=init)


def _with_alpha(mixer, alpha):
    """The mixer as if earlier updates had brought alpha to the given weights."""
    state = mixer.state_dict()
    state.update(alpha=np.array(alpha), alpha_sum=np.zeros(len(alpha)))
    mixer.load_state_dict(state)
    return mixer


def _train(sched, excess_at):
    """Each step trains one window; a row's loss is its reference (0) plus its domain's true excess then."""
    counts, weights = [], []
    for w in range(1, sched.windows.num_windows()):
        step = sched.windows.start_step(w)
        rows = sched.plan(w)
        dom = DOMAINS[rows]
        counts.append(np.bincount(dom, minlength=3))
        weights.append((dom, sched.strategy.weights(np.ones(len(rows)), rows, dom, step)))
        sched.strategy.observe(dom, np.asarray(excess_at(step))[dom], rows, step)
    return np.array(counts), weights


def _formula(alpha, excesses, eta=1.0, eps=1e-3):
    """DoReMi's update iterated by hand: alpha <- (1-eps) normalise(alpha exp(eta excess)) + eps/K."""
    out = []
    for e in excesses:
        p = np.asarray(alpha) * np.exp(eta * np.asarray(e))
        alpha = (1 - eps) * p / p.sum() + eps / len(p)
        out.append(alpha)
    return np.array(out)


def test_a_low_weight_domain_is_measured_at_every_update_and_recovers():
    # alpha = [0.6, 0.36, 0.04], batch 8: drawing by alpha with exact quotas gives [5, 3, 0] in every window,
    # so books would never be measured again. DoReMi's form draws from the reference mixture instead.
    mixer = _with_alpha(MIXERS.build("doremi", {"reweight_eta": 1.0, "reweight_eps": 1e-3}), [0.6, 0.36, 0.04])
    sched = _scheduler(mixer, max_steps=9)
    # books' true excess is 0 for three steps, then rises to 2 nats while its weight is small
    true_excess = lambda step: [0.3, 0.3, 0.0] if step < 3 else [0.3, 0.3, 2.0]  # noqa: E731
    counts, weights = _train(sched, true_excess)
    np.testing.assert_array_equal(counts, np.tile([3, 3, 2], (9, 1)))  # uniform 8/3 each, largest remainder
    decided = [d for d in sched.decisions if "doremi/alpha" in d]
    assert len(decided) == 8 and all(d["doremi/counts"][2] == 2 for d in decided)  # measured at every update
    # every update saw every domain, so the measured excess is the true one of the window before
    want = _formula([0.6, 0.36, 0.04], [true_excess(s) for s in range(8)])
    np.testing.assert_allclose([d["doremi/alpha"] for d in decided], want, rtol=1e-12)
    assert want[2][2] < 0.04 and want[-1][2] > 0.9  # shrinks while its excess is 0, then recovers
    # the proportions drawn with stay the reference's; each loss is weighted alpha_t / (1/3)
    assert all(d["proportions"] == {n: 1 / 3 for n in NAMES} for d in decided)
    dom, w = weights[-1]
    np.testing.assert_allclose(w, want[-1][dom] * 3)


def test_reweight_draws_the_configured_initial_mixture_and_weights_alpha_over_it():
    q = np.array([0.5, 0.25, 0.25])
    mixer = _with_alpha(MIXERS.build("doremi", {"reweight_eta": 1.0, "reweight_eps": 0.0}), [0.2, 0.3, 0.5])
    sched = _scheduler(mixer, max_steps=3, init=q)
    counts, weights = _train(sched, lambda step: [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(counts, np.tile([4, 2, 2], (3, 1)))  # 8 x [0.5, 0.25, 0.25]
    # step 1's loss weights: alpha after one update on excess [1, 0, 0], over q
    alpha1 = _formula([0.2, 0.3, 0.5], [[1.0, 0.0, 0.0]], eps=0.0)[0]
    dom, w = weights[1]
    np.testing.assert_allclose(w, alpha1[dom] / q[dom])
    # mean_i(w_i l_i) over the window is sum_k alpha_k * mean loss_k: 4 web rows at w = alpha_web / 0.5, ...
    losses = np.array([1.0, 2.0, 3.0])[dom]
    np.testing.assert_allclose(np.mean(w * losses), alpha1 @ [1.0, 2.0, 3.0])


def test_sampling_form_draws_random_counts_with_expected_alpha_times_batch():
    alpha = np.array([0.6, 0.36, 0.04])
    mixer = _with_alpha(MIXERS.build("doremi", {"form": "sample", "reweight_eps": 0.0}), alpha)
    mixer.batch_samples = BATCH  # as after the first observed batch
    sched = _scheduler(mixer, max_steps=400)
    counts, weights = _train(sched, lambda step: [0.0, 0.0, 0.0])  # no excess: alpha stays put
    assert len({tuple(c) for c in counts}) > 3  # the counts vary from window to window
    # mean count alpha_k * 8 = [4.8, 2.88, 0.32]; standard error sqrt(8 alpha (1 - alpha) / 400) <= 0.07
    np.testing.assert_allclose(counts.mean(axis=0), alpha * BATCH, atol=0.25)
    # books shows up in about 1 - 0.96^8 = 28% of the windows (never, with exact quotas [5, 3, 0])
    assert 0.2 < np.mean(counts[:, 2] > 0) < 0.36
    assert all(np.allclose(w, 1.0) for _, w in weights)  # drawn with the alpha it is weighted by


def test_sampling_form_recovers_a_low_weight_domain_whose_excess_rises():
    mixer = _with_alpha(MIXERS.build("doremi", {"form": "sample"}), [0.6, 0.36, 0.04])
    mixer.batch_samples = BATCH
    sched = _scheduler(mixer, max_steps=40)
    _train(sched, lambda step: [0.3, 0.3, 2.0])
    assert mixer.alpha[2] > 0.5


def test_sampling_form_importance_weight_of_a_batch_drawn_before_an_update():
    # a data loader fetches ahead: a batch of the window drawn at step 4 is trained after the step-5 update
    mixer = _with_alpha(MIXERS.build("doremi", {"form": "sample", "reweight_eps": 0.0}), [0.5, 0.5])
    signals = InMemorySignals(train={"ref_loss": np.zeros(4)})
    ctx = lambda step: DecisionContext(step=step, num_rows=4, domain_ids=np.array([0, 0, 1, 1]),  # noqa: E731
                                       domain_names=["x", "y"], rng=np.random.default_rng(step), signals=signals)
    mixer.proportions(ctx(4))  # drawn from [0.5, 0.5]
    mixer.observe(np.array([0, 1]), np.array([1.0, 0.0]), np.array([0, 2]), 4)
    mixer.proportions(ctx(5))  # alpha -> e/(e+1), 1/(e+1)
    e = np.e
    np.testing.assert_allclose(mixer.weights(np.ones(2), None, np.array([0, 1]), 4),
                               [(e / (e + 1)) / 0.5, (1 / (e + 1)) / 0.5])
    np.testing.assert_allclose(mixer.weights(np.ones(2), None, np.array([0, 1]), 5), [1.0, 1.0])
    again = MIXERS.build("doremi", {"form": "sample"})
    again.load_state_dict(mixer.state_dict())
    np.testing.assert_allclose(again.weights(np.ones(2), None, np.array([0, 1]), 4),
                               mixer.weights(np.ones(2), None, np.array([0, 1]), 4))
