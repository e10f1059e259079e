"""Curriculum reorders: rows served in a pattern's order of a score from the store, a file, or the live loss.

One registered component per pattern (docs/reorders.md). Scores come from

- a stored signal (`score: loss`, `ref_loss`): the offline values, or with `live: true` the live
  model's loss recomputed when the stage fires (forward passes only, one refresh shared with every
  other loss-reading stage of the decision);
- a file aligned with the train rows (`score: file`, `score_path`): `.npy`, `.json` (a list, an
  object holding the list under `score_key` or `metric.score_key`, or a DataFlex selector cache
  `{"indices": [...], "metric": {score_key: [...]}}`) or `.jsonl` (one object per row with
  `score_key`); its length and finiteness are checked when the run is built;
- a number in each raw dataset row (`score: field`, the row's `score_key`), read from the data files
  in train-row order when the run is built (nothing is added to the tokenized rows, so their
  fingerprint and store keys stay as they are).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from stages.values import did_you_mean
from store.errors import FlexfeedError

from ..base import Reorderer, SignalNeed
from ..registry import REORDERS
from .patterns import canonical_polarity, order_rows

SIGNAL_SCORES = ("loss", "ref_loss")
FIXED_SCORES = ("file", "field")
"""Scores read once, before training, rather than from the store."""


@dataclass(kw_only=True)
class ReorderParams:
    """What every reorder reads and how it ranks."""

    score: Literal["loss", "ref_loss", "file", "field"] = "loss"
    """Where scores come from: a stored per-row signal (`loss`, `ref_loss`), a file (`score_path`) or a
    number in each raw dataset row (`field`, named by `score_key`)."""
    score_path: str | None = None
    """`.npy`, `.json` or `.jsonl` file with one score per train row (score: file)."""
    score_key: str = "score"
    """Key of the score in `.json`/`.jsonl` objects (score: file), or the raw rows' field (score: field)."""
    score_fill: float | None = None
    """score: file with a selector cache that scores only some rows: the score of the others; None
    refuses such a cache."""
    live: bool = False
    """Re-score with the live model's loss each time the stage fires (score: loss only)."""
    polarity: str = "higher_later"
    """`higher_later` (high scores served last, e.g. easy to hard by loss) or `higher_earlier`."""
    window_size: int = 0
    """> 1: shuffle inside consecutive blocks of this many rows after the pattern (JIT)."""

    def __post_init__(self):
        self.polarity = canonical_polarity(self.polarity)
        if self.score == "file" and not self.score_path:
            raise ValueError("score: file needs score_path (a .npy, .json or .jsonl file, one score per row)")
        if self.score != "file" and (self.score_path or self.score_fill is not None):
            raise ValueError("score_path and score_fill are read only with score: file")
        if self.score_fill is not None and not np.isfinite(self.score_fill):
            raise ValueError(f"score_fill must be a finite number, got {self.score_fill}")
        if self.live and self.score != "loss":
            raise ValueError("live: true re-scores with the live model's loss: use it with score: loss")
        if self.window_size < 0:
            raise ValueError(f"window_size must be >= 0, got {self.window_size}")


@dataclass(kw_only=True)
class LayeredParams(ReorderParams):
    """Folding and zigzag: the number of sweeps over the score range."""

    layers: int = 3
    """Sweeps L over the score range (the paper: 2-3 for pre-training, 3-5 for SFT)."""

    def __post_init__(self):
        super().__post_init__()
        if self.layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.layers}")


@dataclass(kw_only=True)
class SegmentParams(ReorderParams):
    """Segment: front and back blocks from chosen ends of the ranking."""

    x_pct: float = 10.0
    """Front block, in % of the rows."""
    y_pct: float = 10.0
    """Back block, in % of the rows."""
    front_is_high: bool = False
    """Front block from the high-score end."""
    back_is_high: bool = True
    """Back block from the high-score end."""

    def __post_init__(self):
        super().__post_init__()
        if self.x_pct < 0 or self.y_pct < 0 or self.x_pct + self.y_pct > 100:
            raise ValueError(f"x_pct and y_pct must be >= 0 with a sum <= 100, got {self.x_pct}, {self.y_pct}")


