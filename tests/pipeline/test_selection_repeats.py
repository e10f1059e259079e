"""Per-window selection without repeats inside a pass (consume_once), select_fraction, and resuming both.

The signals rank the rows by id: row i's feature is at angle i * (pi / 2) / N from the single target's, so
its cosine with the target falls as i grows and `less` and `near` both rank rows 0, 1, 2, ... The
expected rows below follow from that ranking by hand, not from the code under test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import TrainerCallback

from pipeline.config import load_config
from pipeline.plan import Windows
from pipeline.scheduler import PlanStage, Scheduler, configured_stages
from pipeline.state_io import load_state, save_state
from pipeline.strategies import SELECTORS, DecisionContext, InMemorySignals
from pipeline.train import train
from store.errors import FlexfeedError

N = 1000
BATCH = 8  # 10 steps x 8 = 80 rows a window
DOMAINS = np.zeros(N, dtype=np.int64)
ANGLES = np.arange(N) * (np.pi / 2) / N
FEATURES = np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1)  # cosine with the target [1, 0] falls with the id
SIGNALS = InMemorySignals({"grads": FEATURES, "embed": FEATURES},
                          {"grads_sgd": np.array([[1.0, 0.0]]), "embed": np.array([[1.0, 0.0]])})


class Counting:
    """A selector wrapper counting its calls (how often the stage fired)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.name, self.consume_once = inner.name, inner.consume_once

    def select(self, ctx, n):
        self.calls += 1
        return self.inner.select(ctx, n)

    def needs(self):
        return self.inner.needs()

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _scheduler(stage: PlanStage) -> Scheduler:
    """100 steps: a uniform warm-up window (steps 0-9), then 9 decision windows of 80 rows (steps 10, ..., 90)."""
    windows = Windows(global_batch=BATCH, max_steps=100, warmup_step=10, update_step=10, update_times=None)

    def ctx(step, w):
        return DecisionContext(step=step, num_rows=N, domain_ids=DOMAINS, domain_names=["a"],
                               rng=np.random.default_rng([7, w]), signals=SIGNALS)

    return Scheduler(kind="select", stages=[stage], windows=windows, domain_ids=DOMAINS, domain_names=["a"],
                     seed=3, make_context=ctx)


def _plans(s: Scheduler, windows=range(10)) -> list[np.ndarray]:
    return [s.plan(w) for w in windows]


@pytest.mark.parametrize("component", ["less", "near"])
def test_fixed_scores_serve_the_next_best_rows_each_window(component):
    s = _scheduler(PlanStage("select", SELECTORS.build(component)))  # consume_once by default
    plans = _plans(s)
    decided = np.concatenate(plans[1:])
    assert decided.size == 720 and np.unique(decided).size == 720  # 9 windows x 80 distinct rows
    for k in range(1, 10):  # window k takes ranks 80(k-1) .. 80k-1
        assert sorted(plans[k].tolist()) == list(range(80 * (k - 1), 80 * k))
    records = [d for d in s.decisions if d["decision"]]
    assert [d["already_seen"] for d in records] == [len(set(range(80 * (k - 1), 80 * k)) & set(plans[0].tolist()))
                                                    for k in range(1, 10)]  # only the warm-up's uniform rows


@pytest.mark.parametrize("component", ["less", "near"])
def test_allow_repeats_keeps_the_old_behaviour(component):
    s = _scheduler(PlanStage("select", SELECTORS.build(component), consume_once=False))
    plans = _plans(s)
    decided = np.concatenate(plans[1:])
    assert np.unique(decided).tolist() == list(range(80))  # the same top 80 rows, 9 times
    records = [d for d in s.decisions if d["decision"]]
    assert [d["already_seen"] for d in records][1:] == [80] * 8


def test_a_pass_ends_with_its_last_rows_then_opens_the_next():
    # 1000 rows, 80 a window: after 12 windows 40 rows are left; window 13 takes them and the 40 best of a new pass
    windows = Windows(global_batch=BATCH, max_steps=10 + 14 * 10, warmup_step=10, update_step=10, update_times=None)

    def ctx(step, w):
        return DecisionContext(step=step, num_rows=N, domain_ids=DOMAINS, domain_names=["a"],
                               rng=np.random.default_rng([7, w]), signals=SIGNALS)

    s = Scheduler(kind="select", stages=[PlanStage("select", SELECTORS.build("less"))], windows=windows,
                  domain_ids=DOMAINS, domain_names=["a"], seed=3, make_context=ctx)
    plans = [s.plan(w) for w in range(15)]
    assert sorted(np.concatenate(plans[1:13]).tolist()) == list(range(960))
    assert sorted(plans[13].tolist()) == [*range(40), *range(960, 1000)]
    assert sorted(plans[14].tolist()) == list(range(40, 120))  # the new pass goes on from rank 40
    assert [d.get("pass") for d in s.decisions[12:15]] == [0, 1, 1]


def test_select_fraction_serves_the_top_rows_once_per_pass_reshuffled():
    less = Counting(SELECTORS.build("less"))
    s = _scheduler(PlanStage("select", less, select_fraction=0.1, every=10**9))
    plans = _plans(s)
    assert less.calls == 1  # selected once
    served = np.concatenate(plans[1:])  # 720 samples = 7 passes over the top 100, and 20 rows of the 8th
    passes = [served[i:i + 100] for i in range(0, 700, 100)]
    assert all(sorted(p.tolist()) == list(range(100)) for p in passes)  # the top-100 by score, each once a pass
    assert passes[0].tolist() != passes[1].tolist()  # reshuffled between passes
    assert len(set(served[700:].tolist())) == 20 and set(served[700:]) <= set(range(100))
    assert [d["decision"] for d in s.decisions] == [False, True] + [False] * 8


