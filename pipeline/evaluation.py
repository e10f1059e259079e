"""Evaluation during training, as LLaMA-Factory runs it: the evaluation set, the val_size split, early stopping.

The evaluation set is `eval_dataset`, or the training rows `val_size` holds out (never trained on). Trainer
evaluates it every `eval_steps` under `eval_strategy`; FlexfeedTrainer keeps its batches sequential, its loss
unweighted and out of the data plan, and adds `eval_<domain>_loss` when it spans several domains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from transformers import EarlyStoppingCallback

from stages.data import TokenizedData
from store.errors import FlexfeedError
from store.hashing import stable_hash

from .config import RunConfig
from .config.eval_checks import metric_key, training_value
from .rows import RowsDataset

SPLIT_VERSION = "val-split/1"
"""Names how held-out rows are drawn; part of the split sets' fingerprints (bump if the draw changes)."""


@dataclass
class Split:
    """Training rows and the rows val_size holds out; `kept` are the training rows' ids in the loaded data."""

    train: TokenizedData
    held_out: TokenizedData
    kept: np.ndarray


def num_held_out(val_size: float, num_rows: int) -> int:
    """Rows val_size holds out: a share (below 1, rounded up, as datasets' train_test_split) or a count."""
    n = math.ceil(val_size * num_rows) if val_size < 1 else int(val_size)
    if not 1 <= n < num_rows:
        raise FlexfeedError(f"val_size {val_size:g} holds out {n} of the {num_rows} training rows",
                            "hold out at least one row and leave at least one to train on")
    return n


def subset(data: TokenizedData, rows: np.ndarray, fingerprint: str) -> TokenizedData:
    """The rows `rows` of `data` (in that order), same domains, under their own fingerprint."""
    return TokenizedData(dataset=data.dataset.select(rows.tolist()), domain_names=list(data.domain_names),
                         fingerprint=fingerprint)


def split_validation(data: TokenizedData, val_size: float, seed: int) -> Split:
    """Hold out val_size of the rows, drawn by `seed`; both parts keep the loaded order."""
    n = num_held_out(val_size, len(data))
    order = np.random.default_rng(seed).permutation(len(data))
    held, kept = np.sort(order[:n]), np.sort(order[n:])
    # keyed by what produced each part: the loaded rows' content, the draw and which part
    key = {"of": data.fingerprint, "split": SPLIT_VERSION, "val_size": val_size, "seed": seed}
    return Split(train=subset(data, kept, stable_hash({**key, "part": "train"})),
                 held_out=subset(data, held, stable_hash({**key, "part": "eval"})), kept=kept)


def split_seed(cfg: RunConfig) -> int:
    """The val_size draw's seed: the run's `seed` (as LLaMA-Factory's split_dataset)."""
    return int(training_value(cfg.training, "seed"))


def present_domains(data: TokenizedData) -> list[str]:
    """The names of the domains that have rows in `data`, in domain order."""
    ids = set(np.unique(data.domain_ids()).tolist())
    return [name for k, name in enumerate(data.domain_names) if k in ids]


def eval_dataset_for(cfg: RunConfig, data: TokenizedData | None):
    """What Trainer evaluates: the rows, or under eval_on_each_dataset one set per dataset (domain)."""
    if data is None:
        return None
    if not cfg.data.eval_on_each_dataset:
        return RowsDataset(data)
    domains = data.domain_ids()
    return {name: RowsDataset(subset(data, np.flatnonzero(domains == k), f"{data.fingerprint}/{name}"))
            for k, name in enumerate(data.domain_names) if (domains == k).any()}


def logged_metrics(cfg: RunConfig, data: TokenizedData) -> list[str]:
    """The loss metrics evaluating `data` logs (a domain with no rows logs none)."""
    parts = [f"eval_{name}_loss" for name in present_domains(data)]
    if cfg.data.eval_on_each_dataset:
        return parts
    return ["eval_loss", *(parts if len(parts) > 1 else [])]


def eval_callbacks(cfg: RunConfig, args, data: TokenizedData | None) -> list:
    """Early stopping, when configured; metric_for_best_model checked against what the evaluation set logs.

    The config was checked at load; here the rows are known, so a domain val_size left without rows is caught
    before training rather than at the first evaluation.
    """
    if data is None or args.eval_strategy == "no":
        return []
    metrics = logged_metrics(cfg, data)
    if args.metric_for_best_model is not None and metric_key(args.metric_for_best_model) not in metrics:
        raise FlexfeedError(f"metric_for_best_model {args.metric_for_best_model!r} is not logged: the evaluation "
                            f"set logs {', '.join(metrics)}", "choose one of those (a domain needs held-out rows)")
    patience = cfg.evaluation.early_stopping_steps
    if patience is None:
        return []
    if args.metric_for_best_model is None:  # eval_loss exists: the load-time check refused its absence
        args.metric_for_best_model, args.greater_is_better = "eval_loss", False
    threshold = cfg.evaluation.early_stopping_min_delta or 0.0
    return [EarlyStoppingCallback(early_stopping_patience=patience, early_stopping_threshold=threshold)]
