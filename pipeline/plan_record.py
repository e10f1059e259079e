"""What a run's files say about its data plan: the stages, the pool each filter kept, the order served.

Read by `flexfeed report`. The decision records (flexfeed_decisions.jsonl) name the stages and whether
each fired, and give each filter's pool when it fired. The order is the score of each served row along
the step axis, kept small as per-step quantiles (`step_quantiles`): read from a record's `order` entry
where the run wrote one, otherwise computed from the scheduler state saved with the run
(flexfeed_state.*): a reorder that takes the budget keeps the score each of its slots was placed by; a
reorder inside the windows keeps the scores of its last firing, which ordered every window from that
firing on (earlier windows of a re-scoring reorder are then not known, and left out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .run_files import RunData
from .state_io import load_state

QUANTILES = (0, 25, 50, 75, 100)
"""Percentiles of the served rows' scores kept per step: min, quartiles, max."""


def step_quantiles(scores: np.ndarray, rows_per_step: int) -> list[list[float]]:
    """Per optimizer step (consecutive blocks of rows_per_step), the QUANTILES of its rows' finite scores."""
    s = np.asarray(scores, dtype=np.float64)
    out = []
    for start in range(0, s.size, max(1, int(rows_per_step))):
        block = s[start : start + rows_per_step]
        block = block[np.isfinite(block)]
        if block.size:
            out.append([round(float(q), 6) for q in np.percentile(block, QUANTILES)])
        else:
            out.append([float("nan")] * len(QUANTILES))
    return out


def stage_labels(run: RunData) -> list[str]:
    """The plan's stages as `family:component` labels, in plan order (a one-family run: one stage)."""
    for d in run.decisions:
        if d.get("stages"):
            return [str(s.get("stage")) for s in d["stages"]]
    comp = run.run.get("component")
    return [f"{run.kind}:{comp}"] if comp and run.kind not in ("static", "plan") else []


def fired_steps(run: RunData) -> dict[str, list[int]]:
    """Each stage's label -> the decision steps it fired at."""
    out: dict[str, list[int]] = {label: [] for label in stage_labels(run)}
    for d in run.decisions:
        if d.get("stages"):
            for s in d["stages"]:
                if s.get("fired"):
                    out.setdefault(str(s.get("stage")), []).append(int(d.get("step", 0)))
        elif d.get("decision") and len(out) == 1:
            out[next(iter(out))].append(int(d.get("step", 0)))
    return out


@dataclass
class FilterPool:
    """A filter stage's pool at one firing."""

    step: int
    rows: int
    per_domain: dict[str, int]


def filter_pools(run: RunData) -> dict[str, list[FilterPool]]:
    """Each filter stage's label -> its pool (rows kept, by domain where the selector said) at each firing."""
    out: dict[str, list[FilterPool]] = {}
    for d in run.decisions:
        for f in d.get("filter") or []:
            per = (f.get("info") or {}).get("selected_per_domain") or {}
            out.setdefault(str(f.get("stage")), []).append(
                FilterPool(int(d.get("step", 0)), int(f.get("pool", 0)), {str(k): int(v) for k, v in per.items()}))
    return out


@dataclass
class Repeats:
    """How often a run's selections served rows it had trained on before (records' `already_seen`, `rows_seen`)."""

    decisions: int
    """Decision windows counted."""
    already_seen: int
    """Rows of those windows that an earlier window had served, summed over the windows."""
    rows: int
    """Distinct rows of those windows, summed over the windows."""
    rows_seen: int
    """Distinct rows served over the run."""


def repeats(run: RunData) -> Repeats | None:
    """Rows re-served at decisions, or None for a run whose records do not count them (written before they did)."""
    records = [d for d in run.decisions if "rows_seen" in d]
    if not records:
        return None
    decisions = already = rows = 0
    before = 0
    for d in records:  # a window's distinct rows: the new ones (rows_seen grew by them) and the already seen
        seen = int(d.get("already_seen", 0))
        if d.get("decision"):
            decisions += 1
            already += seen
            rows += int(d["rows_seen"]) - before + seen
        before = int(d["rows_seen"])
    return Repeats(decisions, already, rows, before)


@dataclass
class ServedOrder:
    """Per-step quantiles (QUANTILES) of the served rows' scores, for the steps that are known."""

    stage: str
    steps: np.ndarray
    quantiles: np.ndarray  # (len(steps), len(QUANTILES))
    source: str
    """`decisions` (the records' order entries) or `state` (computed from the saved scheduler state)."""


def served_order(run: RunData) -> ServedOrder | None:
    """The order the run served, or None for a run without a reorder (or without what is needed to draw it)."""
    labels = [label for label in stage_labels(run) if label.startswith("reorder:")]
    if not labels and run.kind != "plan":
        return None
    label = labels[0] if labels else "reorder"  # a one-stage plan's records do not name their stage
    steps, qs = [], []
    for d in run.decisions:
        order = d.get("order")
        if order and order.get("score_q"):
            steps += [int(d.get("step", 0)) + i for i in range(len(order["score_q"]))]
            qs += order["score_q"]
    if steps:
        return ServedOrder(label, np.asarray(steps), np.asarray(qs, dtype=np.float64), "decisions")
    return _order_from_state(run, label)


def _order_from_state(run: RunData, label: str) -> ServedOrder | None:
    state = load_state(run.path)
    batch = int(run.run.get("global_batch") or 0)
    if state is None or batch <= 0:
        return None
    served = int(run.run.get("steps") or 0) * batch
    stream = state.get("stream") or {}
    if stream.get("passes"):  # the reorder took the budget: every slot keeps the score it was placed by
        passes = sorted(stream["passes"], key=lambda p: int(p["start"]))
        origin = int(stream["origin"])
        scores = np.concatenate([np.asarray(p.get("scores", np.full(len(p["rows"]), np.nan)), dtype=np.float64)
                                 for p in passes])[: max(0, served - origin)]
        first = origin // batch
        qs = step_quantiles(scores, batch)
        return ServedOrder(label, np.arange(first, first + len(qs)), np.asarray(qs), "state")
    order_scores = state.get("order_scores")
    if order_scores is None:
        return None
    # a reorder inside the windows: its last scores ordered every window from its last firing on
    last = _last_firing(state, stage_labels(run), label)
    if last is None:
        return None
    order_scores = np.asarray(order_scores, dtype=np.float64)
    starts = {int(d["window"]): int(d.get("step", 0)) for d in run.decisions if "window" in d}
    steps, qs = [], []
    for w in sorted(int(k) for k in state.get("plans", {})):
        start = starts.get(w)
        if start is None or start < last:
            continue
        rows = np.asarray(state["plans"][str(w)], dtype=np.int64)
        q = step_quantiles(order_scores[rows], batch)[: max(0, served // batch - start)]  # planned, not trained
        steps += [start + i for i in range(len(q))]
        qs += q
    if not steps:
        return None
    return ServedOrder(label, np.asarray(steps), np.asarray(qs), "state")


def _last_firing(state: dict, labels: list[str], label: str) -> int | None:
    stages = state.get("stages") or []
    if label not in labels or len(stages) != len(labels):
        return None
    last = stages[labels.index(label)].get("last_step")
    return None if last is None else int(last)