@pytest.mark.parametrize("stage", [
    lambda: PlanStage("select", SELECTORS.build("near")),
    lambda: PlanStage("select", SELECTORS.build("less"), select_fraction=0.1, every=10**9),
], ids=["consume_once", "select_fraction"])
def test_resume_in_the_middle_of_a_pass_continues_it(stage, tmp_path):
    full = _plans(_scheduler(stage()))
    cut = _scheduler(stage())
    _plans(cut, range(5))  # windows 1-4: 320 rows, mid-pass for both
    save_state(tmp_path, cut.state_dict())
    resumed = _scheduler(stage())
    resumed.load_state_dict(load_state(tmp_path))
    after = _plans(resumed, range(5, 10))
    assert [p.tolist() for p in after] == [p.tolist() for p in full[5:]]
    assert resumed.decisions[-1]["rows_seen"] == len(set(np.concatenate(full).tolist()))


@pytest.fixture
def cfg_path(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: m\ndataset: a\noutput_dir: out\n")
    return path


def test_config_keys_choose_the_rule(cfg_path):
    def stage(*overrides):
        return configured_stages(load_config(cfg_path, ["train_type=select", *overrides]), seed=0)[0]

    assert stage("component=near").consume_once and stage("component=less").consume_once
    assert not stage("component=random").consume_once
    assert not stage("component=near", "allow_repeats=true").consume_once
    assert stage("component=random", "allow_repeats=false").consume_once
    frac = stage("component=less", "select_fraction=0.05")
    assert frac.select_fraction == 0.05 and frac.every >= 10**9  # selected once
    plan = load_config(cfg_path, ["train_type=plan", "plan=[{family: select, component: near, select_fraction: 0.2}]"])
    assert configured_stages(plan, seed=0)[0].every >= 10**9


@pytest.mark.parametrize("overrides,words", [
    (["train_type=mix", "component=static", "allow_repeats=true"], "allow_repeats is read by a select stage"),
    (["train_type=select", "component=less", "select_fraction=0.1", "allow_repeats=false"], "both set"),
    (["train_type=select", "component=less", "select_fraction=0"], "select_fraction"),
    (["train_type=plan", "plan=[{family: select, component: loss, mode: filter, select_fraction: 0.1}]"],
     "mode filter"),
])
def test_misplaced_selection_keys_are_refused(cfg_path, overrides, words):
    with pytest.raises(FlexfeedError, match=words):
        load_config(cfg_path, overrides)


def test_the_report_counts_rows_seen_before(tmp_path):
    from pipeline.plan_record import repeats
    from pipeline.report import write_report
    from pipeline.run_files import load_run

    run = tmp_path / "sel"
    run.mkdir()
    (run / "flexfeed_run.json").write_text(json.dumps({"train_type": "select", "component": "near", "steps": 30,
                                                       "global_batch": 8, "domains": ["a"]}))
    # warm-up: 80 new rows; decision 1: 80 rows, 10 seen in the warm-up; decision 2: the same 80 rows again
    records = [{"window": 0, "step": 0, "decision": False, "per_domain": {"a": 80}, "already_seen": 0, "rows_seen": 80},
               {"window": 1, "step": 10, "decision": True, "per_domain": {"a": 80}, "already_seen": 10,
                "rows_seen": 150},
               {"window": 2, "step": 20, "decision": True, "per_domain": {"a": 80}, "already_seen": 80,
                "rows_seen": 150}]
    (run / "flexfeed_decisions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    r = repeats(load_run(run))
    assert (r.decisions, r.already_seen, r.rows, r.rows_seen) == (2, 90, 160, 150)
    assert "90 of 160 at 2 decisions; 150 distinct rows" in write_report([str(run)]).read_text()


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_a_resumed_training_run_continues_the_pass(run_cfg, tmp_path, seen_rows):
    """near on the tiny run (64 rows, 4 a step): decisions at steps 2, 5, ..., 17 take 12 rows each."""
    path, _ = run_cfg
    common = ["train_type=select", "component=near", "warmup_step=2", "update_step=3", "max_steps=20",
              "save_steps=9"]
    train(load_config(path, [f"output_dir={tmp_path / 'full'}", *common]))
    full = list(seen_rows)
    decided = [d for d in map(json.loads, (tmp_path / "full" / "flexfeed_decisions.jsonl").read_text().splitlines())
               if d["decision"]]
    rows = [sorted({r for b in full[d["step"]:d["step"] + 3] for r in b}) for d in decided]
    assert [len(r) for r in rows] == [12] * 6
    assert len(set().union(*rows[:5])) == 60  # five windows of the first pass: 60 distinct rows
    assert len(set(rows[5]) - set().union(*rows[:5])) == 4  # the 4 rows left, then 8 of the next pass
    assert [d.get("pass") for d in decided] == [0, 0, 0, 0, 0, 1]
    seen_rows.clear()
    train(load_config(path, [f"output_dir={tmp_path / 'cut'}", *common]), extra_callbacks=[StopAt(9)])
    seen_rows.clear()
    train(load_config(path, [f"output_dir={tmp_path / 'cut'}", *common,
                             f"resume_from_checkpoint={tmp_path / 'cut' / 'checkpoint-9'}"]))
    assert seen_rows == full[9:]
