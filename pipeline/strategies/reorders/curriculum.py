"""Curriculum reorders: rows served in a pattern's order of a score from the store, a file, or the live loss.

One registered component per pattern (docs/reorders.md). Scores come from

- a stored signal (`score: loss`, `ref_loss`): the offline values, or with `live: true` the live
  model's loss recomputed when the stage fires (forward passes only, one refresh shared with every
  other loss-reading stage of the decision);
- a file aligned with the train rows (`score: file`, `score_path`): `.npy`, `.json` (a list, or an
  object holding the list under `score_key`) or `.jsonl` (one object per row with `score_key`);
  its length and finiteness are checked when the run is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from store.errors import FlexfeedError

from ..base import Reorderer, SignalNeed
from ..registry import REORDERS
from .patterns import canonical_polarity, order_rows

SIGNAL_SCORES = ("loss", "ref_loss")


@dataclass(kw_only=True)
class ReorderParams:
    """What every reorder reads and how it ranks."""

    score: Literal["loss", "ref_loss", "file"] = "loss"
    """Where scores come from: a stored per-row signal (`loss`, `ref_loss`) or a file (`score_path`)."""
    score_path: str | None = None
    """`.npy`, `.json` or `.jsonl` file with one score per train row (score: file)."""
    score_key: str = "score"
    """Key of the score in `.json`/`.jsonl` objects."""
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
        if self.score != "file" and self.score_path:
            raise ValueError("score_path is read only with score: file")
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


def read_score_file(path: str, key: str, num_rows: int) -> np.ndarray:
    """Scores from a .npy / .json / .jsonl file, one finite number per train row."""
    p = Path(path)
    try:
        if p.suffix == ".npy":
            values = np.load(p, allow_pickle=False)
        elif p.suffix == ".jsonl":
            values = [json.loads(line)[key] for line in p.read_text().splitlines() if line.strip()]
        elif p.suffix == ".json":
            obj = json.loads(p.read_text())
            values = obj[key] if isinstance(obj, dict) else obj
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


class PatternReorder(Reorderer):
    """Ranks rows by score, then serves them in the pattern's order."""

    Params = ReorderParams
    pattern = "sorting"

    def __init__(self, params=None, seed: int = 0):
        super().__init__(params, seed)
        self._file_scores: np.ndarray | None = None

    def needs(self) -> list[SignalNeed]:
        """The stored signal scored by (live: the loss, recomputed when the stage fires)."""
        if self.params.score == "file" or self.pattern == "shuffle":
            return []
        return [SignalNeed(self.params.score, "train", refresh=self.params.live, live=self.params.live)]

    def check(self, num_rows: int) -> None:
        """Read a score file now (length, finiteness), so a bad one fails before training."""
        if self.params.score == "file" and self.pattern != "shuffle":
            self._file_scores = read_score_file(self.params.score_path, self.params.score_key, num_rows)

    def scores(self, ctx, rows: np.ndarray) -> np.ndarray:
        """Scores of `rows`: from the file, or the signal's first column (the per-row loss)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.pattern == "shuffle":
            return np.zeros(rows.size)
        if self.params.score == "file":
            if self._file_scores is None:
                self.check(ctx.num_rows)
            return self._file_scores[rows]
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


def _register(name: str, pattern: str, params: type, args, *aliases: str):
    cls = type(f"{pattern.capitalize()}Reorder", (PatternReorder,),
               {"Params": params, "pattern": pattern, "pattern_args": args,
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


ShuffleReorder = _register("shuffle", "shuffle", ReorderParams, PatternReorder.pattern_args)
SortingReorder = _register("sorting", "sorting", ReorderParams, PatternReorder.pattern_args)
FoldingReorder = _register("folding", "folding", LayeredParams, _layers)
ZigzagReorder = _register("zigzag", "zigzag", LayeredParams, _layers)
SegmentReorder = _register("segment", "segment", SegmentParams, _segment)
StairReorder = _register("stair", "stair", SectionParams, _sections)
SawReorder = _register("saw", "saw", SectionParams, _sections)
