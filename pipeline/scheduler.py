"""Turns strategy decisions into the plan of each window, and keeps what resuming needs."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from store.errors import FlexfeedError

from .config.groups import TRAIN_TYPES
from .plan import Windows, draw_by_proportions, permutation_slice
from .strategies import DecisionContext, Strategy

KINDS = TRAIN_TYPES  # one list, defined with the config's train_type


class Scheduler:
    """Owns the plans (row ids per window) of a run; decisions happen when a window is first needed."""

    def __init__(self, *, kind: str, strategy: Strategy | None, windows: Windows, domain_ids: np.ndarray,
                 domain_names: list[str], seed: int,
                 make_context: Callable[[int, int], DecisionContext] | None = None,
                 init_proportions: np.ndarray | None = None,
                 on_decision: Callable[[dict], None] | None = None, run_id: str = ""):
        if kind not in KINDS:
            raise FlexfeedError(f"unknown train_type {kind!r}", f"use one of {', '.join(KINDS)}")
        self.kind = kind
        self.strategy = strategy
        self.windows = windows
        self.domain_ids = np.asarray(domain_ids, dtype=np.int64)
        self.domain_names = list(domain_names)
        self.num_rows = len(self.domain_ids)
        self.seed = int(seed)
        self.make_context = make_context
        self.on_decision = on_decision
        self.domain_rows = [np.flatnonzero(self.domain_ids == k) for k in range(len(self.domain_names))]
        k = len(self.domain_names)
        if init_proportions is None:
            init_proportions = np.full(k, 1.0 / k)
        self.init_proportions = _check_proportions(np.asarray(init_proportions, dtype=np.float64), k, "initial")
        # state (everything below goes into checkpoints)
        self.run_id = run_id  # keys the run's refreshed signals; a resumed run keeps its own
        self.plans: dict[int, np.ndarray] = {}
        self.cursors = np.zeros(k, dtype=np.int64)
        self.last_selection: np.ndarray | None = None
        self.last_proportions = self.init_proportions.copy()
        self.decisions: list[dict] = []

    # -- the stream -----------------------------------------------------------
    def plan(self, w: int) -> np.ndarray:
        """Row ids of window w (computed once, then replayed)."""
        if w not in self.plans:
            self.plans[w] = self._make_plan(w)
        return self.plans[w]

    def _offset(self, w: int) -> int:
        return self.windows.start_step(w) * self.windows.global_batch

    def _uniform(self, w: int) -> np.ndarray:
        return permutation_slice(self.num_rows, self.seed, self._offset(w), self.windows.num_samples(w))

    def _make_plan(self, w: int) -> np.ndarray:
        n = self.windows.num_samples(w)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        decide = self.windows.is_decision(w) and self.kind != "static"
        record = {"window": w, "step": self.windows.start_step(w), "kind": self.kind, "decision": decide}
        t0 = time.perf_counter()
        ctx = None
        if decide:
            ctx = self.make_context(self.windows.start_step(w), w)
        if self.kind in ("static", "weight"):
            if decide:
                self.strategy.update(ctx)
            plan = self._uniform(w)
        elif self.kind == "mix":
            if decide:
                p = self.strategy.proportions(ctx)
                self.last_proportions = _check_proportions(np.asarray(p, dtype=np.float64), len(self.domain_names),
                                                           f"mixer {self.strategy.name!r}")
            plan, self.cursors = draw_by_proportions(self.last_proportions, n, self.domain_rows, self.cursors,
                                                     self.seed, w)
            record["proportions"] = dict(zip(self.domain_names, map(float, self.last_proportions), strict=True))
        else:  # select
            if decide:
                sel = self.strategy.select(ctx, n)
                idx = np.asarray(sel.indices, dtype=np.int64).reshape(-1)
                if idx.size == 0 or idx.min() < 0 or idx.max() >= self.num_rows:
                    raise FlexfeedError(f"selector {self.strategy.name!r} returned row ids outside 0..{self.num_rows - 1}"
                                        f" or none at all", "fix the selector's select()")
                self.last_selection = idx
                record["info"] = _jsonable(sel.info)
            if self.last_selection is None:  # warm-up window: uniform
                plan = self._uniform(w)
            else:
                pool = self.last_selection
                local = permutation_slice(len(pool), self.seed, 0 if decide else self._offset(w), n, stream=500 + w)
                plan = pool[local]
        counts = np.bincount(self.domain_ids[plan], minlength=len(self.domain_names))
        record["per_domain"] = dict(zip(self.domain_names, map(int, counts), strict=True))
        record["seconds"] = round(time.perf_counter() - t0, 4)
        if ctx is not None:
            record.update(_jsonable(ctx.log))
        self.decisions.append(record)
        if self.on_decision is not None:
            self.on_decision(record)
        return plan

    def proportions_of_window(self, w: int) -> np.ndarray | None:
        """The proportions window w was drawn with (mix runs), or None when not recorded."""
        for record in reversed(self.decisions):
            if record["window"] == w and "proportions" in record:
                return np.array([record["proportions"][n] for n in self.domain_names], dtype=np.float64)
        return None

    # -- state ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "plans": {str(w): p for w, p in self.plans.items()},
            "cursors": self.cursors, "last_selection": self.last_selection,
            "last_proportions": self.last_proportions, "decisions": self.decisions,
            "strategy": self.strategy.state_dict() if self.strategy is not None else {},
            "run_id": self.run_id,
        }

    def load_state_dict(self, state: dict) -> None:
        self.plans = {int(w): np.asarray(p, dtype=np.int64) for w, p in state["plans"].items()}
        self.cursors = np.asarray(state["cursors"], dtype=np.int64)
        ls = state.get("last_selection")
        self.last_selection = None if ls is None else np.asarray(ls, dtype=np.int64)
        self.last_proportions = np.asarray(state["last_proportions"], dtype=np.float64)
        self.decisions = list(state.get("decisions", []))
        self.run_id = str(state.get("run_id") or self.run_id)
        if self.strategy is not None:
            self.strategy.load_state_dict(state.get("strategy", {}))


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

