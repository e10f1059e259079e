"""Loading tokenizers and causal LMs from local or hub checkpoints, LoRA adapters, and the model's identity.

A hub id is resolved to its snapshot folder first (stages.hub); everything after works on folders.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

from stages.args import ModelArgs
from stages.hub import HubAccess, resolve_model, snapshot_identity
from store.errors import FlexfeedError
from store.hashing import file_digest, fingerprint_directory, stable_hash

# torch, transformers and peft are imported inside the loaders: a model's identity (file digests)
# and its checks need none of them.
DTYPES = ("float32", "bfloat16", "float16", "auto")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
FINETUNING_TYPES = ("lora", "full")
LORA_INIT_SEED = 0
RESIZE_INIT_SEED = 0
log = logging.getLogger(__name__)
_told: set = set()  # (model folder, tokens) already reported in this process


def hub_access(args: ModelArgs) -> HubAccess:
    """How the run reaches the hubs: its cache_dir and tokens (also used for hub datasets)."""
    return HubAccess(cache_dir=args.cache_dir, hf_token=args.hf_hub_token, ms_token=args.ms_hub_token)


def _model_dir(args: ModelArgs) -> Path:
    path = args.model_name_or_path
    if not path:
        raise FlexfeedError("model_name_or_path is not set", "set it to a checkpoint folder or a hub id (org/name)")
    root = resolve_model(path, revision=args.model_revision, access=hub_access(args))
    if not (root / "config.json").is_file():
        raise FlexfeedError(f"{path!r} has no config.json, so it is not a model checkpoint",
                            "point model_name_or_path at the folder save_pretrained wrote, or a model's hub id")
    return root


def resolve_model_args(args: ModelArgs) -> ModelArgs:
    """``args`` with model_name_or_path and adapter_name_or_path as local folders (hub ids fetched or found
    in the cache at model_revision); a stage that keeps the result loads the same snapshot in every worker."""
    model = str(_model_dir(args))
    adapter = args.adapter_name_or_path
    if adapter:
        # like LLaMA-Factory, an adapter id is fetched at the model's revision
        adapter = str(adapter_dir(resolve_model(adapter, revision=args.model_revision, access=hub_access(args),
                                                what="adapter")))
    if model == args.model_name_or_path and adapter == args.adapter_name_or_path:
        return args
    return replace(args, model_name_or_path=model, adapter_name_or_path=adapter)


def adapter_dir(path: str) -> Path:
    """The folder holding adapter_config.json: a saved adapter or a Trainer checkpoint of a LoRA run."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FlexfeedError(f"adapter directory {path!r} does not exist", "check adapter_name_or_path")
    if not (root / ADAPTER_CONFIG).is_file():
        raise FlexfeedError(f"{path!r} has no {ADAPTER_CONFIG}",
                            "give a folder written by PeftModel.save_pretrained or a LoRA Trainer checkpoint")
    if not any((root / w).is_file() for w in ADAPTER_WEIGHTS):
        raise FlexfeedError(f"{path!r} has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}",
                            "the adapter was not saved completely; save it again")
    return root


def _check(args: ModelArgs) -> None:
    if args.finetuning_type not in FINETUNING_TYPES:
        raise FlexfeedError(f"unsupported finetuning_type {args.finetuning_type!r}", "use 'lora' or 'full'")
    if args.torch_dtype not in DTYPES:
        raise FlexfeedError(f"unsupported torch_dtype {args.torch_dtype!r}", f"use one of {', '.join(DTYPES)}")
    if args.adapter_name_or_path and args.finetuning_type != "lora":
        raise FlexfeedError("adapter_name_or_path is set but finetuning_type is not 'lora'",
                            "set finetuning_type: lora to load the adapter")


