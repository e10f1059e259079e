"""From a run config to data, stores and stage objects: what `flexfeed stage` and training share."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from stages.base import Stage
from stages.data import TokenizedData, load_data
from stages.embed import EmbedStage
from stages.loss import LossStage
from stages.models import load_tokenizer
from stages.runner import RunResult, run_stage
from store.errors import FlexfeedError
from store.store import Store

STAGES = ("embed", "loss", "grads", "index")


@dataclass
class Prepared:
    """Tokenizer, train and target data, and their stores (one store per dataset fingerprint)."""

    tokenizer: object
    train: TokenizedData
    target: TokenizedData | None
    train_store: Store
    target_store: Store | None


def store_for(cfg, data: TokenizedData) -> Store:
    """The store of a dataset lives at `<store>/<dataset fingerprint>`."""
    root = Path(cfg.store.store) / data.fingerprint
    return Store.open_or_create(root, dataset_fingerprint=data.fingerprint, num_rows=len(data),
                                shard_rows=cfg.store.shard_rows,
                                dataset_info={"datasets": data.domain_names})


def prepare(cfg, *, need_target: bool = True) -> Prepared:
    tok = load_tokenizer(cfg.model)
    train = load_data(cfg.data, tok)
    target = None
    if need_target and cfg.data.eval_dataset:
        target = load_data(cfg.data, tok, list(cfg.data.eval_dataset))
    return Prepared(tok, train, target, store_for(cfg, train), store_for(cfg, target) if target is not None else None)


def checkpoints_of(cfg) -> list[str | None]:
    return list(cfg.grads.checkpoints) or [None]


def grads_stage(cfg, grad_type: str, checkpoint: str | None) -> Stage:
    from stages.grads.stage import GradsStage

    return GradsStage(cfg.model, replace(cfg.grads, grad_type=grad_type), checkpoint)


def stages_for(cfg, name: str, split: str) -> list[Stage]:
    """The stage objects that produce signal `name` for a split (several for per-checkpoint grads)."""
    cutoff = cfg.data.cutoff_len
    if name == "embed":
        return [EmbedStage(cfg.model, cfg.embed, cutoff_len=cutoff)]
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
        from stages.grads.nice import NiceTargetStage

        return [NiceTargetStage(cfg.model, cfg.grads, ck) for ck in checkpoints_of(cfg)]
    raise FlexfeedError(f"no stage produces signal {name!r}",
                        "signals are embed, loss, ref_loss, grads, grads_sgd, grads_nice")


def live_stage_for(cfg, name: str, split: str) -> Stage:
    """The one stage that computes signal `name` at the live training state (what a refresh writes).

    Gradients are the training model's own (no checkpoint); `grads` with grad_type adam is
    preconditioned by the live optimizer's moments, bound at each refresh.
    """
    from stages.grads.stage import GradsStage

    if name == "grads":
        return GradsStage(cfg.model, cfg.grads, None, live=True)
    if name == "grads_sgd":
        return GradsStage(cfg.model, replace(cfg.grads, grad_type="sgd"), None, live=True)
    if name == "ref_loss":
        raise FlexfeedError("ref_loss is a fixed reference model's loss and is never refreshed",
                            "drop ref_loss from refresh.signals")
    if name == "grads_nice":
        from stages.grads.nice import NiceTargetStage

        return NiceTargetStage(cfg.model, cfg.grads, None)
    (stage,) = stages_for(cfg, name, split)
    return stage


def run_stage_job(cfg, which: str, *, progress: bool = True, prepared: Prepared | None = None) -> list[RunResult]:
    """`flexfeed stage WHICH CONFIG`: compute what is missing, for train and (where used) target rows."""
    if which not in (*STAGES, "all"):
        raise FlexfeedError(f"unknown stage {which!r}", f"use one of {', '.join(STAGES)} or all")
    p = prepared or prepare(cfg)
    results: list[RunResult] = []
    todo = STAGES if which == "all" else (which,)
    for name in todo:
        if name == "index":
            results.extend(index_job(cfg, p))
            continue
        plan: list[tuple[Stage, TokenizedData, Store]] = []
        if name == "embed":
            plan += [(s, p.train, p.train_store) for s in stages_for(cfg, "embed", "train")]
            if p.target is not None:
                plan += [(s, p.target, p.target_store) for s in stages_for(cfg, "embed", "target")]
        elif name == "loss":
            plan += [(s, p.train, p.train_store) for s in stages_for(cfg, cfg.loss.signal, "train")]
        elif name == "grads":
            train_grads = which != "all" or _grads_wanted(cfg)
            if not train_grads and not _target_grads_wanted(cfg):
                continue
            if train_grads:
                plan += [(s, p.train, p.train_store) for s in stages_for(cfg, "grads", "train")]
            if p.target is not None:
                plan += [(s, p.target, p.target_store) for s in stages_for(cfg, "grads_sgd", "target")]
                if str(getattr(cfg.flex, "component", "") or "") == "nice":
                    plan += [(s, p.target, p.target_store) for s in stages_for(cfg, "grads_nice", "target")]
        for stage, data, store in plan:
            results.append(run_stage(stage, data, store, cfg.runner, progress=progress))
    return results


def _grads_wanted(cfg) -> bool:
    """`stage all` computes train gradients when the config asks for them (checkpoints, or a gradient
    selector reading every row's gradient; `cluster` computes those of its probe rows at decisions)."""
    comp = str(getattr(cfg.flex, "component", "") or "")
    return bool(cfg.grads.checkpoints) or comp in ("less", "nice")


def _target_grads_wanted(cfg) -> bool:
    """Target gradients: whenever train gradients are wanted, and for `cluster`'s gradient scores."""
    comp = str(getattr(cfg.flex, "component", "") or "")
    return _grads_wanted(cfg) or comp in ("cluster", "cluster_less")


def index_job(cfg, p: Prepared) -> list[RunResult]:
    from store.faiss_index import build_index, index_status

    out = []
    for store in [s for s in (p.train_store, p.target_store) if s is not None]:
        for sig in store.find(cfg.index.signal):
            fresh = index_status(sig) == "fresh"
            if not fresh and sig.is_complete():
                build_index(sig, flat_max_rows=cfg.index.flat_max_rows)
            out.append(RunResult(signal=f"index:{sig.name}", key=sig.key, computed=[] if fresh else [0],
                                 skipped=1 if fresh else 0))
    return out

