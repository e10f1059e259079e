"""Per-row features from hidden layers of a reference model (signal `hidden`), COINCIDE's text features.

For each chosen layer l the hidden states are passed through an activation (tanh, as COINCIDE), pooled
over the row's real tokens (mean, or the last real token) and scaled to unit L2 norm; the layers'
vectors are concatenated and the whole scaled to unit norm again, so every layer counts equally and
inner products are cosines. One layer with `activation: none` is a plain pooled hidden state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from stages.args import ModelArgs
from stages.base import SignalDesc
from stages.batching import padded_batches
from stages.embed import pool_hidden
from stages.model_stage import FrozenModelStage
from stages.models import model_sources
from stages.values import bounded, check_fields
from store.errors import FlexfeedError


@dataclass(kw_only=True)
class HiddenArgs:
    """The hidden-layer feature stage (section `hidden:`)."""

    model_name_or_path: str | None = None
    """Reference model whose hidden states are read; default the training model (with its adapter, if any)."""
    layers: list[int] | None = None
    """hidden_states indices to read (0 the embedding output, 1..L the blocks, -1 the last); default `num_layers` evenly spaced from the first block to the last."""
    num_layers: int = bounded(5, low=1, high=1024)
    """How many evenly spaced layers when `layers` is unset (COINCIDE's M)."""
    pooling: Literal["mean", "last"] = "mean"
    """`mean` over the real (non-pad) tokens, or the `last` real token."""
    activation: Literal["tanh", "none"] = "tanh"
    """Applied to each hidden state before pooling: `tanh` (COINCIDE) or `none`."""
    batch_size: int = bounded(16, low=1, high=10**5)
    """Rows per forward pass."""
    max_length: int | None = bounded(None, low=1, high=10**7)
    """Truncate inputs; default cutoff_len."""

    def __post_init__(self):
        check_fields(self)
        if self.layers is not None and not self.layers:
            raise FlexfeedError("hidden.layers is an empty list", "list hidden_states indices, or unset it")


def model_layers(model_dir: str) -> tuple[int, int]:
    """(number of transformer blocks, hidden size) from a model folder's config.json."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    return int(cfg["num_hidden_layers"]), int(cfg.get("hidden_size") or cfg["d_model"])


def resolve_layers(layers: list[int] | None, num_layers: int, num_blocks: int) -> list[int]:
    """Distinct hidden_states indices in increasing order: the given ones (negative from the end), or
    `num_layers` evenly spaced from block 1 to block L (rounded, duplicates removed)."""
    if layers is None:
        m = min(num_layers, num_blocks)
        return sorted({int(round(v)) for v in np.linspace(1, num_blocks, m)})
    out = []
    for layer in layers:
        idx = layer + num_blocks + 1 if layer < 0 else layer
        if not 0 <= idx <= num_blocks:
            raise FlexfeedError(f"hidden layer {layer} is out of range for a model of {num_blocks} blocks",
                                f"use 0..{num_blocks} or -{num_blocks + 1}..-1 in hidden.layers")
        out.append(idx)
    return sorted(set(out))


def layer_features(hidden_states, attention_mask, layers: list[int], pooling: str, activation: str) -> torch.Tensor:
    """(B, M * H) features: per layer activation, pooling over real tokens, unit norm; concatenated, unit norm."""
    blocks = []
    for layer in layers:
        h = hidden_states[layer].float()
        if activation == "tanh":
            h = torch.tanh(h)
        pooled = pool_hidden(h, attention_mask, pooling)
        blocks.append(pooled / pooled.norm(dim=1, keepdim=True).clamp(min=1e-12))
    feats = torch.cat(blocks, dim=1)
    return feats / feats.norm(dim=1, keepdim=True).clamp(min=1e-12)


class HiddenStage(FrozenModelStage):
    """Signal `hidden`: `layer_features` of every row under the reference model."""

    code_version = "hidden-1"

    def __init__(self, model_args: ModelArgs, args: HiddenArgs, cutoff_len: int = 1024, padding_side: str = "right"):
        margs = model_args
        if args.model_name_or_path:
            margs = replace(margs, model_name_or_path=args.model_name_or_path, adapter_name_or_path=None)
        super().__init__(margs)
        self.args = args
        self.max_length = args.max_length or cutoff_len
        self.padding_side = padding_side
        num_blocks, self.hidden_size = model_layers(self.model_args.model_name_or_path)
        self.layers = resolve_layers(args.layers, args.num_layers, num_blocks)

    def signal(self) -> SignalDesc:
        """Keyed by the model's content, the resolved layers, pooling, activation and length (never a path)."""
        spec = {"kind": "hidden", "model": self.identity(), "layers": self.layers, "pooling": self.args.pooling,
                "activation": self.args.activation, "max_length": self.max_length, "code": self.code_version}
        return SignalDesc("hidden", spec, "float16", len(self.layers) * self.hidden_size,
                          sources=model_sources(self.model_args))

    def compute(self, rows: dict[str, list]) -> np.ndarray:
        self.ready()
        ids = [list(r[: self.max_length]) for r in rows["input_ids"]]
        out = np.zeros((len(ids), len(self.layers) * self.hidden_size), dtype=np.float32)
        pad_id = self.pad_id
        base = self._model.get_base_model() if hasattr(self._model, "get_base_model") else self._model
        inner = getattr(base, "model", base)  # the decoder: hidden states without the LM head's logits
        with torch.no_grad():
            for idx, batch in padded_batches(ids, self.args.batch_size, pad_id=pad_id, side=self.padding_side):
                mask = batch["attention_mask"]
                hidden = inner(input_ids=batch["input_ids"], attention_mask=mask,
                               position_ids=(mask.cumsum(-1) - 1).clamp(min=0), output_hidden_states=True).hidden_states
                out[idx] = layer_features(hidden, mask, self.layers, self.args.pooling,
                                          self.args.activation).cpu().numpy()
        return out