def load_tokenizer(args: ModelArgs):
    """The checkpoint's tokenizer (local files only); pad token set to eos when missing."""
    from transformers import AutoTokenizer

    root = _model_dir(args)
    try:
        tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=args.trust_remote_code,
                                                  local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FlexfeedError(f"cannot load a tokenizer from {str(root)!r}: {exc}",
                            "save the tokenizer into the model folder (tokenizer.save_pretrained)") from None
    add_special_tokens(tokenizer, args.new_special_tokens, str(root))
    if tokenizer.pad_token is None:
        # causal LMs often ship without a pad token; padded positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def add_special_tokens(tokenizer, tokens: list[str], where: str = "") -> int:
    """Make ``tokens`` special tokens of the tokenizer (as LLaMA-Factory adds stop words); the count newly added."""
    if not tokens:
        return 0
    num_before = len(tokenizer)
    try:
        tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)}, replace_additional_special_tokens=False)
    except TypeError:  # tokenizers without that keyword keep the old list anyway
        tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)})
    added = len(tokenizer) - num_before
    if added and (where, tuple(tokens)) not in _told:
        _told.add((where, tuple(tokens)))
        log.warning("added %d special token(s) the tokenizer of %s lacked (%s); the model's embeddings are "
                    "resized to %d rows", added, where or "the model", ", ".join(tokens), len(tokenizer))
    return added


def _resize_embeddings(model, args: ModelArgs) -> None:
    """Grow the embeddings to the tokenizer's size once new_special_tokens added tokens to it."""
    import torch

    num_tokens = len(load_tokenizer(args))
    if num_tokens <= model.get_input_embeddings().weight.shape[0]:
        return
    # new rows are drawn at random: seeded, so every process (and every signal keyed by the model) agrees
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RESIZE_INIT_SEED)
        model.resize_token_embeddings(num_tokens)


def lora_target_modules(model, target: str | list[str]) -> list[str]:
    """Module names to adapt: `all` is every nn.Linear except the output head."""
    import torch

    linear = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    head = model.get_output_embeddings()
    head_names = {name for name, module in model.named_modules() if module is head}
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear - head_names})
    targets = [t.strip() for t in target.split(",")] if isinstance(target, str) else [str(t) for t in target]
    targets = [t for t in targets if t]
    if targets == ["all"]:
        return leaves
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n, _ in model.named_modules())]
    if missing or not targets:
        raise FlexfeedError(f"lora_target {', '.join(missing) or '(empty)'} matches no module of the model",
                            f"use 'all' or some of: {', '.join(leaves)}")
    return targets


