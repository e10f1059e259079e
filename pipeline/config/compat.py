"""Foreign keys, one translation table per level: LLaMA-Factory's and DataFlex's run keys, DataFlex's components file.

A run-config key that no argument group has is looked up in LLAMAFACTORY_KEYS: translated to a flexfeed
or transformers key, or accepted and ignored with a one-line warning that says why; any other unknown key
is an error. Adding a field to a group takes precedence over this table.

A DataFlex run config names a component (`component_name`) whose parameters live in a separate
components file (`components_cfg_file`, sections `selectors`/`mixers`/`weighters`/`reorders`/`pipelines`).
flexfeed reads that entry and translates each parameter with DATAFLEX_PARAMS, with the same CompatKey
rules: to a flexfeed component parameter, to another config key (LESS's projection settings belong to
the offline `grads:` stage here), or accepted and ignored with a warning saying why. A parameter the
table does not list passes through under the same name only if the flexfeed component has that
parameter; anything else is an error. Reorder presets and pipelines have tables of their own
(pipeline.config.dataflex_plans).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

from stages.values import check_range, coerce, did_you_mean
from store.errors import FlexfeedError

from .read import find_file, parse_yaml_text

log = logging.getLogger("flexfeed.config")


@dataclass(frozen=True, kw_only=True)
class CompatKey:
    """What to do with one foreign key."""

    target: str | None = None
    """`group.field` to write the (converted) value to; None means accept and ignore."""
    reason: str
    """Why the key is translated or ignored (shown in the warning and in docs/config.md)."""
    convert: Callable | None = None
    """Turns the user's value into the target's value (raises FlexfeedError on a bad one); with no
    target, only checks it."""
    refuse: bool = False
    """With no target: a value that turns the feature on (anything but null, false, 0 or an empty string)
    is an error giving `reason`; off, the key is accepted silently. For features flexfeed does not have
    and would change what is trained (an optimizer, a quantized base, a loss), where ignoring them would
    train something else than the user asked for."""
    sets: dict = field(default_factory=dict)
    """Other `group.field` targets this key fixes when present (e.g. a score file implies `score: file`)."""
    file: bool = False
    """The value is a path: looked up relative to the file it is written in first, then the working directory."""

    def translate(self, value, where: str):
        """The value to write to `target`: the user's, through `convert` when the rule has one."""
        return self.convert(value, where) if self.convert else value


@dataclass(frozen=True)
class Spread:
    """What a `convert` returns to write one foreign key to several targets (a nested DataFlex mapping
    flattened): `group.field` -> value, and warnings about the parts that have no meaning here. The rule's
    own `target` is then only what the docs show."""

    targets: dict
    warnings: tuple[str, ...] = ()


@dataclass
class Translation:
    """A components-file entry in flexfeed's terms: the component, its parameters, other keys, warnings."""

    component: str
    args: dict = field(default_factory=dict)
    """The component's parameters (`component_args`)."""
    elsewhere: dict = field(default_factory=dict)
    """`group.key` -> value for keys of the run (`grads.proj_dim`, `loss.batch_size`, ...)."""
    stage: dict = field(default_factory=dict)
    """Keys of the data-plan stage running the component (`stage.every`: a factor on the stage's `every`)."""
    warnings: list[str] = field(default_factory=list)

    def apply(self, rule: CompatKey, key: str, value, where: str, source: Path | None = None) -> None:
        """Write one DataFlex key by its rule (ignored ones, unless null, become a warning saying why)."""
        here = f"{where}, {key!r}"
        if rule.file and isinstance(value, str) and source is not None:
            value = str(find_file(value, source, here))
        value = rule.translate(value, here)
        if isinstance(value, Spread):
            self.warnings += [f"{where}: DataFlex parameter {key!r}: {text}" for text in value.warnings]
            for target, item in value.targets.items():
                self.write(target, item)
            return
        if rule.target is None:
            if value is not None:
                self.warnings.append(f"{where}: DataFlex parameter {key!r} ignored: {rule.reason}")
            return
        for target, item in {rule.target: value, **rule.sets}.items():
            self.write(target, item)

    def write(self, target: str, item) -> None:
        """Put one value where `target` (`component`, `component_args.x`, `stage.x` or `group.x`) says."""
        group, _, name = target.partition(".")
        if target == "component":
            self.component = item
        elif group == "component_args":
            self.args[name] = item
        elif group == "stage":
            self.stage[name] = item
        else:
            self.elsewhere[target] = item


