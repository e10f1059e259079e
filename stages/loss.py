"""Per-sample mean token loss and token count, batched, for the training or a reference model.

The signal has two columns: (mean token loss, number of trained tokens). Reference losses for
DoReMi come from here (the reference model runs offline), so no second model sits in memory while
training.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from stages.args import LossArgs, ModelArgs
from stages.base import SignalDesc
from stages.batching import IGNORE_INDEX, padded_batches
from stages.model_stage import FrozenModelStage
from stages.models import model_sources
from store.errors import FlexfeedError


def per_sample_loss(logits, labels):
    """Token-mean cross-entropy per row and the token counts (labels already aligned to inputs)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(shift_labels.shape)
    mask = (shift_labels != IGNORE_INDEX).to(tok.dtype)
    count = mask.sum(1)
    return (tok * mask).sum(1) / count.clamp(min=1), count


class LossStage(FrozenModelStage):
    """Signal `loss` (training model) or `ref_loss` (reference model): columns (loss, tokens)."""

    code_version = "loss-1"

    def __init__(self, model_args: ModelArgs, args: LossArgs):
        if args.batch_size < 1:
            raise FlexfeedError(f"loss.batch_size must be >= 1, got {args.batch_size}", "e.g. 16")
        self.args = args
        margs = model_args
        if args.model_name_or_path:
            margs = replace(margs, model_name_or_path=args.model_name_or_path, adapter_name_or_path=None)
        if args.adapter_name_or_path:
            margs = replace(margs, adapter_name_or_path=args.adapter_name_or_path)
        super().__init__(margs)

    def signal(self) -> SignalDesc:
        """`loss` or `ref_loss`, keyed by the model's content; its folders go to the unkeyed sources."""
        spec = {"kind": "loss", "model": self.identity(), "code": self.code_version}
        return SignalDesc(self.args.signal, spec, "float32", 2, sources=model_sources(self.model_args))

    def compute(self, rows: dict[str, list]) -> np.ndarray:
        self.ready()
        return losses_of(self._model, rows["input_ids"], rows["labels"], self.args.batch_size, self.pad_id)


def losses_of(model, input_ids: list[list[int]], labels: list[list[int]], batch_size: int, pad_id: int) -> np.ndarray:
    """(N, 2) array of (mean token loss, token count) with batched forwards, no gradients."""
    out = np.zeros((len(input_ids), 2), dtype=np.float32)
    with torch.no_grad():
        for idx, batch in padded_batches(input_ids, batch_size, labels=labels, pad_id=pad_id):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, count = per_sample_loss(logits, batch["labels"])
            out[idx, 0] = loss.cpu().numpy()
            out[idx, 1] = count.cpu().numpy()
    return out
