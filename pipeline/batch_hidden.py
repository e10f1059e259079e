"""Pooled hidden states of a training batch, for weighters that weigh rows by what the model makes of them.

The training forward already computes every layer's hidden states; asking for them costs no second forward.
They are pooled exactly as the `embed` stage pools (same layer, `last` real token or `mean` over real tokens,
right or left padding alike), so a batch row and a stored `embed` row of the same text under the same model
are the same vector up to dropout: a weighter can compare the batch with a target set embedded by the store.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.embed import pool_hidden, resolve_backend
from store.errors import FlexfeedError

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
    """The pooling the run's weighters read from the training forward (None when none reads it).

    Their target embeddings come from the `embed` signal, so that signal must be the training model's own
    pooled hidden states; another encoder would put the batch and the target in different spaces.
    """
    readers = [s.name for s in strategies if getattr(s, "reads_batch_hidden", False)]
    if not readers:
        return None
    embed = cfg.embed
    if embed.model_name_or_path is not None or resolve_backend(embed.backend) != "hf":
        raise FlexfeedError(
            f"{', '.join(readers)} compares each batch's hidden states (training model) with the target set's "
            f"`embed` signal, but embed uses backend {embed.backend!r}"
            + (f" and model {embed.model_name_or_path!r}" if embed.model_name_or_path else ""),
            "set embed.backend: hf and leave embed.model_name_or_path unset, so both are the training model's "
            "pooled hidden states")
    return BatchHidden(layer=embed.layer, pooling=embed.pooling)