def _warmup_ratio(value, where: str):
    value = coerce(value, float, where)
    check_range(value, where, low=0.0, high=0.999999)
    return value


_FLASH_ATTN = {"auto": None, "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2",
               "fa3": "flash_attention_3"}


def _flash_attn(value, where: str):
    if not isinstance(value, str) or value not in _FLASH_ATTN:
        raise FlexfeedError(f"{where}: unknown value {value!r}", f"choose one of: {', '.join(_FLASH_ATTN)}")
    available = {"fa2": ("2", is_flash_attn_2_available), "fa3": ("3", is_flash_attn_3_available)}.get(value)
    if available is not None and not available[1]():
        # as LLaMA-Factory: a config written for a GPU with flash-attn installed still runs elsewhere
        log.warning("%s: FlashAttention-%s is not installed here (or there is no GPU): using the model's "
                    "default attention", where, available[0])
        return None
    return _FLASH_ATTN[value]


def _use_reentrant(value, where: str):
    return {"use_reentrant": coerce(value, bool, where)}


def _layers_to_wrap(value, where: str):
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise FlexfeedError(f"{where}: expected layer class names, got {value!r}",
                            "write e.g. LlamaDecoderLayer (comma-separated for several)")
    return {"transformer_layer_cls_to_wrap": names}


_SWANLAB = "SwanLab is not integrated; use report_to (tensorboard, wandb, ...)"
_OPTIMIZER = ("flexfeed trains with transformers' optimizers (`optim`); {} is not integrated, and the refreshed "
              "gradient signals read the live AdamW moments")
_TEXT_ONLY = "flexfeed trains text-only models: there are no images, videos or vision tower here"
_LOSS = ("flexfeed's weighters own each sample's loss; {} would change what the loss and gradient signals "
         "mean, so it is not offered")
_ONLY_WITH = "it applies only with {}, which flexfeed does not support"

