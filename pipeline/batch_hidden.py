"""Pooled hidden states of a training batch, for weighters that weigh rows by what the model makes of them.

The training forward already computes every layer's hidden states; asking for them costs no second forward.
They are pooled exactly as the `embed` stage pools (same layer, `last` real token or `mean` over real tokens,
right or left padding alike), so a batch row and a stored `embed` row of the same text under the same model
are the same vector up to dropout: a weighter can compare the batch with a target set embedded by the store.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.embed import pool_hidden

from .config import RunConfig


@dataclass(frozen=True)
class BatchHidden:
    """Which hidden states of the training forward a weighter reads, and how they are pooled per row."""

    layer: int
    """Index into the forward's hidden states (-1: the last layer), as `embed.layer`."""
    pooling: str
    """`last` real token or `mean` over real tokens, as `embed.pooling`."""

    def pool(self, hidden_states: tuple, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, d) float32, detached: the chosen layer pooled over each row's real tokens."""
        return pool_hidden(hidden_states[self.layer].detach().float(), attention_mask, self.pooling)


def batch_hidden_of(cfg: RunConfig, strategies: list) -> BatchHidden | None:
    """The pooling the run's weighters read from the training forward: `embed:`'s layer and pooling, so a batch
    row and the target set's stored `embed` rows are one function of the text (None when no weighter reads it).
    A weighter refuses, at load, an `embed:` that is not the training model's own (its `check_config`)."""
    if not any(getattr(s, "reads_batch_hidden", False) for s in strategies):
        return None
    return BatchHidden(layer=cfg.embed.layer, pooling=cfg.embed.pooling)
