"""Rows that train nothing: a `cutoff_len` that cuts every answer away leaves a run of loss 0 that learns nothing."""

from __future__ import annotations

import logging

from stages.batching import IGNORE_INDEX
from store.errors import FlexfeedError

log = logging.getLogger("flexfeed.data")


def untrained_rows(data, batch_rows: int = 4096) -> int:
    """How many rows have no trained token (every label after the first masked: the loss has no term)."""
    count = 0
    for batch in data.dataset.select_columns(["labels"]).iter(batch_size=batch_rows):
        count += sum(1 for labels in batch["labels"] if all(t == IGNORE_INDEX for t in labels[1:]))
    return count


def check_trained_rows(data, cutoff_len: int, what: str = "training") -> None:
    """Refuse data of which no row keeps a trained token; warn when some rows keep none."""
    if len(data) == 0:
        return
    untrained = untrained_rows(data)
    if untrained == len(data):
        raise FlexfeedError(
            f"no {what} row keeps a trained token: with cutoff_len {cutoff_len} every row's answer is cut away "
            "(or masked), so every loss would be 0 and the run would learn nothing",
            "raise cutoff_len above the prompts' length, or use stage: pt to train on every token")
    if untrained:
        log.warning("%d of %d %s rows keep no trained token with cutoff_len %d: they add nothing to the loss",
                    untrained, len(data), what, cutoff_len)