LLAMAFACTORY_KEYS: dict[str, CompatKey] = {
    "warmup_ratio": CompatKey(target="training.warmup_steps", convert=_warmup_ratio,
                              reason="transformers 5 reads a warmup_steps value below 1 as a ratio"),
    "flash_attn": CompatKey(target="model.attn_implementation", convert=_flash_attn,
                            reason="auto/disabled/sdpa/fa2/fa3 become attn_implementation None/eager/sdpa/"
                                   "flash_attention_2/flash_attention_3"),
    "overwrite_output_dir": CompatKey(reason="transformers 5 removed it; flexfeed writes into output_dir and "
                                             "resumes only with resume_from_checkpoint"),
    "overwrite_cache": CompatKey(reason="flexfeed keeps no tokenized cache; the signal store is keyed by content"),
    "tokenized_path": CompatKey(reason="flexfeed keeps no tokenized dataset on disk"),
    "disable_shuffling": CompatKey(reason="the training order comes from the sampler's seed and the component"),
    "pure_bf16": CompatKey(reason="pure-bf16 training is not supported; bf16 gives mixed precision"),
    "print_param_status": CompatKey(reason="peft prints the trainable parameter count"),
    "include_effective_tokens_per_second": CompatKey(reason="the run report has tokens per second"),
    "freeze_gate": CompatKey(target="model.freeze_gate",
                             reason="MoE routers keep their weights (DataFlex's flag; same meaning)"),
    "use_reentrant_gc": CompatKey(target="training.gradient_checkpointing_kwargs", convert=_use_reentrant,
                                  reason="becomes gradient_checkpointing_kwargs {use_reentrant: value}"),
    "fsdp_transformer_layer_cls_to_wrap": CompatKey(
        target="training.fsdp_config", convert=_layers_to_wrap,
        reason="transformers 5 reads it from fsdp_config.transformer_layer_cls_to_wrap"),
    "packing": CompatKey(refuse=True, reason="flexfeed decides per row: packing rows into one sequence would mix "
                                             "rows in one loss and one gradient; leave packing off"),
    "neat_packing": CompatKey(refuse=True, reason="flexfeed decides per row; leave packing off"),
    "quantization_bit": CompatKey(refuse=True, reason="quantized (QLoRA) bases are not supported: per-sample "
                                                      "gradient features need the full-precision base"),
    "quantization_method": CompatKey(reason=_ONLY_WITH.format("quantization_bit")),
    "double_quantization": CompatKey(reason=_ONLY_WITH.format("quantization_bit")),
    "fp8": CompatKey(refuse=True, reason="FP8 training is not supported; use bf16"),
    "fp8_backend": CompatKey(reason=_ONLY_WITH.format("fp8")),
    "fp8_enable_fsdp_float8_all_gather": CompatKey(reason=_ONLY_WITH.format("fp8")),
    "use_galore": CompatKey(refuse=True, reason=_OPTIMIZER.format("GaLore")),
    "use_apollo": CompatKey(refuse=True, reason=_OPTIMIZER.format("APOLLO")),
    "use_badam": CompatKey(refuse=True, reason=_OPTIMIZER.format("BAdam")),
    "use_adam_mini": CompatKey(refuse=True, reason=_OPTIMIZER.format("Adam-mini")),
    "use_muon": CompatKey(refuse=True, reason=_OPTIMIZER.format("Muon")),
    **{f"galore_{k}": CompatKey(reason=_ONLY_WITH.format("use_galore"))
       for k in ("rank", "target", "scale", "layerwise", "update_interval", "proj_type")},
    **{f"apollo_{k}": CompatKey(reason=_ONLY_WITH.format("use_apollo"))
       for k in ("rank", "target", "scale", "scale_type", "layerwise", "update_interval", "proj", "proj_type",
                 "scale_front")},
    **{f"badam_{k}": CompatKey(reason=_ONLY_WITH.format("use_badam"))
       for k in ("mode", "switch_interval", "switch_mode", "verbose", "start_block", "update_ratio", "mask_mode")},
    "loraplus_lr_ratio": CompatKey(refuse=True, reason="LoRA+ optimizer groups are not integrated"),
    "loraplus_lr_embedding": CompatKey(reason=_ONLY_WITH.format("loraplus_lr_ratio")),
    "use_dft_loss": CompatKey(refuse=True, reason=_LOSS.format("DFT's loss")),
    "use_eaft_loss": CompatKey(refuse=True, reason=_LOSS.format("EAFT's loss")),
    "use_asft_loss": CompatKey(refuse=True, reason=_LOSS.format("ASFT's loss")),
    "asft_alpha": CompatKey(reason=_ONLY_WITH.format("use_asft_loss")),
    "use_llama_pro": CompatKey(refuse=True, reason="LLaMA Pro block expansion is not supported"),
    "mixture_of_depths": CompatKey(refuse=True, reason="mixture-of-depths conversion is not supported"),
    "pissa_init": CompatKey(refuse=True, reason="PiSSA initialisation is not integrated; LoRA starts as peft's "
                                                "default"),
    "pissa_iter": CompatKey(reason=_ONLY_WITH.format("pissa_init")),
    "pissa_convert": CompatKey(reason=_ONLY_WITH.format("pissa_init")),
    "oft_block_size": CompatKey(reason=_ONLY_WITH.format("finetuning_type: oft")),
    "oft_target": CompatKey(reason=_ONLY_WITH.format("finetuning_type: oft")),
    "freeze_trainable_layers": CompatKey(reason=_ONLY_WITH.format("finetuning_type: freeze")),
    "freeze_trainable_modules": CompatKey(reason=_ONLY_WITH.format("finetuning_type: freeze")),
    "pref_beta": CompatKey(reason=_ONLY_WITH.format("preference stages (dpo, kto)")),
    "pref_loss": CompatKey(reason=_ONLY_WITH.format("preference stages (dpo, kto)")),
    "predict_with_generate": CompatKey(reason="flexfeed runs no prediction pass; evaluation reports the loss"),
    "ray_num_workers": CompatKey(reason="Ray is not integrated: offline stages fan out on Dask (runner.scheduler), "
                                        "training on torchrun or DeepSpeed"),
    **{key: CompatKey(reason=_TEXT_ONLY) for key in (
        "image_max_pixels", "image_min_pixels", "image_do_pan_and_scan", "video_fps", "video_max_pixels",
        "video_min_pixels", "video_maxlen", "freeze_vision_tower", "freeze_multi_modal_projector",
        "freeze_language_model", "media_dir")},
    **{key: CompatKey(reason=_SWANLAB) for key in (
        "use_swanlab", "swanlab_project", "swanlab_workspace", "swanlab_run_name", "swanlab_mode",
        "swanlab_api_key", "swanlab_logdir", "swanlab_lark_webhook_url", "swanlab_lark_secret")},
}

