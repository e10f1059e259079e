"""Every key of DataFlex's and LLaMA-Factory's example training configs is accepted, with its meaning
where flexfeed has one; features flexfeed lacks are refused when switched on; DataFlex's step count.

The key lists below were read off the example configs of DataFlex (examples/train_lora, train_full,
test) and LLaMA-Factory (examples/train_lora, train_full, train_qlora, extras): written out here, not
taken from flexfeed's tables, so a key dropped from a table fails this test.
"""

from __future__ import annotations

import logging

import pytest
import yaml

from pipeline.config import load_config
from pipeline.config.groups import accepted_keys
from store.errors import FlexfeedError

LLAMAFACTORY_EXAMPLE_KEYS = [
    "adapter_name_or_path", "apollo_layerwise", "apollo_rank", "apollo_scale", "apollo_scale_type",
    "apollo_target", "asft_alpha", "badam_mode", "badam_switch_interval", "badam_switch_mode", "badam_verbose",
    "bf16", "cutoff_len", "dataloader_num_workers", "dataset", "dataset_dir", "ddp_timeout", "deepspeed",
    "do_predict", "do_train", "double_quantization", "eval_dataset", "finetuning_type", "fp8", "fp8_backend",
    "fp8_enable_fsdp_float8_all_gather", "freeze_language_model", "freeze_multi_modal_projector",
    "freeze_trainable_layers", "freeze_trainable_modules", "freeze_vision_tower", "fsdp",
    "fsdp_transformer_layer_cls_to_wrap", "galore_layerwise", "galore_rank", "galore_scale", "galore_target",
    "gradient_accumulation_steps", "gradient_checkpointing", "gradient_checkpointing_kwargs", "image_max_pixels",
    "learning_rate", "logging_steps", "lora_rank", "lora_target", "loraplus_lr_ratio", "lr_scheduler_type",
    "max_samples", "mixture_of_depths", "model_name_or_path", "num_train_epochs", "oft_block_size", "oft_target",
    "optim", "output_dir", "overwrite_cache", "overwrite_output_dir", "packing", "per_device_eval_batch_size",
    "per_device_train_batch_size", "pissa_convert", "pissa_init", "pissa_iter", "plot_loss",
    "predict_with_generate", "pref_beta", "pref_loss", "preprocessing_num_workers", "pure_bf16",
    "quantization_bit", "quantization_method", "ray_num_workers", "report_to", "resume_from_checkpoint",
    "run_name", "save_only_model", "save_steps", "stage", "template", "tokenized_path", "trust_remote_code",
    "use_adam_mini", "use_apollo", "use_asft_loss", "use_badam", "use_dft_loss", "use_eaft_loss", "use_galore",
    "use_llama_pro", "use_muon", "use_reentrant_gc", "video_fps", "video_max_pixels", "video_maxlen",
    "warmup_ratio", "eval_strategy", "eval_steps", "val_size",
]
DATAFLEX_EXAMPLE_KEYS = [
    "adapter_name_or_path", "bf16", "component_name", "components_cfg_file", "cutoff_len", "dataloader_num_workers",
    "dataset", "ddp_timeout", "deepspeed", "do_train", "eval_dataset", "eval_steps", "eval_strategy",
    "finetuning_type", "flash_attn", "freeze_gate", "gradient_accumulation_steps", "greater_is_better",
    "init_mixture_proportions", "learning_rate", "load_best_model_at_end", "logging_steps", "lora_alpha",
    "lora_rank", "lora_target", "lr_scheduler_type", "max_steps", "metric_for_best_model", "mixer_eval_dataset",
    "mixture_sample_rule", "model_name_or_path", "num_train_epochs", "output_dir", "overwrite_cache",
    "overwrite_output_dir", "per_device_eval_batch_size", "per_device_train_batch_size", "plot_loss",
    "preprocessing_num_workers", "report_to", "save_only_model", "save_steps", "seed", "stage", "static_mix",
    "template", "train_from_scratch", "train_step", "train_type", "trust_remote_code", "update_step",
    "update_times", "use_cpu", "warmup_ratio", "warmup_step", "val_size", "early_stopping_steps",
    "early_stopping_min_delta",
]

# LLaMA-Factory features that change what is trained: refused when on, accepted when off
REFUSED_WHEN_ON = {"packing": True, "quantization_bit": 4, "fp8": True, "use_galore": True, "use_apollo": True,
                   "use_badam": True, "use_adam_mini": True, "use_muon": True, "loraplus_lr_ratio": 16.0,
                   "use_dft_loss": True, "use_eaft_loss": True, "use_asft_loss": True, "use_llama_pro": True,
                   "mixture_of_depths": "convert", "pissa_init": True}

BASE = {"model_name_or_path": "m", "dataset": "a,b", "output_dir": "out"}


@pytest.fixture
def load(tmp_path):
    def run(data: dict, overrides=()):
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump({**BASE, **data}))
        return load_config(path, overrides, validate_component=False)

    return run


def test_every_example_key_is_known():
    from pipeline.config.compat import KEY_RENAMES, LLAMAFACTORY_KEYS, SPECIAL_KEYS

    known = set(accepted_keys()) | set(LLAMAFACTORY_KEYS) | set(KEY_RENAMES) | set(SPECIAL_KEYS)
    missing = sorted(set(LLAMAFACTORY_EXAMPLE_KEYS + DATAFLEX_EXAMPLE_KEYS) - known)
    assert missing == []


