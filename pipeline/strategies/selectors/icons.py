"""`icons`: ICONS influence consensus (Wu et al. 2025) from stored gradient features, rows most tasks vote for.

Each target task k scores every pool row x by its LESS influence
I_k(x) = sum_i lr_i * mean_{z in task k} cos(g_i(x), g_i^sgd(z)) (checkpoint i's Adam train features `grads`,
SGD target features `grads_sgd`, weighted by the checkpoint's learning rate as `less` reads them) and votes for
the rows in its own top fraction p = budget / pool: the rows whose I_k is at least the (p x pool)-th largest.
Rows are ranked by their votes, then by the influence summed over tasks (DataFlex leaves such ties to the
sort), then by row id. A row that helps every task a little thus beats one that only one task ranks first,
which is what the consensus is for: no task's scale can outvote the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from store.errors import FlexfeedError

from ..base import Selection, Selector, SignalNeed
from ..registry import SELECTORS
from .less import task_influence
from .reading import target_tasks
from .sampling import check_count, take_ranked
from .summary import score_stats, selection_info


@dataclass(kw_only=True)
class IconsParams:
    """Parameters of the ICONS selector."""

    task_boundaries: list[int] | None = None
    """Sizes of the K target tasks, joined end to end in the target set's row order (DataFlex's parameter); it wins over the target's datasets. Unset: each target dataset is a task (one task when there is one)."""

    def __post_init__(self):
        if self.task_boundaries is not None:
            sizes = list(self.task_boundaries)
            if not sizes or any(int(s) != s or s < 1 for s in sizes):
                raise ValueError(f"task_boundaries must be a non-empty list of task sizes >= 1, got {sizes}")
            self.task_boundaries = [int(s) for s in sizes]


def boundary_tasks(sizes: list[int], num_targets: int) -> tuple[np.ndarray, np.ndarray]:
    """(task of each target row, task ids) for tasks of `sizes` rows laid end to end."""
    if sum(sizes) != num_targets:
        raise FlexfeedError(f"icons task_boundaries {sizes} sum to {sum(sizes)} but the target set has "
                            f"{num_targets} rows",
                            "give the sizes of the target tasks in the target's row order, summing to its row count, "
                            "or unset task_boundaries to take each target dataset as a task")
    return np.repeat(np.arange(len(sizes)), sizes), np.arange(len(sizes))


def consensus_votes(influence: np.ndarray, num_top: int) -> np.ndarray:
    """Per row, the number of tasks (columns) that rank it in their top `num_top` (ties at a task's threshold
    all vote)."""
    values = np.nan_to_num(np.asarray(influence, dtype=np.float64), nan=-np.inf)
    n = values.shape[0]
    m = min(max(int(num_top), 1), n)
    thresholds = np.partition(values, n - m, axis=0)[n - m]  # each task's m-th largest influence
    return (values >= thresholds).sum(axis=1)


def consensus_order(votes: np.ndarray, summed: np.ndarray) -> np.ndarray:
    """Row ids by most votes, then largest summed influence, then row id."""
    summed = np.nan_to_num(np.asarray(summed, dtype=np.float64), nan=-np.inf)
    return np.lexsort((np.arange(votes.size), -summed, -np.asarray(votes))).astype(np.int64)


@SELECTORS.register("icons")
class IconsSelector(Selector):
    """Selects the rows the most target tasks rank in their top fraction by gradient influence."""

    Params = IconsParams
    paper = ("Wu, Xia, Shao, Deng, Koh, Russakovsky, ICONS: Influence Consensus for Vision-Language Data Selection, "
             "arXiv 2501.00654 (2025)")
    rule = "each target task votes for its top budget/pool rows by LESS influence; most votes, then summed influence"
    consume_once = True  # fixed gradients would retake the same rows at every decision

    def needs(self) -> list[SignalNeed]:
        """Train gradient features per checkpoint and the target set's SGD gradient features (as `less`)."""
        return [SignalNeed("grads", "train"), SignalNeed("grads_sgd", "target")]

    def tasks_of(self, ctx):
        """How target rows form tasks: task_boundaries when set, else the target's datasets."""
        if self.params.task_boundaries is not None:
            return lambda n: boundary_tasks(self.params.task_boundaries, n)
        return lambda n: target_tasks(ctx, n)

    def select(self, ctx, num_samples: int) -> Selection:
        """The `num_samples` rows with the most task votes (the ranking repeats beyond the pool)."""
        k = check_count(num_samples, ctx.num_rows)
        influence = task_influence(ctx, tasks_of=self.tasks_of(ctx))
        votes = consensus_votes(influence, k)  # p = k / pool: each task's top p x pool rows
        summed = influence.sum(axis=1)
        indices = take_ranked(consensus_order(votes, summed), k)
        num_tasks = influence.shape[1]
        extra = {"num_tasks": int(num_tasks), "task_fraction": min(k / ctx.num_rows, 1.0),
                 "unanimous_rows": int((votes == num_tasks).sum()), **score_stats(summed[indices], "influence")}
        return Selection(indices=indices, scores=votes.astype(np.float64),
                         info=selection_info(ctx, indices, votes.astype(np.float64), **extra))