TRAIN_TYPE_ALIASES = {
    "dynamic_select": "select",
    "dynamic_mix": "mix",
    "dynamic_weight": "weight",
    "dynamic_weighting": "weight",
    "dynamic_reorder": "reorder",
    "dynamic_lego": "plan",
    "static_full": "static",
}
"""DataFlex's train_type spellings -> flexfeed's."""

SECTIONS = {"select": "selectors", "mix": "mixers", "reorder": "reorders", "weight": "weighters"}
"""Components-file section of each train_type."""

FAMILY_ALIASES = {"selector": "select", "mixer": "mix", "reorderer": "reorder", "weighter": "weight"}
"""DataFlex's stage family names -> flexfeed's (in a data plan)."""

KEY_RENAMES = {"component_name": "component", "component_overrides": "component_args"}
"""DataFlex run keys spelled differently in flexfeed (same meaning)."""
SPECIAL_KEYS = ("components_cfg_file", "train_step")
"""DataFlex run keys handled by the loader itself rather than stored in a group."""

_STORE = "the signal store keeps these results, keyed by content, so there is no cache folder"
_SCORE_BATCH = "rows per forward pass of the loss stage (offline and live refreshes)"
_GRADS = {
    "gradient_type": CompatKey(target="grads.grad_type", reason="gradient features are an offline stage"),
    "proj_dim": CompatKey(target="grads.proj_dim", reason="gradient features are an offline stage"),
    "seed": CompatKey(target="grads.seed", reason="the projection seed belongs to the gradient stage"),
}

_CLUSTER = {
    "clustering_batch_size": CompatKey(target="embed.batch_size", reason="embeddings are an offline stage"),
    "clustering_max_iter": CompatKey(target="component_args.kmeans_iters", reason="k-means iterations"),
    "clustering_method": CompatKey(reason="flexfeed's cluster selector always uses k-means"),
    "representative_strategy": CompatKey(reason="flexfeed scores each cluster by `samples_per_cluster` rows drawn "
                                                "at random, then samples clusters by a softmax of the scores"),
    "embedding_model_name_or_path": CompatKey(target="embed.model_name_or_path", reason="the embed stage's model"),
    "embedding_model_dtype": CompatKey(reason="the embed stage loads the model with the run's torch_dtype"),
    "embedding_layer": CompatKey(target="embed.layer", reason="the embed stage's pooled layer"),
}

_HIDDEN = "the hidden-layer features are an offline stage (section hidden:)"
_COINCIDE = {
    "seed": CompatKey(target="flex.component_seed", reason="the k-means seed (the clustering is stored under it)"),
    "embedding_model_name_or_path": CompatKey(target="hidden.model_name_or_path", reason=_HIDDEN),
    "embedding_layers": CompatKey(target="hidden.layers", reason=_HIDDEN),
    "embedding_model_dtype": CompatKey(reason="the hidden stage loads the model with the run's torch_dtype"),
    "clustering_batch_size": CompatKey(target="hidden.batch_size", reason=_HIDDEN),
    "clustering_num_workers": CompatKey(reason="the hidden stage batches tokenized rows in process; it has no "
                                               "DataLoader workers"),
    "clustering_device": CompatKey(reason="k-means runs once per clustering with FAISS on the CPU, then is stored"),
    "clustering_max_iter": CompatKey(target="component_args.kmeans_iters", reason="k-means iterations"),
    "assignment_chunk_size": CompatKey(reason="FAISS assigns every row in one search"),
    "density_chunk_size": CompatKey(reason="densities and MMD kernels are computed one cluster at a time"),
}
"""DataFlex's coincide parameters: its features come from the `hidden` stage here, its clustering from the store."""


def _local_judge() -> tuple[str, str]:
    """What DataFlex's `local_vllm` judge runs on here: (backend, why), vllm with a GPU, else transformers."""
    from stages.grads.reward_models import vllm_refusal

    why = vllm_refusal()
    if why is None:
        return "vllm", "vllm and a CUDA GPU are here"
    return "transformers", f"{why}, so the judge runs with transformers"