@pytest.mark.parametrize(("key", "value"), sorted(REFUSED_WHEN_ON.items()))
def test_features_that_change_training_are_refused_when_on(load, key, value):
    with pytest.raises(FlexfeedError, match=f"{key}={value!r} is not supported") as err:
        load({key: value})
    assert "remove" in err.value.hint


@pytest.mark.parametrize("key", sorted(REFUSED_WHEN_ON))
def test_features_switched_off_load_silently(load, key, caplog):
    with caplog.at_level(logging.WARNING, logger="flexfeed.config"):
        load({key: False if isinstance(REFUSED_WHEN_ON[key], bool) else None})
    assert key not in caplog.text


@pytest.mark.parametrize(("key", "value"), [("galore_rank", 16), ("video_fps", 2.0), ("pref_beta", 0.1),
                                            ("ray_num_workers", 4), ("freeze_vision_tower", True)])
def test_companion_keys_warn_once_saying_why(load, key, value, caplog):
    with caplog.at_level(logging.WARNING, logger="flexfeed.config"):
        load({key: value})
    lines = [r.getMessage() for r in caplog.records if key in r.getMessage()]
    assert len(lines) == 1 and "ignored" in lines[0]


def test_translated_keys_keep_their_meaning(load):
    cfg = load({"use_reentrant_gc": False, "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                "freeze_gate": True, "plot_loss": True})
    assert cfg.training["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert cfg.training["fsdp_config"] == {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    assert cfg.model.freeze_gate is True and cfg.flex.plot_loss is True


def test_flash_attention_2_falls_back_when_not_installed(load, monkeypatch, caplog):
    import pipeline.config.compat as compat

    monkeypatch.setattr(compat, "is_flash_attn_2_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="flexfeed.config"):
        cfg = load({"flash_attn": "fa2"})
    assert cfg.model.attn_implementation is None and "FlashAttention-2 is not installed" in caplog.text
    monkeypatch.setattr(compat, "is_flash_attn_2_available", lambda: True)
    assert load({"flash_attn": "fa2"}).model.attn_implementation == "flash_attention_2"


# DataFlex's step count: dynamic_select trains epochs x (warmup + update_step x update_times),
# dynamic_mix warmup + update_step x update_times, when neither max_steps nor train_step is given
DYNAMIC = {"warmup_step": 10, "update_step": 10, "update_times": 2}


@pytest.mark.parametrize(("data", "expected"), [
    ({"train_type": "dynamic_select", "num_train_epochs": 1.0, **DYNAMIC}, 30),   # 1 x (10 + 10 x 2)
    ({"train_type": "dynamic_select", "num_train_epochs": 2.0, **DYNAMIC}, 60),   # 2 x 30
    ({"train_type": "dynamic_select", "num_train_epochs": 0.5, **DYNAMIC}, 15),   # ceil(0.5 x 30)
    ({"train_type": "dynamic_mix", "num_train_epochs": 3.0, **DYNAMIC}, 30),      # epochs play no part
    ({"train_type": "dynamic_mix", "warmup_step": 100, "update_step": 200, "update_times": 3}, 700),
    ({"train_type": "dynamic_select", "max_steps": 7, **DYNAMIC}, 7),             # max_steps wins
    ({"train_type": "dynamic_select", "train_step": 9, **DYNAMIC}, 9),            # so does train_step
    ({"train_type": "select", "num_train_epochs": 1.0, **DYNAMIC}, None),         # flexfeed's spelling: epochs
    ({"train_type": "dynamic_mix", "static_mix": True, "component_name": "static", **DYNAMIC}, None),
    ({"train_type": "dynamic_select", "warmup_step": 10, "update_step": 10, "update_times": -1}, None),
    ({"train_type": "dynamic_weight", "num_train_epochs": 1.0, **DYNAMIC}, None),  # DataFlex: the data's epochs
])
def test_dataflex_step_count(load, data, expected, caplog):
    with caplog.at_level(logging.WARNING, logger="flexfeed.config"):
        cfg = load({"component_name": "random", **data})
    assert cfg.training.get("max_steps") in ((expected,) if expected else (None, -1))
    said = [r.getMessage() for r in caplog.records if "as DataFlex does" in r.getMessage()]
    if expected and "max_steps" not in data and "train_step" not in data:
        assert len(said) == 1 and f"training {expected} steps" in said[0]
    else:
        assert said == []


def test_moe_router_freezing_is_checked_against_the_model(tiny_checkpoint):
    from stages.args import ModelArgs
    from stages.models import load_model

    with pytest.raises(FlexfeedError, match="no mixture-of-experts router"):
        load_model(ModelArgs(model_name_or_path=str(tiny_checkpoint), freeze_gate=True))


@pytest.mark.parametrize(("key", "value"), [("stage", "dpo"), ("stage", "kto"), ("stage", "rm"), ("stage", "ppo"),
                                            ("finetuning_type", "freeze"), ("finetuning_type", "oft")])
def test_stages_and_tuning_methods_flexfeed_lacks_are_refused(load, key, value):
    with pytest.raises(FlexfeedError, match=key) as err:
        load({key: value})
    assert value in str(err.value) or value in (err.value.hint or "")
