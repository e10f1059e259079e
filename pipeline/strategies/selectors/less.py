"""`less`: LESS influence scores (Xia et al. 2024) from stored gradient features, top rows selected.

score(x) = reduce over target tasks t of  sum_i lr_i * mean_{z in t} cos(g_i(x), g_i^sgd(z)),
with g_i the Adam-preconditioned train gradient features at checkpoint i (signal `grads`), g_i^sgd
the target set's SGD gradient features at the same checkpoint (signal `grads_sgd`, split `target`),
and lr_i the mean learning rate of the training interval that ends at checkpoint i (variant metadata `lr`, see
stages/grads/checkpoint.py). LESS reduces tasks by max.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from store.errors import FlexfeedError

from ..base import Selection, Selector, SignalNeed
from ..registry import SELECTORS
from ..row_maps import UnitProjection, apply_blocks, unit_rows
from .reading import check_rows, check_shape, target_tasks
from .sampling import check_count, ranking, take_ranked
from .summary import selection_info


@dataclass(kw_only=True)
class LessParams:
    """Parameters of the LESS selector."""

    task_reduce: str = "max"
    """How per-task scores combine: `max` (LESS: a row helps if it helps some task) or `mean`."""

    def __post_init__(self):
        if self.task_reduce not in ("max", "mean"):
            raise ValueError(f"task_reduce must be 'max' or 'mean', got {self.task_reduce!r}")


def checkpoint_weight(meta: dict, num_checkpoints: int) -> float:
    """A checkpoint's weight lr_i: the mean learning rate of the interval ending at it (stages/grads/checkpoint.py).

    With several checkpoints a missing rate is an error, never 1.0: it would reweight the ensemble silently.
    The checkpoint's own record is read first, since the signal source may fill a missing `lr` with 1.0.
    """
    ckpt = meta.get("checkpoint")
    lr = ckpt.get("lr") if isinstance(ckpt, dict) else meta.get("lr")
    if lr is None:
        if num_checkpoints > 1:
            where = f" (checkpoint step {ckpt.get('step')})" if isinstance(ckpt, dict) else ""
            raise FlexfeedError(f"a 'grads' variant{where} has no learning rate, so LESS cannot weight its "
                                f"{num_checkpoints} checkpoints",
                                "train with logging_steps small enough that trainer_state.json logs a learning rate "
                                "between every two checkpoints")
        return 1.0  # one checkpoint: its weight scales every score alike and changes no ranking
    return float(lr)


def checkpoint_pairs(ctx, target_signal: str = "grads_sgd", rows: np.ndarray | None = None,
                     ) -> list[tuple[float, int | np.ndarray, np.ndarray]]:
    """(lr, train, target features) per checkpoint, paired in the stores' variant order. `train` is the index of
    the train variant, whose rows are streamed by the signal source (`map_rows`) and never held whole; with
    `rows`, the train features of those rows only (only they are computed)."""
    if rows is None:
        train = list(enumerate(ctx.signals.variants("grads", "train")))
    else:
        train = list(enumerate(ctx.signals.get_rows_all("grads", rows, "train")))
    target = ctx.signals.get_all(target_signal, "target")
    if not train:
        raise FlexfeedError("signal 'grads' of the train split has no variants", "run the grads stage")
    if len(target) == 1 and len(train) > 1:
        target = target * len(train)  # one target gradient set serves every checkpoint
    if len(target) != len(train):
        raise FlexfeedError(f"'grads' has {len(train)} checkpoint variants but {target_signal!r} (target) has "
                            f"{len(target)}",
                            "compute target gradients at the same checkpoints as the train gradients")
    pairs = []
    for (variant, (meta, g_train)), (_, g_target) in zip(train, target):
        if rows is None:
            shape = check_shape(tuple(g_train), "grads", ctx.num_rows, 2)
        else:
            g_train = check_rows(np.asarray(g_train), "grads", len(rows), 2)
            shape = g_train.shape
        g_target = np.asarray(g_target)
        if g_target.ndim != 2 or g_target.shape[1] != shape[1]:
            raise FlexfeedError(f"target {target_signal!r} has shape {g_target.shape}, train 'grads' {shape}",
                                "use the same projection (proj_dim and seed) for train and target gradients")
        pairs.append((checkpoint_weight(meta, len(train)), variant if rows is None else g_train, g_target))
    return pairs


def task_centres(g_target: np.ndarray, task_of: np.ndarray, tasks: np.ndarray) -> np.ndarray:
    """(d, tasks) mean unit target gradient of each task: the mean cosine over a task's targets is the cosine
    with this vector's direction scaled by its length, so one product per train row scores every task."""
    t = unit_rows(g_target)
    return np.stack([t[task_of == task].mean(axis=0) for task in tasks], axis=1)