def _nice_backend(value, where: str) -> Spread:
    if value == "local_vllm":
        backend, why = _local_judge()
        return Spread({"grads.nice_reward_backend": backend}, (f"local_vllm judges with {backend}: {why}",))
    if value == "api":
        return Spread({"grads.nice_reward_backend": "api"})
    raise FlexfeedError(f"{where}: unknown value {value!r}", "choose one of: local_vllm, api")


_NICE_LOCAL = {  # DataFlex's local_vllm block -> GradsArgs (None: a vllm engine setting, meaningless without vllm)
    "hf_model_name_or_path": "nice_reward_model", "vllm_temperature": "nice_reward_temperature",
    "vllm_top_p": "nice_reward_top_p", "vllm_top_k": "nice_reward_top_k", "vllm_seed": "nice_reward_seed",
    "vllm_max_tokens": "nice_reward_max_new_tokens", "vllm_max_model_len": "nice_reward_max_model_len",
    "vllm_tensor_parallel_size": "nice_reward_tensor_parallel_size",
    "vllm_gpu_memory_utilization": "nice_reward_gpu_memory_utilization",
}
_VLLM_ONLY = ("vllm_tensor_parallel_size", "vllm_gpu_memory_utilization")
_NICE_API = {"api_url": "nice_reward_api_url", "api_key": "nice_reward_api_key_env",
             "model_name": "nice_reward_api_model", "temperature": "nice_reward_api_temperature"}


def _nice_backend_params(value, where: str) -> Spread:
    """DataFlex's reward_backend_params {local_vllm: {...}, api: {...}} flattened onto the grads.nice_reward_* keys."""
    if value is None:
        return Spread({})
    if not isinstance(value, dict):
        raise FlexfeedError(f"{where} must be a mapping, got {value!r}", "write local_vllm: and api: blocks under it")
    targets, warnings = {}, []
    for block, table in (("local_vllm", _NICE_LOCAL), ("api", _NICE_API)):
        params = value.get(block) or {}
        if not isinstance(params, dict):
            raise FlexfeedError(f"{where}.{block} must be a mapping, got {params!r}", "write key: value lines")
        for key, item in params.items():
            if key not in table:
                raise FlexfeedError(f"{where}.{block}: unknown parameter {key!r}", did_you_mean(str(key), table))
            if item is None:
                continue  # DataFlex's null: the default
            if key in _VLLM_ONLY and _local_judge()[0] != "vllm":
                warnings.append(f"{block}.{key} ignored: {_local_judge()[1]}, which has no such setting")
                continue
            if key == "vllm_top_k" and item == -1:
                item = 0  # vllm's "off" is 0 here
            targets[f"grads.{table[key]}"] = item
    unknown = [k for k in value if k not in ("local_vllm", "api")]
    if unknown:
        raise FlexfeedError(f"{where}: unknown block {unknown[0]!r}", did_you_mean(str(unknown[0]), ("local_vllm", "api")))
    return Spread(targets, tuple(warnings))


_NICE = {
    **_GRADS,
    "mc_samples": CompatKey(target="grads.nice_num_samples", reason="completions sampled per target prompt"),
    "max_new_tokens": CompatKey(target="grads.nice_max_new_tokens", reason="most tokens per sampled completion"),
    "generation_temperature": CompatKey(target="grads.nice_temperature", reason="sampling temperature of the "
                                                                                "completions"),
    "max_prompt_length": CompatKey(target="grads.nice_max_prompt_tokens",
                                   reason="a longer target prompt keeps its last tokens"),
    "reward_model_backend": CompatKey(target="grads.nice_reward_backend", convert=_nice_backend,
                                      reason="local_vllm becomes nice_reward_backend vllm on a GPU with vllm, "
                                             "transformers elsewhere; api stays api"),
    "reward_backend_params": CompatKey(target="grads.nice_reward_model", convert=_nice_backend_params,
                                       reason="flattened: each judge setting goes to its grads.nice_reward_* key "
                                              "(hf_model_name_or_path to nice_reward_model, ...; docs/nice.md)"),
}
"""DataFlex's nice parameters: sampling and judge settings belong to the offline `grads:` stage here."""

_POOLINGS = {"last_token": "last", "mean_pool": "mean"}


def _pooling(value, where: str) -> str:
    if value not in _POOLINGS:
        raise FlexfeedError(f"{where}: unknown pooling {value!r}", f"choose one of: {', '.join(_POOLINGS)}")
    return _POOLINGS[value]


