"""The data plan of a run: a chain of stages turned into the row ids of each window, and what resuming needs.

Index-space stages run in the fixed order select -> mix -> reorder: a `select` stage in `filter` mode
shrinks the pool of rows the later stages see; exactly one stage takes the window's budget (a `select`
in `draw` mode, a `mix`, or a `reorder` with no budget stage before it, which then orders the pool over
the rest of the run), else rows are drawn uniformly from the pool; a `reorder` after the budget stage
orders each window's rows. Loss-space stages (`weight`) multiply their per-sample weights in the
trainer. A stage fires at a decision window once `warmup_step` is reached and `every` steps have
passed since it last fired; the others reuse what they decided last. A one-family `train_type` is a
one-stage plan with the same decisions and batches as before plans existed (tested).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from store.errors import FlexfeedError

from .config import RunConfig
from .config.groups import MAX_STEPS, TRAIN_TYPES
from .plan import Windows, draw_by_proportions, permutation_slice, rng_for
from .plan_record import step_quantiles
from .strategies import DecisionContext, Strategy, registry_for
from .strategies.pool_view import pool_context
from .strategies.reorders.stream import CurriculumStream

KINDS = TRAIN_TYPES  # one list, defined with the config's train_type
INDEX_ORDER = ("select", "mix", "reorder")
SELECTION_STREAM = 1_000_000
"""Seeds the shuffles of a select_fraction selection's passes (plus the window it was chosen at)."""


@dataclass
class PlanStage:
    """One stage of the data plan: a family's strategy and when it fires."""

    family: str
    strategy: Strategy
    warmup_step: int = 0
    """No decision before this step (weights apply from it)."""
    every: int = 1
    """Steps between two firings (at the decision windows)."""
    mode: str = "draw"
    """select only: `draw` takes the window's budget, `filter` keeps `keep_ratio` of the pool."""
    keep_ratio: float = 1.0
    select_fraction: float | None = None
    """select in mode draw: the share of the pool selected when the stage fires, then served in passes."""
    consume_once: bool | None = None
    """select in mode draw: each decision takes rows not yet served in the current pass over the pool
    (None: the selector's default, `Selector.consume_once`)."""
    last_step: int | None = None

    def __post_init__(self):
        if self.consume_once is None:
            self.consume_once = bool(getattr(self.strategy, "consume_once", False))

    def due(self, step: int) -> bool:
        """Fires at a decision window starting at `step`."""
        return step >= self.warmup_step and (self.last_step is None or step - self.last_step >= self.every)

    @property
    def label(self) -> str:
        return f"{self.family}:{self.strategy.name}" + (f"({self.mode})" if self.family == "select" else "")


def configured_stages(cfg: RunConfig, seed: int) -> list[PlanStage]:
    """The config's data plan: its enabled `plan:` stages, one stage for a one-family train_type, none if static."""
    kind = cfg.flex.train_type
    if kind == "static":
        return []
    flex = cfg.flex
    seed = seed if flex.component_seed is None else flex.component_seed  # e.g. a k-means seed, keying its clustering
    if kind != "plan":
        strategy = registry_for(kind).build(flex.component, flex.component_args, seed=seed)
        # index-space kinds wait for warmup_step through the windows; a weighter, which acts on every
        # step's loss, waits through its own stage (DataFlex's weight trainer: no weights before warmup_step)
        # select_fraction selects once (LESS); the config refuses both keys outside train_type select
        return [PlanStage(kind, strategy, warmup_step=flex.warmup_step if kind == "weight" else 0,
                          every=MAX_STEPS if flex.select_fraction is not None else 1,
                          select_fraction=flex.select_fraction, consume_once=_consume_once(flex.allow_repeats))]
    return [PlanStage(s.family, registry_for(s.family).build(s.component, s.component_args, seed=seed),
                      mode=s.mode, keep_ratio=s.keep_ratio,
                      warmup_step=flex.warmup_step if s.warmup_step is None else s.warmup_step,
                      every=s.every if s.every is not None else
                      MAX_STEPS if s.select_fraction is not None else flex.update_step,
                      select_fraction=s.select_fraction, consume_once=_consume_once(s.allow_repeats))
            for s in flex.plan if s.enabled]


