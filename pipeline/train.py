"""`flexfeed train`: one plain function from a validated config to a trained run directory."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from pathlib import Path

import numpy as np

from stages.loss import losses_of
from stages.models import load_model
from store.errors import FlexfeedError
from store.hashing import stable_hash

from .jobs import Prepared, prepare
from .live_state import live_adam_state, live_lr
from .plan import Windows, rng_for
from .rows import RowCollator, RowsDataset
from .run_files import DECISIONS_FILE, MIX_FILE, RUN_FILE, WEIGHTS_FILE
from .scheduler import Scheduler
from .signals import Refresher, StoreSignals, ValueCache, plan_routes
from .state_io import load_state, save_state
from .strategies import DecisionContext, registry_for
from .trainer import FlexfeedCallback, FlexfeedTrainer, FlexRun, write_jsonl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_dist_env() -> None:
    """DeepSpeed without a launcher: a one-process gloo group on loopback (no mpi4py needed)."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def build_strategy(cfg, seed: int):
    kind = cfg.flex.train_type
    if kind == "static":
        return None
    if not cfg.flex.component:
        raise FlexfeedError(f"train_type {kind} needs a component", "set `component:` (e.g. less, doremi, loss)")
    return registry_for(kind).build(cfg.flex.component, cfg.flex.component_args, seed=seed)


def initial_proportions(cfg, domain_ids: np.ndarray, k: int) -> np.ndarray:
    init = getattr(cfg.flex, "init_mixture_proportions", None)
    if init:
        p = np.asarray(init, dtype=np.float64)
        if p.shape != (k,):
            raise FlexfeedError(f"init_mixture_proportions has {p.size} values for {k} datasets",
                                "give one proportion per dataset, in the order of `dataset`")
        return p
    rule = getattr(cfg.flex, "mixture_sample_rule", None) or "uniform"
    if rule == "stratified":
        return np.bincount(domain_ids, minlength=k).astype(np.float64)
    return np.full(k, 1.0 / k)


