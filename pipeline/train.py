"""`flexfeed train`: one plain function from a validated config to a trained run directory."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint

from stages.data import load_data, row_values
from stages.loss import losses_of
from stages.models import hub_access, load_model
from store.errors import FlexfeedError
from store.hashing import stable_hash

from .batch_hidden import batch_hidden_of
from .config import RunConfig, to_training_arguments
from .decision_context import DecisionContexts, new_run_id
from .evaluation import eval_callbacks, eval_dataset_for
from .loss_plot import plot_run_losses
from .mixer_eval import mixer_eval_domains
from .plan import Windows
from .prepared import Prepared, prepare, target_names
from .refresh import plan_routes
from .rows import RowCollator, RowsDataset
from .run_files import (
    DECISIONS_FILE,
    DOMAIN_WEIGHTS_FILE,
    MIX_FILE,
    RUN_FILE,
    WEIGHTS_FILE,
    rank_file,
    write_jsonl,
)
from .scheduler import PlanStage, Scheduler, configured_stages
from .state_io import load_state, save_state
from .strategies import SignalNeed
from .trainer import FlexfeedCallback, FlexfeedTrainer, FlexRun

log = logging.getLogger("flexfeed.train")


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


def initial_proportions(cfg: RunConfig, domain_ids: np.ndarray, k: int) -> np.ndarray:
    """The mixture warm-up windows draw from: given, by dataset size (stratified), or uniform."""
    init = cfg.flex.init_mixture_proportions
    if init:
        p = np.asarray(init, dtype=np.float64)
        if p.shape != (k,):
            raise FlexfeedError(f"init_mixture_proportions has {p.size} values for {k} datasets",
                                "give one proportion per dataset, in the order of `dataset`")
        return p
    rule = cfg.flex.mixture_sample_rule or "uniform"
    if rule == "stratified":
        return np.bincount(domain_ids, minlength=k).astype(np.float64)
    return np.full(k, 1.0 / k)


def end_process_group() -> None:
    """At the end of a training process: every rank waits for the others, then the process group is destroyed,
    so no rank exits while another still talks to it (a rank leaving gloo threads behind can abort at exit)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def training_arguments(cfg: RunConfig):
    """TrainingArguments of the run; under DeepSpeed without a GPU, a gloo process group set up first."""
    changes: dict = {"remove_unused_columns": False}  # row ids and domains ride along in each batch
    mixed = [k for k in ("bf16", "fp16") if cfg.training.get(k)]
    if mixed and not torch.cuda.is_available() and not cfg.training.get("use_cpu"):
        # transformers refuses bf16/fp16 without a GPU unless told to train on the CPU, where torch's
        # autocast runs them; a config written for a GPU (every DataFlex example) then runs here too
        log.warning("no GPU here: training on the CPU with %s autocast (use_cpu: true)", mixed[0])
        changes["use_cpu"] = True
    if cfg.training.get("deepspeed"):
        ensure_dist_env()
        if not torch.cuda.is_available():
            # Without a GPU, accelerate picks no backend for DeepSpeed and counts one process whatever
            # the launcher started: set the state up with gloo first and have Trainer use it.
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            try:
                PartialState(backend=cfg.training.get("ddp_backend") or "gloo")
            finally:
                del os.environ["ACCELERATE_USE_DEEPSPEED"]
            changes["accelerator_config"] = {"use_configured_state": True}
    return to_training_arguments(cfg, **changes)


def global_batch_of(args) -> int:
    """Samples per optimizer step over all ranks."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)


def step_budget(args, num_rows: int) -> int:
    """max_steps, or the steps of num_train_epochs passes over the rows."""
    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    return max(1, math.ceil(args.num_train_epochs * num_rows / global_batch_of(args)))


def build_stages(cfg: RunConfig, seed: int, num_rows: int, rows: np.ndarray | None = None) -> list[PlanStage]:
    """The data plan's stages, with what each reads from outside the store checked before training.

    `rows`: the training rows' positions in the loaded datasets when val_size held some out.
    """
    stages = configured_stages(cfg, seed)

    def values(name: str) -> np.ndarray:
        v = row_values(cfg.data, name)
        return v if rows is None else v[rows]

    for stage in stages:  # e.g. a reorder's score file or its rows' score field: length and values
        stage.strategy.check(num_rows, values)
    return stages


def plan_needs(stages: list[PlanStage]) -> list[SignalNeed]:
    """Every signal the plan's stages read, one need per (signal, split): read once per decision, shared."""
    merged: dict[tuple[str, str], SignalNeed] = {}
    for stage in stages:
        for need in stage.strategy.needs():
            key = (need.name, need.split)
            old = merged.get(key)
            if old is not None:
                need = SignalNeed(need.name, need.split, refresh=need.refresh or old.refresh,
                                  live=need.live or old.live, rows="all" if "all" in (need.rows, old.rows) else "probe")
            merged[key] = need
    return list(merged.values())