def task_influence(ctx, rows: np.ndarray | None = None, target_signal: str = "grads_sgd",
                   tasks_of: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """(rows, tasks) influence sum_i lr_i * mean_{z in task} cos(g_i(x), g_i^sgd(z)) of every train row (or of
    `rows` only) on each target task; `tasks_of(num_targets)` gives (task of each target row, task ids), by
    default the target's domains (`target_tasks`). Every row's influence is scored checkpoint by checkpoint,
    shard by shard (`ctx.signals.map_rows`): memory holds one checkpoint's target features and the
    (N, tasks) sums, never the train features."""
    pairs = checkpoint_pairs(ctx, target_signal, rows)
    num_targets = pairs[0][2].shape[0]
    task_of, tasks = (tasks_of or (lambda n: target_tasks(ctx, n)))(num_targets)
    per_task = None
    for lr, g_train, g_target in pairs:
        if g_target.shape[0] != num_targets:
            raise FlexfeedError("target gradient variants have different row counts",
                                "compute every checkpoint's target gradients over the same target set")
        rule = UnitProjection(task_centres(g_target, task_of, tasks))
        if isinstance(g_train, np.ndarray):
            contrib = lr * apply_blocks(rule, g_train)
        else:
            contrib = lr * np.asarray(ctx.signals.map_rows("grads", rule, "train", variant=g_train))
        per_task = contrib if per_task is None else per_task + contrib
    return per_task


def less_scores(ctx, rows: np.ndarray | None = None, task_reduce: str = "max",
                target_signal: str = "grads_sgd") -> np.ndarray:
    """LESS score of every train row (or of `rows` only), see the module doc; `target_signal` names
    the target gradients (`grads_sgd`, or NICE's `grads_nice`)."""
    per_task = task_influence(ctx, rows, target_signal)
    return per_task.max(axis=1) if task_reduce == "max" else per_task.mean(axis=1)


@SELECTORS.register("less")
class LessSelector(Selector):
    """Selects the rows whose gradients best align with the target tasks' gradients."""

    Params = LessParams
    paper = ("Xia et al., LESS: Selecting Influential Data for Targeted Instruction Tuning, ICML 2024 "
             "(arXiv 2402.04333)")
    rule = ("cosine to the target gradients at each checkpoint, weighted by its interval's mean learning rate, "
            "mean per target task, max over tasks; top rows")
    target_signal = "grads_sgd"
    consume_once = True  # fixed scores would retake the same top rows at every decision

    def needs(self) -> list[SignalNeed]:
        """Train gradient features per checkpoint and the target set's gradient features."""
        return [SignalNeed("grads", "train"), SignalNeed(self.target_signal, "target")]

    def select(self, ctx, num_samples: int) -> Selection:
        """The `num_samples` highest-scoring rows (ties by row id; the ranking repeats beyond N)."""
        k = check_count(num_samples, ctx.num_rows)
        scores = less_scores(ctx, task_reduce=self.params.task_reduce, target_signal=self.target_signal)
        indices = take_ranked(ranking(scores), k)
        return Selection(indices=indices, scores=scores, info=selection_info(ctx, indices, scores))