def _normalised(value, where: str) -> None:
    if coerce(value, bool, where) is not True:
        raise FlexfeedError(f"{where}: false is not supported: joint_update_aware compares unit embeddings "
                            "(S is a cosine Gram matrix)", "remove embed_normalize or set it to true")
    return None


_JOINT_UPDATE_AWARE = {
    "target_update_step": CompatKey(
        target="flex.update_step", reason="the target embeddings are refreshed at the live model each time the "
                                          "weight stage fires: every update_step steps (a pipeline stage's every)"),
    "target_batch_size": CompatKey(target="embed.batch_size", reason="the target embeddings are the embed stage's"),
    "target_num_batches": CompatKey(reason="the target vector is the mean over the whole target set (DataFlex's 0), "
                                           "read from the store's embed signal"),
    "fixed_point_iters": CompatKey(reason="flexfeed iterates to convergence (tol), at most max_iters times"),
    "embed_normalize": CompatKey(convert=_normalised, reason="embeddings are always L2-normalised"),
    "pooling": CompatKey(target="embed.pooling", convert=_pooling,
                         reason="the batch and the target set are pooled as the embed stage pools (last_token: last "
                                "real token, also under left padding; mean_pool: mean over real tokens)"),
    "embed_layer": CompatKey(target="embed.layer", reason="the hidden-state layer the embed stage and the batch pool"),
}
"""DataFlex's joint_update_aware parameters: its target and pooling settings are the `embed:` stage's here."""

DATAFLEX_PARAMS: dict[str, dict[str, dict[str, CompatKey]]] = {
    "selectors": {
        "*": {
            "cache_dir": CompatKey(reason=_STORE),
            "save_interval": CompatKey(reason="the store commits each shard as soon as it is written"),
        },
        "less": dict(_GRADS),
        "icons": dict(_GRADS),
        "nice": dict(_NICE),
        "cluster_less": {**_GRADS, **_CLUSTER},
        "cluster": {**_GRADS, **_CLUSTER},
        "loss": {"score_batch_size": CompatKey(target="loss.batch_size", reason=_SCORE_BATCH)},
        "delta_loss": {
            "score_batch_size": CompatKey(target="loss.batch_size", reason=_SCORE_BATCH),
            "window_size": CompatKey(reason="flexfeed's delta_loss compares with the loss `window_decisions` "
                                            "decisions ago and keeps a `top_fraction`; set those instead"),
        },
        "tsds": {
            "probs_path": CompatKey(reason="flexfeed computes the TSDS probabilities from the store's embeddings"),
        },
        "near": {
            "indices_path": CompatKey(reason="flexfeed searches a FAISS index over the store's embeddings"),
        },
        "random": {"seed": CompatKey(target="flex.component_seed", reason="the component's seed")},
        "coincide": dict(_COINCIDE),
    },
    "mixers": {
        "*": {"cache_dir": CompatKey(reason=_STORE)},
        "random": {"seed": CompatKey(target="flex.component_seed", reason="the component's seed")},
        "doremi": {
            "reference_model_path": CompatKey(
                target="loss.model_name_or_path",
                reason="reference losses are computed offline by the loss stage with the reference model"),
        },
        "odm": {
            "initial_proportions": CompatKey(target="flex.init_mixture_proportions",
                                             reason="the mixture before the first decision"),
            "warmup_steps": CompatKey(target="flex.warmup_step",
                                      reason="steps on the initial mixture before the bandit starts"),
            "num_eval_samples": CompatKey(reason="flexfeed's odm rewards come from the training batches' losses "
                                                 "(as in the ODM paper), with no evaluation pass"),
            "eval_batch_size": CompatKey(reason="flexfeed's odm runs no evaluation pass"),
            "min_exploration_rate": CompatKey(reason="flexfeed's odm follows the paper's exploration schedule "
                                                     "eps_t = min(1/K, sqrt(ln K / (K t))) without a floor"),
        },
        "dynamic_moe": {
            "eval_samples": CompatKey(target="component_args.eval_rows",
                                      reason="rows of each dataset held out to measure its expert loads"),
            "collect_steps": CompatKey(reason="flexfeed routes every measured row (eval_rows per dataset) at each "
                                              "decision"),
            "eval_batch_size": CompatKey(target="loss.batch_size",
                                         reason="rows per forward of the gate_load pass (as of the loss stage)"),
        },
    },
    "weighters": {
        "*": {"cache_dir": CompatKey(reason=_STORE)},
        "adapt": {
            "refresh_interval": CompatKey(target="refresh.max_staleness",
                                          reason="embeddings older than this many steps are recomputed with the "
                                                 "live model before a decision, and the rows rescored"),
            "anchor_batch_size": CompatKey(target="embed.batch_size", reason="embeddings are a store stage"),
            "clip": CompatKey(target="component_args.clip", reason="cap on each sigmoid weight"),
        },
        "joint_update_aware": dict(_JOINT_UPDATE_AWARE),
    },
}
"""Per (components-file section, component) DataFlex parameter -> flexfeed target or ignore reason."""