@dataclass(kw_only=True)
class SectionParams(LayeredParams):
    """Stair and saw: sorted, with the windows around section boundaries folded (stair) or zigzagged (saw)."""

    layers: int = 2
    num_sections: int = 2
    """Sections S; S - 1 boundaries."""
    folding_ratio: float = 0.1
    """Radius of each boundary window as a fraction r of the rows; 2 r < 1 / S."""

    def __post_init__(self):
        super().__post_init__()
        if self.num_sections < 1 or self.folding_ratio < 0 or (
                self.num_sections > 1 and 2 * self.folding_ratio >= 1 / self.num_sections):
            raise ValueError(f"need num_sections >= 1 and 0 <= 2 * folding_ratio < 1 / num_sections, got "
                             f"{self.num_sections} and {self.folding_ratio}")


def read_score_file(path: str, key: str, num_rows: int, fill: float | None = None) -> np.ndarray:
    """Scores from a .npy / .json / .jsonl file, one finite number per train row (`fill`: see _json_scores)."""
    p = Path(path)
    try:
        if p.suffix == ".npy":
            values = np.load(p, allow_pickle=False)
        elif p.suffix == ".jsonl":
            values = [json.loads(line)[key] for line in p.read_text().splitlines() if line.strip()]
        elif p.suffix == ".json":
            values = _json_scores(json.loads(p.read_text()), key, num_rows, fill, path)
        else:
            raise FlexfeedError(f"score_path {path} is not .npy, .json or .jsonl", "save the scores in one of those")
        arr = np.asarray(values, dtype=np.float64)
    except FlexfeedError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FlexfeedError(f"cannot read scores from {path}: {exc}",
                            f"one number per train row (a list, or objects with {key!r})") from None
    if arr.shape != (num_rows,) or not np.isfinite(arr).all():
        raise FlexfeedError(f"{path} holds {arr.size} scores (finite: {bool(np.isfinite(arr).all())}) for "
                            f"{num_rows} train rows", "give one finite score per train row, in row order")
    return arr


def _json_scores(obj, key: str, num_rows: int, fill: float | None, path: str):
    """A list; an object with the list under `key` or `metric.key`; or a selector cache (DataFlex's
    `{"indices": [...], "metric": {key: [...]}}`), whose rows not listed get `fill` (None: refused)."""
    if not isinstance(obj, dict):
        return obj
    metric = obj.get("metric") if isinstance(obj.get("metric"), dict) else {}
    if "indices" not in obj:
        return obj[key] if key in obj else metric[key]
    if key not in metric:
        raise FlexfeedError(f"selector cache {path} has no metric {key!r}",
                            did_you_mean(key, metric) if metric else "the cache's `metric` mapping is empty")
    rows = np.asarray(obj["indices"], dtype=np.int64)
    values = np.asarray(metric[key], dtype=np.float64)
    if rows.shape != values.shape or rows.ndim != 1:
        raise FlexfeedError(f"selector cache {path}: {rows.size} indices but {values.size} {key!r} values",
                            "give one value per listed index")
    if rows.size and (rows.min() < 0 or rows.max() >= num_rows):
        raise FlexfeedError(f"selector cache {path} lists row {int(rows.max())} of {num_rows} train rows",
                            "the cache must come from these datasets, in this order")
    covered = np.unique(rows).size
    if covered < num_rows and fill is None:
        raise FlexfeedError(f"selector cache {path} scores {covered} of {num_rows} train rows",
                            "set score_fill to the score of the other rows (DataFlex gives them 0.0)")
    dense = np.full(num_rows, np.nan if fill is None else fill, dtype=np.float64)
    dense[rows] = values
    return dense