def build_flex_run(cfg: RunConfig, args, p: Prepared) -> tuple[FlexRun, DecisionContexts | None]:
    """The run's data plan (stages, windows) and the decision contexts it will call, before any training.

    Where each signal the stages read comes from (live or offline) is planned here, so every error the
    config implies is raised before the first step.
    """
    kind = cfg.flex.train_type
    stages = build_stages(cfg, args.seed, len(p.train), p.train_rows)
    if not stages:
        return FlexRun(kind), None
    component = ", ".join(f"{s.family}:{s.strategy.name}" for s in stages) if kind == "plan" else str(cfg.flex.component)
    hidden = batch_hidden_of(cfg, [s.strategy for s in stages])
    if p.mixer_eval is not None:  # before the scheduler: a mixer holds out no rows of a dataset measured apart
        for stage in stages:
            if stage.family == "mix":
                stage.strategy.eval_domains = mixer_eval_domains(p.train, p.mixer_eval)
    routes = plan_routes(cfg, plan_needs(stages), component)
    windows = Windows(global_batch=global_batch_of(args), max_steps=args.max_steps, warmup_step=cfg.flex.warmup_step,
                      update_step=cfg.flex.update_step, update_times=cfg.flex.update_times)
    domain_ids = p.train.domain_ids()
    init_p = initial_proportions(cfg, domain_ids, len(p.train.domain_names))
    contexts = DecisionContexts(cfg, p, routes, seed=args.seed, init_proportions=init_p)
    scheduler = Scheduler(kind=kind, stages=stages, windows=windows, domain_ids=domain_ids,
                          domain_names=p.train.domain_names, seed=args.seed, make_context=contexts,
                          init_proportions=init_p, run_id=new_run_id())
    return FlexRun(kind, scheduler=scheduler, hidden=hidden), contexts


def resume_point(cfg: RunConfig, args, flex: FlexRun) -> str | None:
    """The checkpoint to resume from (None: a fresh run); the strategy state it holds is loaded."""
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
    return resume or None


def train(cfg: RunConfig, *, extra_callbacks=(), prepared: Prepared | None = None) -> dict:
    """Run training as configured; returns a small summary (paths, steps, final loss)."""
    args = training_arguments(cfg)
    p = prepared or prepare(cfg, need_target=bool(target_names(cfg)), need_eval=True)
    args.max_steps = step_budget(args, len(p.train))
    if args.eval_strategy != "no" and p.eval is None:
        raise FlexfeedError("eval_strategy evaluates, but the prepared data has no evaluation set",
                            "prepare(cfg, need_eval=True)")
    flex, contexts = build_flex_run(cfg, args, p)
    callbacks = [FlexfeedCallback(flex, args.output_dir), *eval_callbacks(cfg, args, p.eval), *extra_callbacks]
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pad_id = p.tokenizer.pad_token_id if p.tokenizer.pad_token_id is not None else 0
    set_seed(args.seed)  # as LLaMA-Factory: new weights (LoRA, train_from_scratch) drawn from the run's seed
    trainer = FlexfeedTrainer(model=load_model(cfg.model, trainable=True), args=args,
                              train_dataset=RowsDataset(p.train), eval_dataset=eval_dataset_for(cfg, p.eval),
                              data_collator=RowCollator(pad_id), processing_class=p.tokenizer, flex=flex,
                              callbacks=callbacks)
    if contexts is not None:
        contexts.bind(trainer, flex.scheduler)
    result = trainer.train(resume_from_checkpoint=resume_point(cfg, args, flex))
    summary = {"output_dir": str(out_dir), "train_type": cfg.flex.train_type, "component": cfg.flex.component,
               "steps": trainer.state.global_step, "train_loss": result.training_loss,
               "domains": p.train.domain_names, "global_batch": global_batch_of(args)}
    if trainer.is_world_process_zero():
        _write_outputs(trainer, flex, p, cfg, out_dir, summary)
    if args.world_size > 1 and flex.scheduler is not None:
        # each rank's own account of its decisions: identical files prove the ranks agreed
        rank = trainer.accelerator.process_index
        (out_dir / rank_file(rank)).write_text(json.dumps(_rank_digest(flex), sort_keys=True))
    return summary


def _rank_digest(flex: FlexRun) -> dict:
    sched = flex.scheduler
    return {"plans": stable_hash({str(w): p.tolist() for w, p in sorted(sched.plans.items())}),
            "per_domain": [d["per_domain"] for d in sched.decisions],
            "proportions": [d.get("proportions") for d in sched.decisions],
            "weights": stable_hash([r["weights"] for r in flex.weight_log])}


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


def _write_outputs(trainer, flex: FlexRun, p: Prepared, cfg: RunConfig, out_dir: Path, summary: dict) -> None:
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
        flex.mixer.write_final_weights(out_dir / DOMAIN_WEIGHTS_FILE, p.train.domain_names)
        summary["final_weights"] = weights
    elif flex.mixer is not None:
        summary["final_weights"] = dict(zip(p.train.domain_names, map(float, flex.scheduler.last_proportions),
                                            strict=True))
    model = trainer.accelerator.unwrap_model(trainer.model)
    if cfg.data.val_dataset:
        val = load_data(cfg.data, p.tokenizer, list(cfg.data.val_dataset), hub=hub_access(cfg.model))
        summary["eval_loss"] = evaluate_domains(model, p.tokenizer, val)
    elif p.eval is not None or p.target is not None:
        summary["eval_loss"] = evaluate_domains(model, p.tokenizer, p.eval if p.eval is not None else p.target)
    summary["log_history"] = trainer.state.log_history
    if cfg.flex.plot_loss:
        summary["loss_plots"] = [f.name for f in plot_run_losses(trainer.state.log_history, out_dir)]
    (out_dir / RUN_FILE).write_text(json.dumps(summary, indent=1, default=str))
