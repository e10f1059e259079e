"""FlexfeedTrainer: Hugging Face Trainer with a plan sampler, per-sample weights and saved strategy state.

Nothing of Trainer's loop is copied: the samplers (`_get_train_sampler`, `_get_eval_sampler`), `compute_loss`,
`evaluation_loop` (to add per-domain losses) and a callback are the only hooks used, so DeepSpeed, gradient
accumulation, evaluation, logging and checkpointing stay Trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback

from stages.loss import per_sample_loss
from store.errors import FlexfeedError

from .batch_hidden import BatchHidden
from .evaluation import present_domains
from .sampler import PlanSampler
from .scheduler import Scheduler
from .state_io import save_state
from .strategies.simplex import effective_sample_size

#: Rows per forward of an evaluation whose per_device_eval_batch_size is 1 (see _batched_per_sample_eval).
PER_SAMPLE_EVAL_BATCH = 32


@dataclass
class FlexRun:
    """What the trainer needs to know of the run's data plan."""

    kind: str
    scheduler: Scheduler | None = None
    hidden: BatchHidden | None = None
    """How weighters that read the training forward's hidden states (`reads_batch_hidden`) get them pooled."""
    weight_log: list = field(default_factory=list)
    mix_log: list = field(default_factory=list)

    @property
    def mixer(self):
        """The plan's mixer (it observes every batch's per-sample losses), or None."""
        stages = self.scheduler.stages_of("mix") if self.scheduler is not None else []
        return stages[0].strategy if stages else None

    def weight_stages(self) -> list:
        """The plan's loss-space stages (weighters, loss-space mixers) and a drawing mixer that importance-weights
        the samples it drew (DoReMi: alpha over the draw probability); their weights multiply."""
        if self.scheduler is None:
            return []
        stages = self.scheduler.loss_stages()
        budget = self.scheduler.budget
        if budget is not None and budget.family == "mix" and budget.strategy.importance_weighted:
            stages = [*stages, budget]
        return stages


