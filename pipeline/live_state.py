"""The live training state a refresh reads: the optimizer's Adam moments and the current learning rate.

LESS defines a row's gradient feature at a training state as the Adam update that state's optimizer
would take for that row alone (stages/grads/precondition.py). A refresh computes it at the live state,
so the moments come from the Trainer's own optimizer, not from a checkpoint on disk: a torch AdamW
(its ``state`` keyed by parameter), or DeepSpeed's partitioned ZeRO optimizer, whose fp32 moments are
gathered per parameter (a collective: every rank calls this, for the same parameters, in order).
"""

from __future__ import annotations

import torch

from stages.grads.adam_state import AdamState
from store.errors import FlexfeedError


def _inner(optimizer):
    """The optimizer under accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _is_deepspeed(trainer) -> bool:
    return bool(getattr(trainer, "is_deepspeed_enabled", False))


def _hyper(group: dict) -> tuple[tuple[float, float], float]:
    if "betas" not in group:
        raise FlexfeedError(f"the training optimizer has no Adam betas (group keys: {sorted(group)})",
                            "grads.grad_type adam refreshes from an Adam/AdamW optimizer; use grad_type: sgd otherwise")
    return tuple(float(b) for b in group["betas"]), float(group.get("eps", 1e-8))


def live_adam_state(trainer, model) -> AdamState:
    """Adam moments of every trainable parameter of ``model`` (by name) from the Trainer's optimizer.

    A parameter the optimizer has not stepped yet has zero moments, as Adam starts them.
    """
    optimizer = trainer.optimizer
    if optimizer is None:
        raise FlexfeedError("the Trainer has no optimizer yet", "refresh Adam gradients only during training")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    m: dict[str, torch.Tensor] = {}
    v: dict[str, torch.Tensor] = {}
    if _is_deepspeed(trainer):
        from deepspeed.utils import (
            safe_get_full_optimizer_state,  # deepspeed: only runs that use it import it
        )

        for name, p in named:  # same order on every rank: each call gathers across ranks
            exp_avg = safe_get_full_optimizer_state(p, "exp_avg")
            exp_avg_sq = safe_get_full_optimizer_state(p, "exp_avg_sq")
            shape = tuple(getattr(p, "ds_shape", p.shape))
            m[name] = torch.zeros(shape) if exp_avg is None else exp_avg.detach().float().cpu().reshape(shape)
            v[name] = torch.zeros(shape) if exp_avg_sq is None else exp_avg_sq.detach().float().cpu().reshape(shape)
        betas, eps = _hyper(optimizer.param_groups[0])
        return AdamState(m, v, betas=betas, eps=eps, lr=live_lr(trainer), layout="deepspeed-live")
    inner = _inner(optimizer)
    group_of = {id(p): g for g in inner.param_groups for p in g["params"]}
    hyper = None
    for name, p in named:
        if id(p) not in group_of:
            raise FlexfeedError(f"trainable parameter {name} is not in the training optimizer",
                                "the optimizer must train every trainable parameter the gradient stage reads")
        hyper = hyper or _hyper(group_of[id(p)])
        entry = inner.state.get(p, {})
        if "exp_avg" in entry and "exp_avg_sq" in entry:
            m[name] = entry["exp_avg"].detach().float().cpu().clone()
            v[name] = entry["exp_avg_sq"].detach().float().cpu().clone()
        elif entry:
            raise FlexfeedError(f"the training optimizer keeps no exp_avg/exp_avg_sq (keys: {sorted(entry)})",
                                "grads.grad_type adam refreshes from an Adam/AdamW optimizer; use grad_type: sgd")
        else:
            m[name] = torch.zeros(p.shape)
            v[name] = torch.zeros(p.shape)
    betas, eps = hyper or ((0.9, 0.999), 1e-8)
    return AdamState(m, v, betas=betas, eps=eps, lr=live_lr(trainer), layout="trainer-live")


def live_lr(trainer) -> float:
    """The learning rate of the next optimizer step (what LESS weights a checkpoint's scores by)."""
    scheduler = getattr(trainer, "lr_scheduler", None)
    if scheduler is not None:
        try:
            return float(scheduler.get_last_lr()[0])
        except (AttributeError, IndexError, TypeError):
            pass
    optimizer = trainer.optimizer
    if optimizer is None:
        return float(trainer.args.learning_rate)
    return float(optimizer.param_groups[0]["lr"])
