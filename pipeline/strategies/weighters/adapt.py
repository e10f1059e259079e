"""`adapt`: per-sample weights from embedding similarity to an anchor (target) set.

At each decision the weighter streams the `embed` signal of the train rows shard by shard (keeping only the
scores) against the target split's and scores every train row:

    anchor: mean   s(x) = mean_a cos(e_x, e_a)  = e_x/|e_x| . mean_a(e_a/|e_a|)   (DataFlex's rule)
    anchor: max    s(x) = max_a cos(e_x, e_a)                                      (nearest anchor)

Inside a batch, w_i = min(sigmoid(s(x_i) / tau), clip): `scale: absolute` uses these as they are (DataFlex's
ADAPT: each weight in (0, 1) scales its sample's learning rate), `scale: batch_mean` divides them by the
batch's mean so they average 1. The embeddings are store signals: computed once offline, or, when the run
sets `refresh.max_staleness` (DataFlex's `refresh_interval`), recomputed with the live model once older
than that many steps, and the rows rescored at every decision. No extra forward pass per batch. Before
the first decision all weights are 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from store.errors import FlexfeedError

from ..base import SignalNeed, Weighter
from ..registry import WEIGHTERS
from ..row_maps import RowMap, UnitMaxCosine, UnitProjection, unit_rows

ANCHORS = ("mean", "max")


@dataclass(kw_only=True)
class AdaptParams:
    """Parameters of the embedding-similarity weighter."""

    tau: float = 1.0
    """Temperature of the sigmoid: smaller tau separates similar and dissimilar samples more."""
    anchor: str = "mean"
    """`mean`: mean cosine to the anchor set; `max`: cosine to the nearest anchor."""
    scale: Literal["batch_mean", "absolute"] = "batch_mean"
    """`batch_mean`: sigmoid weights divided by the batch mean (they average 1); `absolute`: the sigmoid weights
    as they are, in (0, 1) (DataFlex's ADAPT)."""
    clip: float | None = None
    """Cap on each sigmoid weight before any scaling (DataFlex's `clip`); None: no cap."""

    def __post_init__(self):
        if self.clip is not None and not self.clip > 0:
            raise FlexfeedError(f"adapt clip must be > 0, got {self.clip}", "drop clip, or give a cap such as 0.9")
        if not self.tau > 0:
            raise FlexfeedError(f"adapt tau must be > 0, got {self.tau}", "use tau: 1.0")
        if self.anchor not in ANCHORS:
            raise FlexfeedError(f"unknown adapt anchor rule {self.anchor!r}", "choose anchor: mean or anchor: max")


def anchor_rule(train_shape: tuple[int, ...], target: np.ndarray, anchor: str) -> RowMap:
    """The per-row rule scoring train rows of ``train_shape`` against the anchor set: mean or max cosine (float64)."""
    target = np.asarray(target)
    if len(train_shape) != 2 or target.ndim != 2 or train_shape[1] != target.shape[1] or len(target) == 0:
        raise FlexfeedError(f"embed signals have shapes {tuple(train_shape)} (train) and {target.shape} (target)",
                            "embed the train and target splits with the same model and pooling")
    anchors = unit_rows(target, np.float64)
    if anchor == "mean":
        return UnitProjection(anchors.mean(axis=0)[:, None], float64=True)
    return UnitMaxCosine(anchors)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow."""
    return np.exp(-np.logaddexp(0.0, -x))


@WEIGHTERS.register("adapt")
class AdaptWeighter(Weighter):
    """Scores rows once from stored embeddings; weights each batch from its rows' scores."""

    Params = AdaptParams
    paper = ("Zhao et al., Rethinking Data Curation in LLM Training: Online Reweighting Offers Better Generalization "
             "than Offline Methods (ADAPT), ICLR 2026 (arXiv 2605.05227)")
    rule = "sigmoid of each row's embedding cosine to the anchor (target) set over a temperature, mean 1 per batch"

    def __init__(self, params=None, seed: int = 0):
        super().__init__(params, seed)
        self.scores: np.ndarray | None = None  # (N,) similarity of each train row to the anchors

    def needs(self) -> list[SignalNeed]:
        """Embeddings of the train rows and of the anchor (target) set; refreshed when refresh.max_staleness is set."""
        return [SignalNeed("embed", "train"), SignalNeed("embed", "target")]

    def update(self, ctx) -> None:
        """Score every train row against the anchors, from the embeddings as they are at this decision."""
        shape = ctx.signals.variants("embed", "train")[-1][1]
        target = np.asarray(ctx.signals.get("embed", "target"))
        if shape[0] != ctx.num_rows:
            raise FlexfeedError(f"the train embed signal has {shape[0]} rows but the run has {ctx.num_rows}",
                                "recompute embeddings with the embed stage on this run's train data")
        # streamed shard by shard: only the (N,) scores are kept, never the train embeddings
        rule = anchor_rule(shape, target, self.params.anchor)
        self.scores = np.asarray(ctx.signals.map_rows("embed", rule, "train"), dtype=np.float64).reshape(shape[0])
        ctx.log.update({"adapt/score_mean": float(self.scores.mean()), "adapt/score_std": float(self.scores.std())})

    def weights(self, losses, rows, domains, step: int) -> np.ndarray:
        """min(sigmoid(score / tau), clip) of each row, divided by the batch mean unless scale is absolute
        (all ones before the first update)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self.scores is None or rows.size == 0:
            return np.ones(rows.size)
        if rows.min() < 0 or rows.max() >= len(self.scores):
            raise FlexfeedError(f"row {int(rows.max())} is outside the {len(self.scores)} scored train rows",
                                "the batch must come from the train split the embeddings were computed on")
        w = sigmoid(self.scores[rows] / self.params.tau)
        if self.params.clip is not None:
            w = np.minimum(w, self.params.clip)
        return w if self.params.scale == "absolute" else w / w.mean()

    def state_dict(self) -> dict:
        return {"scores": None if self.scores is None else self.scores.copy()}

    def load_state_dict(self, state: dict) -> None:
        scores = state.get("scores")
        self.scores = None if scores is None else np.array(scores, dtype=np.float64)