class FlexfeedTrainer(Trainer):
    """Trainer whose data order comes from a data plan and whose loss can be weighted per sample."""

    def __init__(self, *args, flex: FlexRun | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.flex = flex or FlexRun("static")
        self._logged_decisions = 0
        self._eval_losses: list | None = None  # (per-sample losses, domains) of each evaluation batch, when kept
        self._step_batches: list = []  # (losses, rows, domains) of the optimizer step's micro-batches so far
        if self.flex.weight_stages():
            # our weighted loss is a per-batch mean: let Trainer divide it by the accumulation steps
            self.loss_is_scaled_for_ga = False

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Add the decisions made since the last log (counts, proportions, scores, refresh) to it."""
        if self.flex.scheduler is not None and "loss" in logs:
            logs.update(decision_logs(self.flex.scheduler.decisions[self._logged_decisions :]))
            self._logged_decisions = len(self.flex.scheduler.decisions)
        super().log(logs, *args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        if self.flex.scheduler is None:
            return super()._get_train_sampler(train_dataset)
        return PlanSampler(self.flex.scheduler)

    def _get_eval_sampler(self, eval_dataset):
        """Evaluation reads its rows in order, never through the plan (accelerate splits them across ranks)."""
        if eval_dataset is None or self.args.world_size > 1:
            return None  # as Trainer: the DataLoader's own sequential order, sharded by accelerate
        return SequentialSampler(eval_dataset)

    def _batched_per_sample_eval(self) -> bool:
        """With one row per evaluation batch the evaluation loss is the mean of per-sample token-mean losses;
        flexfeed computes that same mean over batches of PER_SAMPLE_EVAL_BATCH rows (one process, loss only)."""
        args = self.args
        return args.per_device_eval_batch_size == 1 and args.world_size == 1 and self.compute_metrics is None

    def get_eval_dataloader(self, eval_dataset=None):
        """Trainer's loader; batches of PER_SAMPLE_EVAL_BATCH rows where the loss is a per-sample mean anyway."""
        if not self._batched_per_sample_eval():
            return super().get_eval_dataloader(eval_dataset)
        saved = self.args.per_device_eval_batch_size
        self.args.per_device_eval_batch_size = PER_SAMPLE_EVAL_BATCH
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.args.per_device_eval_batch_size = saved

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Trainer's evaluation, plus `<prefix>_<domain>_loss` (mean per-sample loss) when the set spans domains."""
        data = getattr(dataloader.dataset, "data", None)
        names = present_domains(data) if data is not None else []
        self._eval_losses = [] if len(names) > 1 else None
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
        finally:
            kept, self._eval_losses = self._eval_losses, None
        if kept:
            losses = np.concatenate([k[0] for k in kept])
            domains = np.concatenate([k[1] for k in kept])
            for k, name in enumerate(data.domain_names):
                if (domains == k).any():
                    output.metrics[f"{metric_key_prefix}_{name}_loss"] = float(losses[domains == k].mean())
        return output

    def _gather(self, per_sample: torch.Tensor, rows: torch.Tensor, domains: torch.Tensor):
        """Global batch (all ranks, rank order): identical numpy arrays on every rank."""
        stacked = torch.stack([per_sample.detach().float(), rows.to(per_sample.device).float(),
                               domains.to(per_sample.device).float()], dim=1)
        g = self.accelerator.gather(stacked).cpu().numpy()
        return g[:, 0].astype(np.float64), g[:, 1].astype(np.int64), g[:, 2].astype(np.int64)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs.pop("row_id", None)
        domains = inputs.pop("domain", None)
        if not model.training:
            return self._eval_loss(model, inputs, domains, return_outputs, num_items_in_batch)
        step = self.state.global_step
        mixer = self.flex.mixer
        weighters = [s for s in self.flex.weight_stages() if step >= s.warmup_step]
        if rows is None or (mixer is None and not weighters):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not weighters:  # a mixer observes the batch; the loss stays Trainer's own
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            per, _ = per_sample_loss(outputs.logits.detach(), inputs["labels"])
            self._observe(mixer, *self._gather(per, rows, domains))
            return (loss, outputs) if return_outputs else loss
        labels = inputs["labels"]
        readers = [s.strategy for s in weighters if getattr(s.strategy, "reads_batch_hidden", False)]
        hidden = self.flex.hidden if readers else None
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"},
                        **({"output_hidden_states": True} if hidden is not None else {}))
        per, _ = per_sample_loss(outputs.logits, labels)
        g_loss, g_rows, g_dom = self._gather(per, rows, domains)
        if mixer is not None:
            self._observe(mixer, g_loss, g_rows, g_dom)
        if hidden is not None:  # the global batch's pooled hidden states, in the order of g_loss on every rank
            g_hidden = self.accelerator.gather(hidden.pool(outputs.hidden_states, inputs["attention_mask"]))
            for strategy in readers:
                strategy.batch_hidden = g_hidden.cpu().numpy().astype(np.float64)
        w = np.ones_like(g_loss)
        record = {"step": step}
        for stage in weighters:  # loss-space stages multiply: L = mean_i(prod_k w_i^(k) * l_i)
            wk = np.asarray(stage.strategy.weights(g_loss, g_rows, g_dom, step), dtype=np.float64)
            if wk.shape != g_loss.shape or not np.isfinite(wk).all():
                raise FlexfeedError(f"weighter {stage.strategy.name!r} returned weights of shape {wk.shape}"
                                    f" for a batch of {g_loss.shape[0]}", "return one finite weight per sample")
            w = w * wk
            if stage.family == "weight":
                record.update({f"{stage.strategy.name}/{k}": v for k, v in stage.strategy.batch_log().items()})
        b = per.shape[0]
        rank = self.accelerator.process_index
        local = torch.as_tensor(w[rank * b : (rank + 1) * b], dtype=per.dtype, device=per.device)
        loss = (local * per).mean()
        ess = effective_sample_size(w)
        self.flex.weight_log.append({**record, "weights": w.round(5).tolist(), "losses": g_loss.round(5).tolist(),
                                     "ess": round(ess, 5)})
        return (loss, outputs) if return_outputs else loss

    def _eval_loss(self, model, inputs, domains, return_outputs, num_items_in_batch):
        """Evaluation: Trainer's own, unweighted loss, seen by no strategy; per-sample losses kept by domain
        when evaluation_loop asks (gathered over ranks without the padding rows of the last batch)."""
        batched = self._batched_per_sample_eval()
        if not batched and (self._eval_losses is None or domains is None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        per, _ = per_sample_loss(outputs.logits.detach(), inputs["labels"])
        if batched:  # Trainer weights each batch's loss by its rows: the mean over rows, as one row a batch
            loss = per.mean().to(loss.dtype)
        if self._eval_losses is None or domains is None:
            return (loss, outputs) if return_outputs else loss
        per, dom = self.accelerator.gather_for_metrics((per.float(), domains.to(per.device)))
        self._eval_losses.append((per.cpu().numpy().astype(np.float64), dom.cpu().numpy()))
        return (loss, outputs) if return_outputs else loss

    def _observe(self, mixer, g_loss: np.ndarray, g_rows: np.ndarray, g_dom: np.ndarray) -> None:
        """Hand a mixer the global batch of one optimizer step, with the proportions it was drawn with.

        Under gradient accumulation the step's micro-batches are gathered and observed together at its last
        one, so a mixer's time is optimizer steps (ODM's exploration rate, one bandit round per step) and
        gradient_accumulation_steps x batch size makes the same decisions whatever the split.
        """
        self._step_batches.append((g_loss, g_rows, g_dom))
        if not self.accelerator.sync_gradients:
            return  # more micro-batches of this optimizer step are to come
        g_loss, g_rows, g_dom = (np.concatenate(parts) for parts in zip(*self._step_batches, strict=True))
        self._step_batches = []
        sched = self.flex.scheduler
        mixer.drawn_with = sched.proportions_of_window(sched.windows.window_of(self.state.global_step))
        mixer.observe(g_dom, g_loss, g_rows, self.state.global_step)
        self.flex.mix_log.append({"step": self.state.global_step, "domain_loss": _domain_means(g_loss, g_dom)})


def _domain_means(losses: np.ndarray, domains: np.ndarray) -> dict:
    return {int(d): float(losses[domains == d].mean()) for d in np.unique(domains)}


class FlexfeedCallback(TrainerCallback):
    """Saves the scheduler/strategy state into every checkpoint (decisions are logged by FlexfeedTrainer.log)."""

    def __init__(self, flex: FlexRun, output_dir: str):
        self.flex = flex
        self.output_dir = Path(output_dir)

    def on_save(self, args, state, control, **kwargs):
        if self.flex.scheduler is not None and state.is_world_process_zero:
            ckpt = self.output_dir / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                save_state(ckpt, self.flex.scheduler.state_dict())
        return control


def decision_logs(records: list[dict]) -> dict:
    """Flat `flexfeed/...` numbers of decision records, for the Trainer's log and its reporters."""
    logs: dict = {}
    for record in records:
        if not record.get("decision"):
            continue
        for name, count in record.get("per_domain", {}).items():
            logs[f"flexfeed/{name}_count"] = count
        for name, p in record.get("proportions", {}).items():
            logs[f"flexfeed/{name}_proportion"] = p
        info = record.get("info", {})
        for key in ("score_mean", "score_std", "score_min", "score_max"):
            if isinstance(info.get(key), (int, float)):
                logs[f"flexfeed/{key}"] = info[key]
        for signal, r in record.get("refresh", {}).items():
            logs[f"flexfeed/refresh_{signal.replace('/', '_')}_shards"] = r.get("stale", 0)
            logs[f"flexfeed/refresh_{signal.replace('/', '_')}_seconds"] = r.get("seconds", 0.0)
        logs["flexfeed/decision_seconds"] = record.get("seconds", 0.0)
    return logs
