"""Window arithmetic, seeded draws and the scheduler's plans (pure numpy, no model)."""

import numpy as np
import pytest

from pipeline.plan import Windows, draw_by_proportions, permutation_slice, split_counts
from pipeline.scheduler import Scheduler
from pipeline.strategies import DecisionContext, InMemorySignals, Mixer, Selection, Selector


def test_windows_cover_the_run_exactly():
    w = Windows(global_batch=4, max_steps=23, warmup_step=5, update_step=6, update_times=None)
    steps = [w.num_steps(i) for i in range(w.num_windows())]
    assert steps == [5, 6, 6, 6]
    assert sum(steps) == 23
    assert w.decision_steps() == [5, 11, 17]
    limited = Windows(global_batch=4, max_steps=23, warmup_step=5, update_step=6, update_times=2)
    assert limited.decision_steps() == [5, 11]
    assert limited.num_samples(3) == 24


def test_permutation_slice_is_an_endless_sequence_of_permutations():
    whole = permutation_slice(10, seed=3, start=0, count=30)
    for e in range(3):
        assert sorted(whole[10 * e : 10 * e + 10]) == list(range(10))
    # any slice equals the same part of the whole stream: resumable from a counter alone
    assert np.array_equal(permutation_slice(10, 3, 7, 15), whole[7:22])
    assert not np.array_equal(permutation_slice(10, 4, 0, 10), whole[:10])


def test_split_counts_largest_remainder():
    assert split_counts(np.array([0.5, 0.3, 0.2]), 10).tolist() == [5, 3, 2]
    c = split_counts(np.array([1, 1, 1]), 10)
    assert c.sum() == 10 and c.max() - c.min() <= 1


def test_draw_by_proportions_without_replacement_within_window():
    domain_rows = [np.arange(0, 50), np.arange(50, 60)]
    plan, cursors = draw_by_proportions(np.array([0.5, 0.5]), 20, domain_rows, np.zeros(2, int), seed=0, window=1)
    assert len(plan) == 20 and len(set(plan.tolist())) == 20
    assert (plan < 50).sum() == 10 and (plan >= 50).sum() == 10
    assert cursors.tolist() == [10, 10]
    # the small domain is exhausted after 10 rows: the next window starts its next permutation
    plan2, cursors2 = draw_by_proportions(np.array([0.5, 0.5]), 20, domain_rows, cursors, seed=0, window=2)
    assert sorted(plan2[plan2 >= 50].tolist()) == list(range(50, 60))
    assert cursors2.tolist() == [20, 20]


class TopRows(Selector):
    """Picks the rows with the largest `score` signal (known answer)."""

    def select(self, ctx, num_samples):
        score = ctx.signals.get("score")
        self.calls = getattr(self, "calls", 0) + 1
        return Selection(np.argsort(-score, kind="stable")[:num_samples], score, {"calls": self.calls})

    def state_dict(self):
        return {"calls": getattr(self, "calls", 0)}

    def load_state_dict(self, state):
        self.calls = state.get("calls", 0)


class FavourLast(Mixer):
    def proportions(self, ctx):
        p = np.ones(ctx.num_domains)
        p[-1] = 3.0
        return p / p.sum()


def _scheduler(kind, strategy, n=40, max_steps=10):
    domains = np.repeat([0, 1], n // 2)
    windows = Windows(global_batch=4, max_steps=max_steps, warmup_step=2, update_step=3, update_times=2)
    score = np.arange(n, dtype=float)

    def ctx(step, w):
        return DecisionContext(step=step, num_rows=n, domain_ids=domains, domain_names=["a", "b"],
                               rng=np.random.default_rng([0, w]), signals=InMemorySignals({"score": score}))

    return Scheduler(kind=kind, strategy=strategy, windows=windows, domain_ids=domains, domain_names=["a", "b"],
                     seed=0, make_context=ctx)


def test_selector_plan_uses_selection_and_replays_after_restore():
    s = _scheduler("select", TopRows())
    plans = [s.plan(w) for w in range(s.windows.num_windows())]
    assert len(plans[0]) == 8  # warm-up window: uniform
    assert sorted(plans[1].tolist()) == list(range(28, 40))  # top-12 rows by score
    assert set(plans[3].tolist()) <= set(range(28, 40))  # after update_times: the last selection again
    assert [d["decision"] for d in s.decisions] == [False, True, True, False]
    state = s.state_dict()
    again = _scheduler("select", TopRows())
    again.load_state_dict(state)
    for w, p in enumerate(plans):
        assert np.array_equal(again.plan(w), p)
    assert again.strategy.calls == 2  # replayed, not decided again


def test_mixer_plan_follows_proportions():
    s = _scheduler("mix", FavourLast(), n=400, max_steps=30)
    plan = s.plan(1)
    assert len(plan) == 12
    assert (plan >= 200).sum() == 9  # 3/4 of the window from domain b
    assert s.decisions[-1]["proportions"] == pytest.approx({"a": 0.25, "b": 0.75})


def test_selector_returning_bad_rows_is_a_clear_error():
    from store.errors import FlexfeedError

    class Bad(Selector):
        def select(self, ctx, num_samples):
            return Selection(np.array([10_000]))

    s = _scheduler("select", Bad())
    s.plan(0)
    with pytest.raises(FlexfeedError, match="outside"):
        s.plan(1)


def test_window_of_step_and_recorded_proportions():
    w = Windows(global_batch=4, max_steps=23, warmup_step=5, update_step=6, update_times=None)
    assert [w.window_of(s) for s in (0, 4, 5, 10, 11, 22)] == [0, 0, 1, 1, 2, 3]
    s = _scheduler("mix", FavourLast(), n=400, max_steps=30)
    s.plan(0)
    s.plan(1)
    assert s.proportions_of_window(0).tolist() == [0.5, 0.5]
    assert s.proportions_of_window(1).tolist() == [0.25, 0.75]
    assert s.proportions_of_window(2) is None