COMPONENT_SECTIONS = (*SECTIONS.values(), "pipelines")
"""The sections of a components file (DataFlex 1.1's); `pipelines` holds data plans."""


def read_components_file(path: Path) -> dict:
    """The parsed components YAML (sections selectors/mixers/reorders/weighters/pipelines)."""
    data = parse_yaml_text(path.read_text(), str(path))
    if not isinstance(data, dict):
        raise FlexfeedError(f"components file {str(path)!r} is not a mapping",
                            f"it must have sections {', '.join(f'{s}:' for s in COMPONENT_SECTIONS)}")
    unknown = [k for k in data if k not in COMPONENT_SECTIONS]
    if unknown:
        raise FlexfeedError(f"components file {str(path)!r}: unknown section {unknown[0]!r}",
                            did_you_mean(str(unknown[0]), COMPONENT_SECTIONS))
    return data


def component_entry(components: dict, train_type: str, name: str, path: Path, output_dir: str | None) -> dict:
    """The `params` of `name` in the file's section for `train_type`, with ${output_dir} substituted."""
    return section_entry(components, SECTIONS[train_type], name, path, output_dir)


def section_entry(components: dict, section: str, name: str, path: Path, output_dir: str | None) -> dict:
    """The `params` of entry `name` of `section`, with ${output_dir} substituted."""
    entries = components.get(section) or {}
    if name not in entries:
        raise FlexfeedError(f"components file {str(path)!r} has no {section}.{name} entry",
                            did_you_mean(name, entries) if entries else f"add a {section}: section with {name}:")
    entry = entries[name] or {}
    if not isinstance(entry, dict):
        raise FlexfeedError(f"{str(path)!r}, {section}.{name} must be a mapping", "write name: and params: under it")
    layout = "params" in entry or "name" in entry  # DataFlex's `name:` and `params:`, else the params themselves
    extra = [k for k in entry if k not in ("name", "params")] if layout else []
    if extra:
        raise FlexfeedError(f"{str(path)!r}, {section}.{name}: unknown key {extra[0]!r}",
                            did_you_mean(str(extra[0]), ("name", "params")))
    params = entry.get("params", {}) if layout else entry
    if not isinstance(params or {}, dict):
        raise FlexfeedError(f"{str(path)!r}, {section}.{name}.params must be a mapping", "write key: value lines")
    return {k: _substitute(v, output_dir) for k, v in (params or {}).items()}


def _substitute(value, output_dir: str | None):
    if isinstance(value, str) and "${output_dir}" in value and output_dir is not None:
        return value.replace("${output_dir}", output_dir)
    if isinstance(value, dict):
        return {k: _substitute(v, output_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, output_dir) for v in value]
    return value


def translate_params(train_type: str, name: str, params: dict, known: set[str] | None,
                     where: str) -> tuple[dict, dict, list[str]]:
    """DataFlex params -> (component_args, {"group.key": value} for other keys, warnings).

    `known` is the flexfeed component's parameter names (None when the component cannot be resolved;
    then unlisted parameters pass through and are checked when the component is built).
    """
    section = SECTIONS[train_type]
    table = {**DATAFLEX_PARAMS.get(section, {}).get("*", {}), **DATAFLEX_PARAMS.get(section, {}).get(name, {})}
    out = Translation(name)
    for key, value in params.items():
        rule = table.get(key)
        if rule is not None:
            out.apply(rule, key, value, where)
        elif known is None or key in known:
            out.args[key] = value
        else:
            choices = sorted(known) + sorted(table)
            raise FlexfeedError(f"{where}: DataFlex parameter {key!r} of {section[:-1]} {name!r} has no flexfeed "
                                "equivalent", did_you_mean(key, choices) if choices else "remove it")
    return out.args, out.elsewhere, out.warnings