class PatternReorder(Reorderer):
    """Ranks rows by score, then serves them in the pattern's order."""

    Params = ReorderParams
    pattern = "sorting"

    def __init__(self, params=None, seed: int = 0):
        super().__init__(params, seed)
        self._fixed_scores: np.ndarray | None = None  # score: file or field, read by check()

    def needs(self) -> list[SignalNeed]:
        """The stored signal scored by (live: the loss, recomputed when the stage fires)."""
        if self.params.score in FIXED_SCORES or self.pattern == "shuffle":
            return []
        return [SignalNeed(self.params.score, "train", refresh=self.params.live, live=self.params.live)]

    def check(self, num_rows: int, row_field: Callable[[str], np.ndarray] | None = None) -> None:
        """Read fixed scores now (length, finiteness), so bad ones fail before training.

        `row_field(name)` returns the raw train rows' field `name` in row order (score: field).
        """
        if self.pattern == "shuffle":
            return
        if self.params.score == "file":
            self._fixed_scores = read_score_file(self.params.score_path, self.params.score_key, num_rows,
                                                 self.params.score_fill)
        elif self.params.score == "field":
            if row_field is None:
                raise FlexfeedError(f"reorder {self.name!r} with score: field has not read the dataset rows",
                                    "build the run with flexfeed train, which reads them before training")
            values = np.asarray(row_field(self.params.score_key), dtype=np.float64)
            if values.shape != (num_rows,):
                raise FlexfeedError(f"the datasets' field {self.params.score_key!r} gave {values.size} scores for "
                                    f"{num_rows} train rows", "every train row needs its score")
            self._fixed_scores = values

    def scores(self, ctx, rows: np.ndarray) -> np.ndarray:
        """Scores of `rows`: from the file or the rows' field, or the signal's first column (the per-row loss)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.pattern == "shuffle":
            return np.zeros(rows.size)
        if self.params.score in FIXED_SCORES:
            if self._fixed_scores is None:
                self.check(ctx.num_rows)
            return self._fixed_scores[rows]
        values = np.asarray(ctx.signals.get(self.params.score, "train"), dtype=np.float64)
        values = values[:, 0] if values.ndim == 2 else values
        return values[rows]

    def pattern_args(self) -> dict:
        """The pattern's own parameters (beyond polarity and window)."""
        return {}

    def order(self, rows: np.ndarray, scores: np.ndarray, seed: int) -> np.ndarray:
        """`rows` in the pattern's order of `scores`, then jittered."""
        return order_rows(self.pattern, rows, scores, seed=seed, polarity=self.params.polarity,
                          window_size=self.params.window_size, **self.pattern_args())


DATA_ORGANIZATION = ("Dai et al., Demystifying Data Organization for Enhanced LLM Training, "
                     "arXiv 2605.30334 (2026)")
"""The paper the ordering patterns follow (patterns.py)."""


def _register(name: str, pattern: str, params: type, args, rule: str, *aliases: str, paper: str = DATA_ORGANIZATION):
    cls = type(f"{pattern.capitalize()}Reorder", (PatternReorder,),
               {"Params": params, "pattern": pattern, "pattern_args": args, "paper": paper, "rule": rule,
                "__doc__": f"The `{pattern}` curriculum pattern (see patterns.py)."})
    return REORDERS.register(name, *aliases)(cls)


def _layers(self) -> dict:
    return {"layers": self.params.layers}


def _segment(self) -> dict:
    p = self.params
    return {"x_pct": p.x_pct, "y_pct": p.y_pct, "front_is_high": p.front_is_high, "back_is_high": p.back_is_high}


def _sections(self) -> dict:
    p = self.params
    return {"layers": p.layers, "num_sections": p.num_sections, "folding_ratio": p.folding_ratio}


ShuffleReorder = _register("shuffle", "shuffle", ReorderParams, PatternReorder.pattern_args,
                           "a seeded permutation; no score read", paper="")
SortingReorder = _register("sorting", "sorting", ReorderParams, PatternReorder.pattern_args,
                           "rows ranked by score (`polarity`), served in that order")
FoldingReorder = _register("folding", "folding", LayeredParams, _layers,
                           "L sweeps over the score range, one after the other")
ZigzagReorder = _register("zigzag", "zigzag", LayeredParams, _layers,
                          "L sweeps over the score range, every other sweep reversed")
SegmentReorder = _register("segment", "segment", SegmentParams, _segment,
                           "front and back blocks from chosen ends of the ranking, each part shuffled")
StairReorder = _register("stair", "stair", SectionParams, _sections,
                         "sorted, the windows around the S - 1 section boundaries folded")
SawReorder = _register("saw", "saw", SectionParams, _sections,
                       "sorted, the windows around the S - 1 section boundaries zigzagged")
