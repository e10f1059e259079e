"""GradsStage: per-sample LoRA gradient features of a shard's rows, one signal per checkpoint."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from stages.args import GradsArgs, ModelArgs
from stages.base import SignalDesc, Stage
from stages.batching import length_sorted_batches, pad_batch
from stages.grads.checkpoint import checkpoint_identity, checkpoint_lr, checkpoint_step
from stages.grads.features import build_projector, compute_features
from stages.grads.precondition import AdamPreconditioner, load_adam_state
from stages.grads.projection import projection_spec
from stages.models import (
    load_model,
    load_tokenizer,
    model_identity,
    model_sources,
    resolve_model_args,
    source_path,
)
from store.errors import FlexfeedError


class GradsStage(Stage):
    """Signal `grads` (Adam-preconditioned, LESS) or `grads_sgd` (raw gradients): (rows, proj_dim)."""

    code_version = "grads-1"
    needs_grad = True

    def __init__(self, model_args: ModelArgs, args: GradsArgs, checkpoint: str | None = None, *, live: bool = False,
                 since_step: int | None = None):
        # GradsArgs checks its own ranges and choices; what needs the checkpoint is checked here
        if args.grad_type == "adam" and checkpoint is None and not live:
            raise FlexfeedError("grads.grad_type adam needs a checkpoint with optimizer state, none given",
                                hint="list Trainer checkpoint directories under grads.checkpoints, or use grad_type: sgd")
        if live and checkpoint is not None:
            raise FlexfeedError("a live gradient stage computes with the training model, not a checkpoint",
                                hint="build it with checkpoint=None")
        self.args = args
        # live: the training model at a decision, preconditioned (adam) by the live optimizer's moments
        self.live = live
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        # the step of the previous configured checkpoint: LESS weights a checkpoint by the mean learning rate
        # of the interval since the one before it (None: the nearest earlier checkpoint folder beside it)
        self.since_step = since_step
        # the checkpoint's adapter is the model whose gradients we take
        self.model_args = resolve_model_args(  # a hub id's snapshot, once: every worker loads it
            replace(model_args, adapter_name_or_path=self.checkpoint) if checkpoint else model_args)
        self._spec: dict | None = None
        self._model = self._projector = self._preconditioner = None
        self._pad_id = 0

    def __getstate__(self):
        # ship the description to workers, never a loaded model
        state = dict(self.__dict__)
        state["_model"] = state["_projector"] = state["_preconditioner"] = None
        return state

    def signal(self) -> SignalDesc:
        """`grads` or `grads_sgd`, keyed by model and checkpoint content, projection and code version (no path)."""
        if self._spec is None:
            adam = self.args.grad_type == "adam"
            ckpt = None
            if self.checkpoint is not None:
                lr = checkpoint_lr(self.checkpoint, self.since_step)
                lr_source = "trainer_state"
                if lr is None and adam:
                    lr, lr_source = self._optimizer_lr(), "optimizer"
                ckpt = {"hash": checkpoint_identity(self.checkpoint, with_optimizer=adam),
                        "step": checkpoint_step(self.checkpoint), "lr": lr, "lr_source": lr_source if lr is not None else None}
            self._spec = {
                "kind": "grads", "model": model_identity(self.model_args), "checkpoint": ckpt,
                "lr": ckpt["lr"] if ckpt else None, "grad_type": self.args.grad_type,
                # the projection's settings and its structure's version: other numbers, another key
                **projection_spec(self.args.proj_dim, self.args.proj_type, self.args.seed, self.args.proj_structure),
                "normalize": self.args.normalize, "loss": "token_mean", "code_version": self.code_version,
            }
            if self.args.compute_dtype != "float32":  # other numbers, another key (float32 keys unchanged)
                self._spec["compute_dtype"] = self.args.compute_dtype
            if self.live and adam:
                # no checkpoint's moments: the run's optimizer state at each decision (a run-scoped signal)
                self._spec["preconditioner"] = "live_optimizer"
        name = "grads" if self.args.grad_type == "adam" else "grads_sgd"
        return SignalDesc(name=name, spec=self._spec, dtype=self.args.dtype, dim=self.args.proj_dim,
                          sources=self.sources())

    def sources(self) -> dict[str, str]:
        """Where the model, adapter and checkpoint were read from (metadata for `store info`, not keyed)."""
        out = model_sources(self.model_args)
        if self.checkpoint is not None:
            out["checkpoint"] = source_path(self.checkpoint)
        return out

    def live_state_keys(self) -> tuple[str, ...]:
        """Live training state bound at each refresh: the optimizer's moments for live adam features."""
        return ("adam_state",) if self.live and self.args.grad_type == "adam" else ()

    def _optimizer_lr(self) -> float | None:
        model = load_model(self.model_args, trainable=True)
        params = [(n, p.shape) for n, p in model.named_parameters() if p.requires_grad]
        return load_adam_state(self.checkpoint, params).lr

    def setup(self) -> None:
        """Load the model (with the checkpoint's adapter), its Adam moments and the projector, once."""
        if self._model is not None:
            return
        model = load_model(self.model_args, trainable=True)
        if torch.cuda.is_available():
            model = model.to("cuda")
        self.bind_model(model, load_tokenizer(self.model_args))

    def bind_model(self, model, tokenizer, adam_state=None) -> None:
        """Compute with an already-loaded model: same projection; Adam moments from `adam_state` (the live
        optimizer's, for a live stage) or from the checkpoint."""
        self._model = model
        self._pad_id = tokenizer.pad_token_id or 0
        self._projector = build_projector(model, self.args.proj_dim, proj_type=self.args.proj_type,
                                          seed=self.args.seed, structure=self.args.proj_structure)
        if self.args.grad_type == "adam":
            if adam_state is None and self.checkpoint is None:
                raise FlexfeedError("a live adam gradient stage needs the optimizer's moments",
                                    hint="bind it with adam_state (pipeline.live_state.live_adam_state)")
            if adam_state is None:
                params = [(n, p.shape) for n, p in model.named_parameters() if p.requires_grad]
                adam_state = load_adam_state(self.checkpoint, params)
            device = next(model.parameters()).device
            self._preconditioner = AdamPreconditioner(adam_state, device=device)

    def compute(self, rows: dict[str, list]) -> np.ndarray:
        """(len(rows), proj_dim) float32 features, in length-sorted batches of batch_size rows."""
        self.setup()
        input_ids, labels = rows["input_ids"], rows.get("labels") or rows["input_ids"]
        out = np.zeros((len(input_ids), self.args.proj_dim), dtype=np.float32)
        for index in length_sorted_batches([len(r) for r in input_ids], self.args.batch_size):
            empty = [i for i in index if len(input_ids[i]) == 0]
            if empty:
                raise FlexfeedError(f"row {empty[0]} of the shard has no tokens",
                                    hint="drop empty samples in the data stage (cutoff_len, filters)")
            batch = pad_batch([input_ids[i] for i in index], [labels[i] for i in index], pad_id=self._pad_id)
            feats = compute_features(self._model, batch, self._projector, self._preconditioner,
                                     normalize=self.args.normalize, compute_dtype=self.args.compute_dtype)
            out[index] = feats.cpu().numpy()
        return out

    def model_version(self) -> tuple[int, str]:
        """(checkpoint step, checkpoint hash) or (0, model weight hash) without a checkpoint."""
        spec = self.signal().spec
        if spec["checkpoint"]:
            return spec["checkpoint"]["step"], spec["checkpoint"]["hash"]
        return 0, spec["model"]["weights"]


def grads_stages(model_args: ModelArgs, args: GradsArgs) -> list[GradsStage]:
    """One stage per checkpoint in ``args.checkpoints`` (the model as loaded when there are none)."""
    if not args.checkpoints:
        return [GradsStage(model_args, args, None)]
    since = interval_starts(args.checkpoints)
    return [GradsStage(model_args, args, c, since_step=since[c]) for c in args.checkpoints]


def interval_starts(checkpoints: list[str]) -> dict[str, int]:
    """Each configured checkpoint's interval start for LESS's weight: the previous configured one's step, or 0."""
    steps = {c: checkpoint_step(c) for c in checkpoints}
    return {c: max((s for s in steps.values() if s < steps[c]), default=0) for c in checkpoints}