def _consume_once(allow_repeats: bool | None) -> bool | None:
    return None if allow_repeats is None else not allow_repeats


def check_stages(stages: list[PlanStage]) -> PlanStage | None:
    """Refuse a plan out of order or with two budget stages; returns the budget stage (None: uniform draw)."""
    index = [s for s in stages if s.family in INDEX_ORDER]
    ranks = [INDEX_ORDER.index(s.family) for s in index]
    if ranks != sorted(ranks):
        raise FlexfeedError(f"data plan stages {[s.label for s in index]} are out of order",
                            "write index-space stages in the order select -> mix -> reorder (weight stages anywhere)")
    takers = [s for s in index if (s.family == "select" and s.mode == "draw")
              or (s.family == "mix" and not s.strategy.loss_space)]
    if len(takers) > 1:
        raise FlexfeedError(f"two stages take the window's budget: {[s.label for s in takers]}",
                            "keep one `select` in mode draw or one `mix`; make the other selects mode: filter")
    reorders = [s for s in index if s.family == "reorder"]
    if len(reorders) > 1:
        raise FlexfeedError(f"{len(reorders)} reorder stages in one plan", "keep one reorder stage")
    if not takers and reorders:
        return reorders[0]
    return takers[0] if takers else None


class Scheduler:
    """Owns the plans (row ids per window) of a run; decisions happen when a window is first needed."""

    def __init__(self, *, kind: str, strategy: Strategy | None = None, windows: Windows, domain_ids: np.ndarray,
                 domain_names: list[str], seed: int,
                 make_context: Callable[[int, int], DecisionContext] | None = None,
                 init_proportions: np.ndarray | None = None,
                 on_decision: Callable[[dict], None] | None = None, run_id: str = "",
                 stages: list[PlanStage] | None = None):
        if kind not in KINDS:
            raise FlexfeedError(f"unknown train_type {kind!r}", f"use one of {', '.join(KINDS)}")
        if stages is None:  # a one-family train_type: one stage firing at every decision
            stages = [] if kind == "static" or strategy is None else [
                PlanStage(kind, strategy, warmup_step=0, every=1)]
        self.kind = kind
        self.stages = stages
        self.budget = check_stages(stages)
        self.strategy = stages[0].strategy if len(stages) == 1 else strategy
        # a reorder after the budget stage orders each window (one with no budget stage before it is the budget)
        self.window_reorder = next((s for s in stages if s.family == "reorder" and s is not self.budget), None)
        self.windows = windows
        self.domain_ids = np.asarray(domain_ids, dtype=np.int64)
        self.domain_names = list(domain_names)
        self.num_rows = len(self.domain_ids)
        self.seed = int(seed)
        self.make_context = make_context
        self.on_decision = on_decision
        k = len(self.domain_names)
        if init_proportions is None:
            init_proportions = np.full(k, 1.0 / k)
        self.init_proportions = _check_proportions(np.asarray(init_proportions, dtype=np.float64), k, "initial")
        # rows a mixer measures the model on and never trains on (dynamic_moe); seeded, so not checkpointed
        held = [s.strategy.held_out_rows(self.domain_ids, k) for s in stages if s.family == "mix"]
        self.held_out = np.unique(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
        # state (everything below goes into checkpoints)
        self.run_id = run_id  # keys the run's refreshed signals; a resumed run keeps its own
        self.plans: dict[int, np.ndarray] = {}
        self.cursors = np.zeros(k, dtype=np.int64)
        self.pool: np.ndarray | None = None
        self.kept: dict[int, np.ndarray] = {}  # per filter stage (plan position): the rows it kept when it last fired
        self.last_selection: np.ndarray | None = None
        self.last_proportions = self.init_proportions.copy()
        self.order_scores: np.ndarray | None = None  # a window reorder's last scores (all rows)
        self.stream = CurriculumStream(windows.max_steps * windows.global_batch)
        self.decisions: list[dict] = []
        self.served = np.zeros(self.num_rows, dtype=bool)  # consume_once: rows served in the current pass
        self.passes = 0  # consume_once: passes over the pool begun before the current one
        self.selection_cursor = 0  # select_fraction: samples served from last_selection since it was chosen
        self.selection_window = 0  # select_fraction: the window last_selection was chosen at (seeds its shuffles)
        self.seen = np.zeros(self.num_rows, dtype=bool)  # rows of every window planned so far (from the plans)

    # -- the stream -----------------------------------------------------------
    def plan(self, w: int) -> np.ndarray:
        """Row ids of window w (computed once, then replayed)."""
        if w not in self.plans:
            self.plans[w] = self._make_plan(w)
        return self.plans[w]

    def _offset(self, w: int) -> int:
        return self.windows.start_step(w) * self.windows.global_batch

    def stages_of(self, family: str) -> list[PlanStage]:
        return [s for s in self.stages if s.family == family]

    def loss_stages(self) -> list[PlanStage]:
        """Stages whose per-sample weights multiply in the loss: weighters and loss-space mixers."""
        return [s for s in self.stages if s.family == "weight" or (s.family == "mix" and s.strategy.loss_space)]

    def _make_plan(self, w: int) -> np.ndarray:
        n = self.windows.num_samples(w)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        step = self.windows.start_step(w)
        firing = [s for s in self.stages if self.windows.is_decision(w) and s.due(step)] if self.stages else []
        budget = self.budget
        if (budget is not None and budget.family == "reorder" and budget not in firing and not self.stream.ready
                and budget.due(step) and not any(n.live for n in budget.strategy.needs())):
            firing.append(budget)  # a curriculum on fixed scores needs no model state: it orders from its start
        record = {"window": w, "step": step, "kind": self.kind, "decision": bool(firing)}
        t0 = time.perf_counter()
        ctx = self.make_context(step, w) if firing else None
        pool_changed = self._filter(ctx, firing, record)
        plan = self._budget(ctx, firing, w, n, pool_changed, record)
        plan = self._window_order(ctx, firing, w, plan)
        served = self._served_scores(w, plan)
        if served is not None:  # what the report draws: the served rows' scores along the steps
            record["order"] = {"stage": served[0], "score_q": step_quantiles(served[1], self.windows.global_batch)}
        for stage in self.loss_stages():
            if stage in firing and stage.family == "weight":
                stage.strategy.update(ctx)
            elif stage in firing:  # a mixer in loss space: new domain weights, the draw is not its
                alpha = _check_proportions(np.asarray(stage.strategy.proportions(ctx), dtype=np.float64),
                                           len(self.domain_names), f"mixer {stage.strategy.name!r}")
                record["domain_weights"] = dict(zip(self.domain_names, map(float, alpha), strict=True))
        for stage in firing:
            stage.last_step = step
        if len(self.stages) > 1:
            record["stages"] = [{"stage": s.label, "fired": s in firing} for s in self.stages]
        counts = np.bincount(self.domain_ids[plan], minlength=len(self.domain_names))
        record["per_domain"] = dict(zip(self.domain_names, map(int, counts), strict=True))
        rows = np.unique(plan)  # what the report shows of repeats: this window's rows trained on before, and in all
        record["already_seen"] = int(self.seen[rows].sum())
        self.seen[rows] = True
        record["rows_seen"] = int(np.count_nonzero(self.seen))
        record["seconds"] = round(time.perf_counter() - t0, 4)
        if ctx is not None:
            record.update(_jsonable(ctx.log))
        self.decisions.append(record)
        if self.on_decision is not None:
            self.on_decision(record)
        return plan

    def _filter(self, ctx, firing: list[PlanStage], record: dict) -> bool:
        """The pool: every row, narrowed by each filter stage in order (re-selected when it fires, from what
        the filters before it kept); True when it changed."""
        if not any(s.mode == "filter" and s in firing for s in self.stages_of("select")):
            return False
        pool = None
        for i, stage in enumerate(self.stages):
            if stage.family != "select" or stage.mode != "filter":
                continue
            base = pool if pool is not None else self._all_rows()
            if stage in firing:
                keep = max(1, int(round(stage.keep_ratio * base.size)))
                sel = stage.strategy.select(pool_context(ctx, None if base.size == self.num_rows else base), keep)
                self.kept[i] = np.unique(base[_check_rows(sel.indices, base.size, stage.strategy.name)])
                record.setdefault("filter", []).append({"stage": stage.label, "pool": int(self.kept[i].size),
                                                        "info": _jsonable(sel.info)})
            if i in self.kept:
                pool = np.intersect1d(base, self.kept[i])
        changed = self.pool is None or pool is None or not np.array_equal(pool, self.pool)
        self.pool = pool
        return changed

    def _budget(self, ctx, firing: list[PlanStage], w: int, n: int, pool_changed: bool, record: dict) -> np.ndarray:
        budget = self.budget
        if budget is None:
            return self._budget_uniform(w, n)
        if budget.family == "mix":
            if budget in firing:
                p = budget.strategy.proportions(ctx)
                self.last_proportions = _check_proportions(np.asarray(p, dtype=np.float64), len(self.domain_names),
                                                           f"mixer {budget.strategy.name!r}")
            plan, self.cursors = draw_by_proportions(self.last_proportions, n, self._domain_rows(), self.cursors,
                                                     self.seed, w)
            record["proportions"] = dict(zip(self.domain_names, map(float, self.last_proportions), strict=True))
            return plan
        if budget.family == "reorder":
            if ctx is not None and (budget in firing or pool_changed):
                rows = self._pool_rows()
                self.stream.refill(self._offset(w), rows, lambda r: budget.strategy.scores(ctx, r),
                                   budget.strategy.order, self.seed)
                record["reorder"] = {"stage": budget.label, "rows": int(rows.size), "from_sample": self._offset(w)}
            if not self.stream.ready:  # before the reorder first fires: uniform, as a warm-up
                return self._budget_uniform(w, n)
            return self.stream.slice(self._offset(w), n)
        # select in draw mode
        decide = budget in firing
        if budget.select_fraction is not None:
            return self._draw_fraction(ctx, budget, decide, w, n, record)
        if decide:
            if budget.consume_once:
                self.last_selection, info = self._select_unserved(ctx, budget, n)
                record["pass"] = self.passes
            else:
                self.last_selection, info = self._select_among(ctx, budget, self._pool_rows(), n)
            record["info"] = _jsonable(info)
        if self.last_selection is None:  # warm-up window: uniform
            return self._budget_uniform(w, n)
        pool = self.last_selection
        local = permutation_slice(len(pool), self.seed, 0 if decide else self._offset(w), n, stream=500 + w)
        return pool[local]

    def _select_among(self, ctx, stage: PlanStage, rows: np.ndarray, n: int) -> tuple[np.ndarray, dict]:
        """The stage's selector asked for n of `rows` (row ids of the train set): the rows and its info."""
        sel = stage.strategy.select(pool_context(ctx, None if rows.size == self.num_rows else rows), n)
        return rows[_check_rows(sel.indices, rows.size, stage.strategy.name)], sel.info

    def _select_unserved(self, ctx, stage: PlanStage, n: int) -> tuple[np.ndarray, dict]:
        """consume_once: n rows chosen among the pool's rows not yet served in the current pass; when fewer are
        left, all of them, and the rest chosen from the others for the next pass."""
        base = self._pool_rows()
        if n >= base.size:  # the window holds the whole pool: the selector's own rule for more rows than it has
            self.served[:] = False
            return self._select_among(ctx, stage, base, n)
        fresh = base[~self.served[base]]
        if fresh.size >= n:
            rows, info = self._select_among(ctx, stage, fresh, n)
            self.served[rows] = True
            return rows, info
        rows, info = self._select_among(ctx, stage, base[self.served[base]], n - fresh.size)
        self.served[:] = False  # the pass ends with the rows it had left; `rows` open the next one
        self.served[rows] = True
        self.passes += 1
        rows = np.concatenate([fresh, rows])
        counts = np.bincount(self.domain_ids[rows], minlength=len(self.domain_names))
        info = {**info, "num_selected": int(rows.size), "num_unique": int(np.unique(rows).size),
                "selected_per_domain": dict(zip(self.domain_names, map(int, counts), strict=True)),
                "end_of_pass_rows": int(fresh.size)}
        return rows, info

    def _draw_fraction(self, ctx, stage: PlanStage, decide: bool, w: int, n: int, record: dict) -> np.ndarray:
        """select_fraction: the stage selects its share of the pool when it fires; the windows serve that
        selection in passes, each row once per pass, each pass in a new seeded order. Selecting the same rows
        again continues the pass; other rows start a first pass over them."""
        if decide:
            base = self._pool_rows()
            rows, info = self._select_among(ctx, stage, base, max(1, int(round(stage.select_fraction * base.size))))
            rows = np.unique(rows)
            if self.last_selection is None or not np.array_equal(rows, self.last_selection):
                self.last_selection, self.selection_cursor, self.selection_window = rows, 0, w
            record["info"] = _jsonable(info)
        if self.last_selection is None:  # warm-up window: uniform
            return self._budget_uniform(w, n)
        selection = self.last_selection
        record["pass"] = self.selection_cursor // selection.size
        local = permutation_slice(selection.size, self.seed, self.selection_cursor, n,
                                  stream=SELECTION_STREAM + self.selection_window)
        self.selection_cursor += n
        return selection[local]

    def _all_rows(self) -> np.ndarray:
        """Every row a window may serve: all but those a mixer holds out."""
        return np.setdiff1d(np.arange(self.num_rows), self.held_out) if self.held_out.size else np.arange(self.num_rows)

    def _pool_rows(self) -> np.ndarray:
        """The rows later stages see: the filtered pool, or every row a window may serve."""
        return self.pool if self.pool is not None else self._all_rows()

    def _budget_uniform(self, w: int, n: int) -> np.ndarray:
        if self.pool is None and not self.held_out.size:
            return permutation_slice(self.num_rows, self.seed, self._offset(w), n)
        rows = self._pool_rows()
        return rows[permutation_slice(rows.size, self.seed, self._offset(w), n, stream=300)]

    def _domain_rows(self) -> list[np.ndarray]:
        rows = self._pool_rows()
        return [rows[self.domain_ids[rows] == k] for k in range(len(self.domain_names))]

    def _window_order(self, ctx, firing: list[PlanStage], w: int, plan: np.ndarray) -> np.ndarray:
        """A reorder after the budget stage orders the window's rows by its latest scores."""
        stage = self.window_reorder
        if stage is None:
            return plan
        if stage in firing:
            self.order_scores = np.asarray(stage.strategy.scores(ctx, np.arange(self.num_rows)), dtype=np.float64)
        if self.order_scores is None:
            return plan
        return stage.strategy.order(plan, self.order_scores[plan], int(rng_for(self.seed, 600, w).integers(2**31)))

    def _served_scores(self, w: int, plan: np.ndarray) -> tuple[str, np.ndarray] | None:
        """The reorder that ordered window w and the score of each of its rows, or None (no order yet)."""
        if self.window_reorder is not None and self.order_scores is not None:
            return self.window_reorder.label, self.order_scores[plan]
        budget = self.budget
        if (budget is not None and budget.family == "reorder" and self.stream.ready
                and self._offset(w) >= self.stream.origin):
            return budget.label, self.stream.score_slice(self._offset(w), plan.size)
        return None

    def proportions_of_window(self, w: int) -> np.ndarray | None:
        """The proportions window w was drawn with (mix runs), or None when not recorded."""
        for record in reversed(self.decisions):
            if record["window"] == w and "proportions" in record:
                return np.array([record["proportions"][n] for n in self.domain_names], dtype=np.float64)
        return None

    # -- state ----------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "plans": {str(w): p for w, p in self.plans.items()},
            "cursors": self.cursors, "last_selection": self.last_selection,
            "last_proportions": self.last_proportions, "decisions": self.decisions,
            "strategy": self.strategy.state_dict() if self.strategy is not None else {},
            "run_id": self.run_id,
            "served": np.flatnonzero(self.served), "passes": self.passes,
            "selection_cursor": self.selection_cursor, "selection_window": self.selection_window,
        }
        if len(self.stages) > 1 or self.kept or self.stream.ready or self.order_scores is not None:
            state["stages"] = [{"strategy": s.strategy.state_dict(), "last_step": s.last_step} for s in self.stages]
            state["pool"] = self.pool
            state["kept"] = {str(i): rows for i, rows in self.kept.items()}
            state["order_scores"] = self.order_scores
            state["stream"] = self.stream.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.plans = {int(w): np.asarray(p, dtype=np.int64) for w, p in state["plans"].items()}
        self.cursors = np.asarray(state["cursors"], dtype=np.int64)
        ls = state.get("last_selection")
        self.last_selection = None if ls is None else np.asarray(ls, dtype=np.int64)
        self.last_proportions = np.asarray(state["last_proportions"], dtype=np.float64)
        self.decisions = list(state.get("decisions", []))
        self.run_id = str(state.get("run_id") or self.run_id)
        # checkpoints written before consume_once: no row counts as served, the next decision opens a pass
        self.served = np.zeros(self.num_rows, dtype=bool)
        self.served[np.asarray(state.get("served", []), dtype=np.int64)] = True
        self.passes = int(state.get("passes", 0))
        self.selection_cursor = int(state.get("selection_cursor", 0))
        self.selection_window = int(state.get("selection_window", 0))
        self.seen = np.zeros(self.num_rows, dtype=bool)
        for rows in self.plans.values():
            self.seen[rows] = True
        if "stages" in state:
            for stage, saved in zip(self.stages, state["stages"], strict=True):
                stage.strategy.load_state_dict(saved.get("strategy", {}))
                stage.last_step = saved.get("last_step")
            pool, scores = state.get("pool"), state.get("order_scores")
            self.pool = None if pool is None else np.asarray(pool, dtype=np.int64)
            self.kept = {int(i): np.asarray(r, dtype=np.int64) for i, r in (state.get("kept") or {}).items()}
            self.order_scores = None if scores is None else np.asarray(scores, dtype=np.float64)
            self.stream.load_state_dict(state.get("stream") or {})
        elif self.strategy is not None:
            self.strategy.load_state_dict(state.get("strategy", {}))
        if "stages" not in state:
            # one-stage runs saved before plans had per-stage state: the stage last fired at its last decision
            decided = [d["step"] for d in self.decisions if d.get("decision")]
            for stage in self.stages:
                stage.last_step = decided[-1] if decided else None


def _check_rows(indices, num_rows: int, who: str) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= num_rows:
        raise FlexfeedError(f"selector {who!r} returned row ids outside 0..{num_rows - 1} or none at all",
                            "fix the selector's select()")
    return idx


def _check_proportions(p: np.ndarray, k: int, who: str) -> np.ndarray:
    if p.shape != (k,) or not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise FlexfeedError(f"{who} proportions must be {k} non-negative numbers with a positive sum, got {p.tolist()}",
                            "give one proportion per dataset, in the order of `dataset`")
    return p / p.sum()


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
