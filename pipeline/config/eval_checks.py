"""What a config implies about evaluation, refused at load: evaluation needs an evaluation set, the best model
and early stopping need evaluation (with save and eval strategies transformers accepts), and the metric they
compare must be one flexfeed's evaluation logs.

Evaluation spans groups (the data group says what is evaluated, the training keys when, EvalArgs early
stopping), so RunConfig calls `check_evaluation` once its groups are built; transformers would refuse most of
these only when training starts, or at the first evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

from stages.values import did_you_mean
from store.errors import FlexfeedError

if TYPE_CHECKING:
    from stages.args import DataArgs


def eval_set_names(data: DataArgs) -> list[str]:
    """The names of the evaluation set's parts: the eval datasets, or (val_size) the training datasets."""
    if data.val_size:
        return list(data.dataset)
    return list(data.eval_dataset)


def eval_metric_names(data: DataArgs) -> list[str]:
    """The loss metrics an evaluation logs: `eval_loss` of the whole set, `eval_<name>_loss` of each part when
    there are several (or, under eval_on_each_dataset, each part alone and no `eval_loss`)."""
    names = eval_set_names(data)
    parts = [f"eval_{n}_loss" for n in names]
    if data.eval_on_each_dataset:
        return parts
    return ["eval_loss", *(parts if len(names) > 1 else [])]


def metric_key(metric: str) -> str:
    """transformers' spelling of a metric_for_best_model: `eval_` prefixed."""
    return metric if metric.startswith("eval_") else f"eval_{metric}"


@functools.cache
def _training_defaults() -> dict:
    from transformers import TrainingArguments  # deferred: transformers is heavy and a config may not train

    return {f.name: f.default for f in dataclasses.fields(TrainingArguments)}


def training_value(training: dict, key: str):
    """A training key's value as TrainingArguments will see it: the config's, else transformers' default."""
    value = training.get(key)
    return _training_defaults()[key] if value is None else value


def check_evaluation(cfg) -> None:  # a RunConfig (groups.py imports this module)
    """Refuse, in one line naming the key, an evaluation setting that transformers would refuse later."""
    training, data = cfg.training, cfg.data

    def get(key: str):
        return training_value(training, key)

    def fail(message: str, hint: str):
        raise FlexfeedError(f"{cfg.path}: {message}" if cfg.path else message, hint)

    strategy = str(get("eval_strategy"))
    has_set = bool(data.eval_dataset or data.val_size)
    if strategy != "no" and not has_set:
        fail(f"eval_strategy is {strategy} but there is no evaluation set",
             "set eval_dataset (datasets to evaluate) or val_size (training rows to hold out), or eval_strategy: no")
    if get("eval_on_start") and not has_set:
        fail("eval_on_start is set but there is no evaluation set",
             "set eval_dataset (datasets to evaluate) or val_size (training rows to hold out), or drop eval_on_start")
    patience = cfg.evaluation.early_stopping_steps
    if patience is not None and strategy == "no":
        fail("early_stopping_steps counts evaluations, but eval_strategy is no",
             "set eval_strategy: steps with eval_steps (and eval_dataset or val_size), or drop early_stopping_steps")
    best_at_end = bool(get("load_best_model_at_end"))
    if best_at_end:
        _check_best_model(strategy, get, fail)
    metric = training.get("metric_for_best_model")
    on_metric = str(get("lr_scheduler_type")) in ("reduce_lr_on_plateau", "greedy")  # they read it too
    if strategy == "no" or not (metric or best_at_end or on_metric or patience is not None):
        return
    choices = eval_metric_names(data)
    if metric is None and "eval_loss" not in choices:
        fail("eval_on_each_dataset logs no overall eval_loss for the best model, early stopping or the scheduler to "
             "compare",
             f"set metric_for_best_model to one of: {', '.join(choices)}")
    if metric is not None and metric_key(metric) not in choices:
        fail(f"metric_for_best_model {metric!r} is not logged by evaluation",
             did_you_mean(metric_key(metric), choices))


def _check_best_model(strategy: str, get, fail) -> None:
    """transformers' rule: save and eval strategies match (or save_strategy best), save_steps a multiple of
    eval_steps (eval_steps defaulting to logging_steps)."""
    if strategy == "no":
        fail("load_best_model_at_end needs evaluation, but eval_strategy is no",
             "set eval_strategy: steps with eval_steps (and eval_dataset or val_size)")
    save = str(get("save_strategy"))
    if save == "best":
        return
    if save != strategy:
        fail(f"load_best_model_at_end needs save_strategy to match eval_strategy ({strategy}), got {save}",
             f"set save_strategy: {strategy} (or save_strategy: best)")
    if strategy != "steps":
        return
    eval_steps = get("eval_steps") or get("logging_steps")
    save_steps = get("save_steps")
    if (eval_steps < 1) != (save_steps < 1):
        ok = False  # a ratio and a step count: no multiple can be guaranteed
    elif eval_steps >= 1:
        ok = save_steps % eval_steps == 0
    else:
        ok = round(save_steps * 10**6) % round(eval_steps * 10**6) == 0
    if not ok:
        fail(f"load_best_model_at_end needs save_steps ({save_steps:g}) to be a multiple of eval_steps "
             f"({eval_steps:g})", f"set save_steps: {eval_steps:g} (or a multiple of it)")
