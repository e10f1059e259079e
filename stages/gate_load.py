"""Per-row expert loads of a mixture-of-experts model: how many of the row's tokens each router sends to each expert.

One row of the `gate_load` signal concatenates, over every MoE layer, the token counts of the top-k routing of
`router_logits` (Hugging Face's Mixtral, Qwen2-MoE, OLMoE with `output_router_logits=True`). Summed over a
domain's rows and L1-normalised, they are the domain's expert load profile (dynamic_moe's O_d). Each layer
routes every token to the same number of experts, so the normalised profile weighs every layer alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from stages.args import ModelArgs
from stages.base import SignalDesc
from stages.batching import padded_batches
from stages.model_stage import FrozenModelStage
from stages.models import model_sources
from stages.moe import expert_counts, moe_layout
from store.errors import FlexfeedError


class GateLoadStage(FrozenModelStage):
    """Signal `gate_load`: (rows, MoE layers x experts) token counts of the training model's routing."""

    code_version = "gate-load-1"

    def __init__(self, model_args: ModelArgs, batch_size: int = 16, max_length: int = 1024):
        super().__init__(model_args)
        self.batch_size = batch_size
        self.max_length = max_length
        config = json.loads((Path(self.model_args.model_name_or_path) / "config.json").read_text())
        self.layers, self.experts, self.top_k = moe_layout(config)  # no router: refused here, before training

    def signal(self) -> SignalDesc:
        spec = {"kind": "gate_load", "model": self.identity(), "max_length": self.max_length, "code": self.code_version}
        return SignalDesc("gate_load", spec, "float32", self.layers * self.experts,
                          sources=model_sources(self.model_args))

    def compute(self, rows: dict[str, list]) -> np.ndarray:
        self.ready()
        ids = [list(r[: self.max_length]) for r in rows["input_ids"]]
        pad_id = self.pad_id
        out = np.zeros((len(ids), self.layers * self.experts), dtype=np.float32)
        with torch.no_grad():
            for idx, batch in padded_batches(ids, self.batch_size, pad_id=pad_id):
                result = self._model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     output_router_logits=True)
                logits = getattr(result, "router_logits", None)
                if not logits or len(logits) != self.layers:
                    raise FlexfeedError(
                        f"the model returned router logits of {0 if not logits else len(logits)} layers, its config "
                        f"says {self.layers} MoE layers", "use a Hugging Face MoE model that returns router_logits "
                        "(Mixtral, Qwen2-MoE, OLMoE)")
                out[idx] = expert_counts(logits, batch["attention_mask"], self.top_k).cpu().numpy()
        return out