def load_model(args: ModelArgs, *, trainable: bool = True):
    """AutoModelForCausalLM from a local folder; with finetuning_type lora a new or loaded LoRA adapter.

    ``trainable=False`` gives an eval-mode model without gradients; a lora run without an adapter then
    gets the plain base model, since a fresh adapter leaves the outputs unchanged.
    """
    import torch
    from transformers import AutoModelForCausalLM

    _check(args)
    args = resolve_model_args(args)  # also fails on a bad adapter before time is spent on the base weights
    root = Path(args.model_name_or_path)
    kwargs = {"trust_remote_code": args.trust_remote_code, "local_files_only": True}
    if args.torch_dtype != "auto":
        kwargs["dtype"] = getattr(torch, args.torch_dtype)
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    try:
        if trainable and args.train_from_scratch:
            model = _fresh_model(root, kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(root, **kwargs)
    except (OSError, ValueError) as exc:
        raise FlexfeedError(f"cannot load a causal LM from {str(root)!r}: {exc}",
                            "check the checkpoint files, attn_implementation and trust_remote_code") from None
    if args.new_special_tokens:
        _resize_embeddings(model, args)
    if args.finetuning_type == "lora" and (trainable or args.adapter_name_or_path):
        model = _with_lora(model, args, trainable)
    elif trainable:
        model.requires_grad_(True)
    if trainable and args.freeze_gate:
        from stages.moe import freeze_routers

        freeze_routers(model)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def _fresh_model(root: Path, kwargs: dict):
    """The checkpoint's architecture with new weights (LLaMA-Factory's train_from_scratch), from torch's seed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(root, trust_remote_code=kwargs["trust_remote_code"], local_files_only=True)
    if "attn_implementation" in kwargs:
        config._attn_implementation = kwargs["attn_implementation"]
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=kwargs["trust_remote_code"])
    return model.to(kwargs["dtype"]) if "dtype" in kwargs else model


def _with_lora(model, args: ModelArgs, trainable: bool):
    from peft import LoraConfig, PeftModel, get_peft_model

    if args.adapter_name_or_path:
        path = adapter_dir(args.adapter_name_or_path)
        try:
            return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise FlexfeedError(f"cannot load the adapter {str(path)!r} onto {args.model_name_or_path!r}: {exc}",
                                "the adapter must have been trained on this base model") from None
    import torch

    config = LoraConfig(
        r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank, lora_dropout=args.lora_dropout,
        target_modules=lora_target_modules(model, args.lora_target), task_type="CAUSAL_LM",
    )
    # a fresh adapter's random A matrices must be the same in every worker process, since
    # model_identity (and so every signal key) describes them by their settings alone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(LORA_INIT_SEED)
        return get_peft_model(model, config)


def lora_parameters(model) -> list[tuple[str, object]]:
    """Trainable LoRA parameters (name, tensor) in the model's parameter order."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    if not params:
        raise FlexfeedError("the model has no trainable LoRA parameters",
                            "load it with finetuning_type: lora and load_model(..., trainable=True)")
    return params


def adapter_fingerprint(path: str | os.PathLike) -> str:
    """Hash of an adapter's weights and settings (not the base-model path it records, nor optimizer files)."""
    root = adapter_dir(path)
    config = json.loads((root / ADAPTER_CONFIG).read_text())
    # the base model's path differs between machines; its weights are keyed separately
    for key in ("base_model_name_or_path", "revision"):
        config.pop(key, None)
    weights = {name: file_digest(root / name) for name in ADAPTER_WEIGHTS if (root / name).is_file()}
    return stable_hash({"config": config, "weights": weights})


def model_identity(args: ModelArgs) -> dict:
    """What identifies the model in a signal key: weights, adapter hash, finetuning settings (never a path).

    The weights are a hub snapshot's `hf:org/name@<commit>` (its files are that commit's, so they need not
    be read), else the hash of the folder's files; a copy of a snapshot elsewhere is keyed by its files.
    """
    _check(args)
    args = resolve_model_args(args)
    root = Path(args.model_name_or_path)
    lora = None
    if args.finetuning_type == "lora":
        target = args.lora_target if isinstance(args.lora_target, str) else ",".join(args.lora_target)
        lora = {"rank": args.lora_rank, "alpha": args.lora_alpha or 2 * args.lora_rank,
                "dropout": args.lora_dropout, "target": target}
    identity = {
        "weights": snapshot_identity(root) or fingerprint_directory(root),
        "adapter": adapter_fingerprint(args.adapter_name_or_path) if args.adapter_name_or_path else None,
        "finetuning_type": args.finetuning_type,
        "lora": lora,
        "dtype": args.torch_dtype,
    }
    if args.new_special_tokens:  # absent otherwise, so keys made before the field existed stay valid
        identity["new_special_tokens"] = list(args.new_special_tokens)
    return identity


def source_path(path: str | os.PathLike) -> str:
    """A path as `store info` shows it: absolute, user home expanded (metadata, never part of a key)."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def model_sources(args: ModelArgs) -> dict[str, str]:
    """Where the model (and adapter) files were read from, for a signal's unkeyed ``sources``."""
    args = resolve_model_args(args)
    out = {"model": source_path(args.model_name_or_path)}
    if args.adapter_name_or_path:
        out["adapter"] = source_path(args.adapter_name_or_path)
    return out