def train(cfg, *, extra_callbacks=(), prepared: Prepared | None = None) -> dict:
    """Run training as configured; returns a small summary (paths, steps, final loss)."""
    from transformers.trainer_utils import get_last_checkpoint

    from .config import to_training_arguments

    changes: dict = {"remove_unused_columns": False}  # row ids and domains ride along in each batch
    if cfg.training.get("deepspeed"):
        ensure_dist_env()
        import torch

        if not torch.cuda.is_available():
            # Without a GPU, accelerate picks no backend for DeepSpeed and counts one process whatever
            # the launcher started: set the state up with gloo first and have Trainer use it.
            from accelerate import PartialState

            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            try:
                PartialState(backend=cfg.training.get("ddp_backend") or "gloo")
            finally:
                del os.environ["ACCELERATE_USE_DEEPSPEED"]
            changes["accelerator_config"] = {"use_configured_state": True}
    args = to_training_arguments(cfg, **changes)
    kind = cfg.flex.train_type
    p = prepared or prepare(cfg, need_target=bool(cfg.data.eval_dataset))
    model = load_model(cfg.model, trainable=True)
    pad_id = p.tokenizer.pad_token_id if p.tokenizer.pad_token_id is not None else 0
    world = max(1, args.world_size)
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    n = len(p.train)
    max_steps = args.max_steps if args.max_steps and args.max_steps > 0 else \
        max(1, math.ceil(args.num_train_epochs * n / global_batch))
    args.max_steps = max_steps
    strategy = build_strategy(cfg, args.seed)
    flex = FlexRun(kind)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer_ref: dict = {}
    value_cache = ValueCache()
    # where each signal the strategy reads comes from (live or offline), planned and checked before training
    routes = plan_routes(cfg, strategy.needs(), str(cfg.flex.component)) if strategy is not None else {}

    if kind != "static":
        windows = Windows(global_batch=global_batch, max_steps=max_steps, warmup_step=cfg.flex.warmup_step,
                          update_step=cfg.flex.update_step, update_times=cfg.flex.update_times)
        domain_ids = p.train.domain_ids()
        init_p = initial_proportions(cfg, domain_ids, len(p.train.domain_names))
        target_domains = p.target.domain_ids() if p.target is not None else None

        def make_context(step: int, window: int) -> DecisionContext:
            trainer = trainer_ref["trainer"]
            acc = trainer.accelerator
            live_model = acc.unwrap_model(trainer.model)
            refresher = None
            if any(r.live for r in routes.values()):
                refresher = Refresher(model=live_model, tokenizer=p.tokenizer, max_staleness=cfg.refresh.max_staleness,
                                      rank=acc.process_index, world_size=acc.num_processes,
                                      barrier=acc.wait_for_everyone, gather_params=_zero3_gather(trainer),
                                      run_id=scheduler.run_id, live_state=_live_state(trainer, live_model))
            source = StoreSignals(cfg, p, step, routes, refresher, cache=value_cache, rank=acc.process_index,
                                  world_size=acc.num_processes, barrier=acc.wait_for_everyone,
                                  live_lr=lambda: live_lr(trainer))
            source.prepare(strategy.needs())
            return DecisionContext(step=step, num_rows=n, domain_ids=domain_ids, domain_names=p.train.domain_names,
                                   rng=rng_for(args.seed, 99, window), signals=source,
                                   target_domain_ids=target_domains, log=source.log, init_proportions=init_p)

        scheduler = Scheduler(kind=kind, strategy=strategy, windows=windows, domain_ids=domain_ids,
                              domain_names=p.train.domain_names, seed=args.seed, make_context=make_context,
                              init_proportions=init_p, run_id=new_run_id())
        flex.scheduler = scheduler
        flex.mixer = strategy if kind == "mix" else None
        flex.weighter = strategy if kind == "weight" else None

    trainer = FlexfeedTrainer(model=model, args=args, train_dataset=RowsDataset(p.train),
                              data_collator=RowCollator(pad_id), processing_class=p.tokenizer, flex=flex,
                              callbacks=[FlexfeedCallback(flex, args.output_dir), *extra_callbacks])
    trainer_ref["trainer"] = trainer
    resume = cfg.training.get("resume_from_checkpoint")
    if resume is True or (isinstance(resume, str) and resume.lower() == "true"):
        resume = get_last_checkpoint(args.output_dir)
        if resume is None:
            raise FlexfeedError(f"resume_from_checkpoint is true but {args.output_dir} has no checkpoint",
                                "train first, or point it at a checkpoint directory")
    if resume and flex.scheduler is not None:
        state = load_state(resume)
        if state is None:
            raise FlexfeedError(f"checkpoint {resume} has no flexfeed strategy state",
                                "resume from a checkpoint written by flexfeed train")
        flex.scheduler.load_state_dict(state)
    result = trainer.train(resume_from_checkpoint=resume or None)
    summary = {"output_dir": str(out_dir), "train_type": kind, "component": cfg.flex.component,
               "steps": trainer.state.global_step, "train_loss": result.training_loss,
               "domains": p.train.domain_names, "global_batch": global_batch}
    if trainer.is_world_process_zero():
        _write_outputs(trainer, flex, p, cfg, out_dir, summary)
    if world > 1 and flex.scheduler is not None:
        # each rank's own account of its decisions: identical files prove the ranks agreed
        rank = trainer.accelerator.process_index
        (out_dir / f"flexfeed_rank{rank}.json").write_text(json.dumps(_rank_digest(flex), sort_keys=True))
    return summary


def _rank_digest(flex: FlexRun) -> dict:
    sched = flex.scheduler
    return {"plans": stable_hash({str(w): p.tolist() for w, p in sorted(sched.plans.items())}),
            "per_domain": [d["per_domain"] for d in sched.decisions],
            "proportions": [d.get("proportions") for d in sched.decisions],
            "weights": stable_hash([r["weights"] for r in flex.weight_log])}


