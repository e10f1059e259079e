"""Padding rows into batches, and splitting a shard's rows into batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch

IGNORE_INDEX = -100


def pad_batch(
    input_ids: list[list[int]], labels: list[list[int]] | None = None, *, pad_id: int = 0, side: str = "right",
) -> dict[str, torch.Tensor]:
    """Pad to the longest row: input_ids, attention_mask and labels (pad positions -100)."""
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
    width = max(len(r) for r in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    lab = torch.full((len(input_ids), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(input_ids):
        n = len(row)
        sl = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, sl] = torch.tensor(row, dtype=torch.long)
        mask[i, sl] = 1
        lab[i, sl] = torch.tensor(labels[i] if labels is not None else row, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def batches(num_rows: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``batch_size`` rows."""
    for start in range(0, num_rows, batch_size):
        yield slice(start, min(num_rows, start + batch_size))


def length_sorted_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Index batches of similar length (less padding); callers scatter results back by index."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def padded_batches(input_ids: list[list[int]], batch_size: int, *, labels: list[list[int]] | None = None,
                   pad_id: int = 0, side: str = "right") -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(row indices, padded batch) over rows of similar length; callers scatter results back by the indices."""
    for idx in length_sorted_batches([len(r) for r in input_ids], batch_size):
        rows_labels = [labels[i] for i in idx] if labels is not None else None
        yield idx, pad_batch([input_ids[i] for i in idx], rows_labels, pad_id=pad_id, side=side)
