"""LLaMA-Factory keys that are neither flexfeed fields nor TrainingArguments fields, each with a fate.

A key listed here is translated to a flexfeed/transformers key or accepted and ignored with a one-line
warning that says why. Any other unknown key is an error. A key only reaches this table when no
argument group has a field of that name, so adding a field to a group takes precedence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from store.errors import FlexfeedError

from .config_values import check_range, coerce


@dataclass(frozen=True, kw_only=True)
class CompatKey:
    """What to do with one foreign key."""

    target: str | None = None
    """`group.field` to write the (converted) value to; None means accept and ignore."""
    reason: str
    """Why the key is translated or ignored (shown in the warning and in docs/config.md)."""
    convert: Callable | None = None
    """Turns the user's value into the target's value (raises FlexfeedError on a bad one)."""


def _warmup_ratio(value, where: str):
    value = coerce(value, float, where)
    check_range(value, where, low=0.0, high=0.999999)
    return value


_FLASH_ATTN = {"auto": None, "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2",
               "fa3": "flash_attention_3"}


def _flash_attn(value, where: str):
    if value not in _FLASH_ATTN:
        raise FlexfeedError(f"{where}: unknown value {value!r}", f"choose one of: {', '.join(_FLASH_ATTN)}")
    return _FLASH_ATTN[value]


_SWANLAB = "SwanLab is not integrated; use report_to (tensorboard, wandb, ...)"

LLAMAFACTORY_KEYS: dict[str, CompatKey] = {
    "warmup_ratio": CompatKey(target="training.warmup_steps", convert=_warmup_ratio,
                              reason="transformers 5 reads a warmup_steps value below 1 as a ratio"),
    "flash_attn": CompatKey(target="model.attn_implementation", convert=_flash_attn,
                            reason="auto/disabled/sdpa/fa2/fa3 become attn_implementation None/eager/sdpa/"
                                   "flash_attention_2/flash_attention_3"),
    "overwrite_output_dir": CompatKey(reason="transformers 5 removed it; flexfeed writes into output_dir and "
                                             "resumes only with resume_from_checkpoint"),
    "overwrite_cache": CompatKey(reason="flexfeed keeps no tokenized cache; the signal store is keyed by content"),
    "preprocessing_num_workers": CompatKey(reason="tokenizing runs in the stage runner's workers (runner.n_workers)"),
    "plot_loss": CompatKey(reason="`flexfeed report` plots the loss curves from the trainer log"),
    "tokenized_path": CompatKey(reason="flexfeed keeps no tokenized dataset on disk"),
    "disable_shuffling": CompatKey(reason="the training order comes from the sampler's seed and the component"),
    "val_size": CompatKey(reason="flexfeed does not split the training data; name the data in eval_dataset"),
    "train_from_scratch": CompatKey(reason="not supported: the pretrained weights of model_name_or_path are "
                                           "loaded; point model_name_or_path at a freshly initialised model"),
    "pure_bf16": CompatKey(reason="pure-bf16 training is not supported; bf16 gives mixed precision"),
    "print_param_status": CompatKey(reason="peft prints the trainable parameter count"),
    "include_effective_tokens_per_second": CompatKey(reason="the run report has tokens per second"),
    "early_stopping_steps": CompatKey(reason="early stopping is not supported"),
    **{key: CompatKey(reason=_SWANLAB) for key in (
        "use_swanlab", "swanlab_project", "swanlab_workspace", "swanlab_run_name", "swanlab_mode",
        "swanlab_api_key", "swanlab_logdir", "swanlab_lark_webhook_url", "swanlab_lark_secret")},
}