def new_run_id() -> str:
    """A fresh id for this run's refreshed signals, the same on every rank (rank 0's, broadcast).

    Refreshed values depend on the run's trajectory, so they are keyed by the run; the id is random
    rather than derived from the output folder (no path in a key) and is saved in every checkpoint, so
    a resumed run continues with the signals it refreshed.
    """
    import uuid

    import torch.distributed as dist

    box = [uuid.uuid4().hex]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _live_state(trainer, model):
    """Named live training state for stages that read it (the optimizer's Adam moments)."""
    def get(key: str):
        if key == "adam_state":
            return live_adam_state(trainer, model)
        raise FlexfeedError(f"unknown live training state {key!r}", "a stage may read adam_state")
    return get


def _zero3_gather(trainer):
    ds = getattr(trainer, "is_deepspeed_enabled", False) and trainer.accelerator.state.deepspeed_plugin
    if not ds or trainer.accelerator.state.deepspeed_plugin.zero_stage != 3:
        return None
    import deepspeed

    model = trainer.model
    return lambda: _zero3_computing(deepspeed, model)


@contextlib.contextmanager
def _zero3_computing(deepspeed, engine):
    """Every ZeRO-3 parameter gathered while a refresh computes, handed back partitioned afterwards.

    A refresh's backward stops at the per-sample gradient leaves, so ZeRO-3's post-backward hooks never
    release the modules its forward marked active; they are released here, before re-partitioning.
    """
    params = list(engine.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        try:
            yield
        finally:
            for p in params:
                active = getattr(p, "ds_active_sub_modules", None)
                if active:
                    active.clear()
            offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
            if offload is not None:
                offload.get_param_coordinator().reset_step()


def evaluate_domains(model, tokenizer, data, batch_size: int = 16) -> dict[str, float]:
    """Mean per-sample loss of each domain of `data` with the model as it is."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was = model.training
    model.eval()
    cols = data.dataset
    vals = losses_of(model, cols["input_ids"], cols["labels"], batch_size, pad_id)[:, 0]
    if was:
        model.train()
    dom = data.domain_ids()
    return {name: float(vals[dom == k].mean()) for k, name in enumerate(data.domain_names) if (dom == k).any()}


def _write_outputs(trainer, flex: FlexRun, p: Prepared, cfg, out_dir: Path, summary: dict) -> None:
    trainer.save_model(str(out_dir))
    if flex.scheduler is not None:
        save_state(out_dir, flex.scheduler.state_dict())
        write_jsonl(out_dir / DECISIONS_FILE, flex.scheduler.decisions)
    if flex.weight_log:
        write_jsonl(out_dir / WEIGHTS_FILE, flex.weight_log)
    if flex.mix_log:
        write_jsonl(out_dir / MIX_FILE, flex.mix_log)
    if flex.mixer is not None and hasattr(flex.mixer, "final_weights"):
        weights = flex.mixer.final_weights(p.train.domain_names)
        flex.mixer.write_final_weights(out_dir / "domain_weights.json", p.train.domain_names)
        summary["final_weights"] = weights
    elif flex.mixer is not None:
        summary["final_weights"] = dict(zip(p.train.domain_names, map(float, flex.scheduler.last_proportions),
                                            strict=True))
    model = trainer.accelerator.unwrap_model(trainer.model)
    if cfg.data.val_dataset:
        from stages.data import load_data

        val = load_data(cfg.data, p.tokenizer, list(cfg.data.val_dataset))
        summary["eval_loss"] = evaluate_domains(model, p.tokenizer, val)
    elif p.target is not None:
        summary["eval_loss"] = evaluate_domains(model, p.tokenizer, p.target)
    summary["log_history"] = trainer.state.log_history
    (out_dir / RUN_FILE).write_text(json.dumps(summary, indent=1, default=str))
