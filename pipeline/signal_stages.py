"""Which stage objects produce a signal: offline (one per checkpoint for gradients) or at the live state."""

from __future__ import annotations

from dataclasses import replace

from stages.base import Stage
from stages.embed import EmbedStage
from stages.gate_load import GateLoadStage
from stages.grads.nice import NiceTargetStage
from stages.grads.stage import GradsStage
from stages.hidden import HiddenStage
from stages.loss import LossStage
from stages.ngram import NgramStage
from store.errors import FlexfeedError

from .config import RunConfig


def checkpoints_of(cfg: RunConfig) -> list[str | None]:
    """The configured gradient checkpoints, or [None] for the model as loaded."""
    return list(cfg.grads.checkpoints) or [None]


def grads_stage(cfg: RunConfig, grad_type: str, checkpoint: str | None) -> Stage:
    """The gradient stage of one checkpoint (None: the model as loaded)."""
    return GradsStage(cfg.model, replace(cfg.grads, grad_type=grad_type), checkpoint)


def stages_for(cfg: RunConfig, name: str, split: str) -> list[Stage]:
    """The stage objects that produce signal `name` for a split (several for per-checkpoint grads)."""
    cutoff = cfg.data.cutoff_len
    if name == "embed":
        return [EmbedStage(cfg.model, cfg.embed, cutoff_len=cutoff)]
    if name == "gate_load":  # a forward without gradients, like the loss stage: its batch size
        return [GateLoadStage(cfg.model, cfg.loss.batch_size, max_length=cutoff)]
    if name in ("loss", "ref_loss"):
        args = cfg.loss if cfg.loss.signal == name else replace(cfg.loss, signal=name)
        if name == "loss" and cfg.loss.signal != "loss":
            args = replace(args, model_name_or_path=None, adapter_name_or_path=None)
        return [LossStage(cfg.model, args)]
    if name == "grads":
        return [grads_stage(cfg, cfg.grads.grad_type, ck) for ck in checkpoints_of(cfg)]
    if name == "grads_sgd":
        return [grads_stage(cfg, "sgd", ck) for ck in checkpoints_of(cfg)]
    if name == "grads_nice":
        return [NiceTargetStage(cfg.model, cfg.grads, ck) for ck in checkpoints_of(cfg)]
    if name == "ngram":  # counts of the text: no model, so no checkpoint or live variant
        return [NgramStage(cfg.ngram)]
    if name == "hidden":
        return [HiddenStage(cfg.model, cfg.hidden, cutoff_len=cutoff)]
    raise FlexfeedError(f"no stage produces signal {name!r}",
                        "signals are embed, hidden, ngram, loss, ref_loss, grads, grads_sgd, grads_nice")


def live_stage_for(cfg: RunConfig, name: str, split: str) -> Stage:
    """The one stage that computes signal `name` at the live training state (what a refresh writes).

    Gradients are the training model's own (no checkpoint); `grads` with grad_type adam is
    preconditioned by the live optimizer's moments, bound at each refresh.
    """
    if name == "grads":
        return GradsStage(cfg.model, cfg.grads, None, live=True)
    if name == "grads_sgd":
        return GradsStage(cfg.model, replace(cfg.grads, grad_type="sgd"), None, live=True)
    if name == "ref_loss":
        raise FlexfeedError("ref_loss is a fixed reference model's loss and is never refreshed",
                            "drop ref_loss from refresh.signals")
    if name == "grads_nice":
        return NiceTargetStage(cfg.model, cfg.grads, None)
    (stage,) = stages_for(cfg, name, split)
    return stage
