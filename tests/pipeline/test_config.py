"""The run config: every shipped YAML loads, errors are one line with file, key and hint, overrides work."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import yaml

from pipeline import config as config_mod
from pipeline.config import FlexArgs, RunConfig, accepted_keys, load_config, to_training_arguments
from pipeline.config.compat import read_components_file
from pipeline.strategies.registry import registry_for
from store.errors import FlexfeedError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.name != "components.yaml")

BASE = {"model_name_or_path": "demo_out/model", "dataset": "pydoc,arithmetic", "dataset_dir": "demo_out/data",
        "output_dir": "demo_out/runs/t"}


def write(tmp_path: Path, data, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error_of(path, overrides=(), **kwargs) -> FlexfeedError:
    with pytest.raises(FlexfeedError) as info:
        load_config(path, overrides, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


def _registered(train_type: str, name: str) -> bool:
    try:
        registry_for(train_type).resolve(name)
    except FlexfeedError:
        return False
    return True


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    raw = yaml.safe_load(path.read_text())
    flex = FlexArgs(train_type=raw.get("train_type", "static"),
                    component=raw.get("component") or raw.get("component_name") or "static")
    registered = flex.train_type == "static" or _registered(flex.train_type, flex.component)
    cfg = load_config(path, validate_component=registered)
    assert isinstance(cfg, RunConfig) and cfg.path == path
    assert cfg.model.model_name_or_path == "demo_out/model" and cfg.data.dataset_dir == "demo_out/data"
    assert cfg.training["output_dir"].startswith("demo_out/runs/")
    assert cfg.data.dataset and cfg.flex.train_type in ("static", "select", "mix", "weight")
    if not registered:
        pytest.skip(f"component {flex.component!r} is not registered yet; everything else validated")


def test_every_shipped_components_file_parses():
    for path in (ROOT / "configs").rglob("components.yaml"):
        data = read_components_file(path)
        assert set(data) <= {"selectors", "mixers", "weighters"} and data


def test_static_config_values():
    cfg = load_config(ROOT / "configs" / "static.yaml")
    assert cfg.data.dataset == ["pydoc", "stdlib_code", "docstrings", "arithmetic", "instructions"]
    assert cfg.data.eval_dataset == ["target"]
    assert cfg.store.store == "demo_out/store" and cfg.store.shard_rows == 256
    assert cfg.training["learning_rate"] == 5.0e-4 and cfg.training["max_steps"] == 60
    assert cfg.training["warmup_steps"] == 0.1  # warmup_ratio, as transformers 5 spells it
    assert cfg.flex.train_type == "static" and cfg.flex.component is None


def test_unknown_key_has_did_you_mean(tmp_path):
    err = error_of(write(tmp_path, {**BASE, "learning_rat": 1.0e-4}))
    assert "run.yaml" in err.message and "'learning_rat'" in err.message and "unknown key" in err.message
    assert err.hint == "did you mean 'learning_rate'?"


def test_unknown_section_key_and_misplaced_key(tmp_path):
    err = error_of(write(tmp_path, {**BASE, "grads": {"proj_dmi": 512}}))
    assert "'grads.proj_dmi'" in err.message and err.hint == "did you mean 'proj_dim'?"
    err = error_of(write(tmp_path, {**BASE, "proj_dim": 512}))
    assert "grads" in err.message and "grads.proj_dim" in err.hint


def test_unknown_component_and_parameter(tmp_path):
    err = error_of(write(tmp_path, {**BASE, "train_type": "select", "component": "lesss"}))
    assert "run.yaml, key 'component'" in err.message and "lesss" in err.message
    assert err.hint == "did you mean 'less'?"
    err = error_of(write(tmp_path, {**BASE, "train_type": "select", "component": "less",
                                    "component_args": {"task_reduc": "max"}}))
    assert "run.yaml" in err.message and "task_reduc" in err.message
    assert err.hint == "did you mean 'task_reduce'?"


def test_component_missing_and_train_type_unknown(tmp_path):
    err = error_of(write(tmp_path, {**BASE, "train_type": "mix"}))
    assert "needs a component" in err.message and "component" in err.hint
    err = error_of(write(tmp_path, {**BASE, "train_type": "dynamic_mixx"}))
    assert "dynamic_mixx" in err.message and err.hint == "did you mean 'dynamic_mix'?"


@pytest.mark.parametrize(("key", "value", "words"), [
    ("learning_rate", "fast", "must be a number"),
    ("learning_rate", 0, "must be > 0"),
    ("learning_rate", 3e3, "sane limit"),
    ("warmup_step", -1, "must be >= 0"),
    ("update_step", 0, "must be >= 1"),
    ("max_steps", -5, "must be >= 1"),
    ("save_steps", -10, "must be >= 0"),
    ("per_device_train_batch_size", 10**9, "sane limit"),
    ("cutoff_len", "long", "must be an integer"),
    ("bf16", "yes please", "true or false"),
    ("lr_scheduler_type", "cosin", "unknown value"),
    ("dataset", 7, "must be a list"),
    ("grads", {"proj_dim": 0}, "must be >= 1"),
    ("refresh", {"max_staleness": -3}, "must be >= 0"),
    ("shard_rows", 1.5, "must be an integer"),
])
def test_bad_value_is_one_line_error(tmp_path, key, value, words):
    err = error_of(write(tmp_path, {**BASE, key: value}))
    assert words in err.message, err.message
    assert "run.yaml" in err.message and err.hint


def test_enum_hint(tmp_path):
    err = error_of(write(tmp_path, {**BASE, "lr_scheduler_type": "cosin"}))
    assert err.hint == "did you mean 'cosine'?"


@pytest.mark.parametrize("missing", ["model_name_or_path", "dataset", "output_dir"])
def test_missing_required_key(tmp_path, missing):
    data = {k: v for k, v in BASE.items() if k != missing}
    err = error_of(write(tmp_path, data))
    assert f"missing required key {missing!r}" in err.message and missing in err.hint


def test_output_dir_optional_outside_training(tmp_path):
    data = {k: v for k, v in BASE.items() if k != "output_dir"}
    cfg = load_config(write(tmp_path, data), training=False)
    assert "output_dir" not in cfg.training


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\ndataset: a\nlearning_rate: [1, 2\noutput_dir: o\n")
    err = error_of(path)
    assert "malformed YAML" in err.message and "line" in err.message and "run.yaml" in err.message


def test_not_a_mapping_empty_and_duplicate(tmp_path):
    assert "not a mapping" in error_of(write(tmp_path, "- a\n- b\n")).message
    assert "is empty" in error_of(write(tmp_path, "# nothing\n")).message
    err = error_of(write(tmp_path, "model_name_or_path: m\ndataset: a\noutput_dir: o\ndataset: b\n"))
    assert "duplicate key 'dataset'" in err.message and "line 4" in err.message


def test_overrides_apply_and_are_validated(tmp_path):
    path = write(tmp_path, {**BASE, "train_type": "select", "component": "less", "grads": {"proj_dim": 1024}})
    cfg = load_config(path, ["learning_rate=2e-4", "grads.proj_dim=256", "component_args.task_reduce=mean",
                             "refresh.max_staleness=5", "dataset=[a, b, c]", "update_times=null"])
    assert cfg.training["learning_rate"] == 2e-4 and cfg.grads.proj_dim == 256
    assert cfg.flex.component_args == {"task_reduce": "mean"} and cfg.refresh.max_staleness == 5
    assert cfg.data.dataset == ["a", "b", "c"] and cfg.flex.update_times is None
    err = error_of(path, ["update_step=0"])
    assert "command-line override, key 'update_step' must be >= 1" in err.message
    err = error_of(path, ["learnig_rate=1.0"])
    assert "command-line override, key 'learnig_rate'" in err.message and "learning_rate" in err.hint
    err = error_of(path, ["component_args.task_reduce=median"])
    assert "task_reduce" in err.message
    assert "bad override" in error_of(path, ["learning_rate"]).message
    assert "not a section" in error_of(path, ["learning_rate.x=1"]).message


def test_llamafactory_keys_translated_or_warned(tmp_path, caplog):
    data = {**BASE, "warmup_ratio": 0.05, "flash_attn": "sdpa", "overwrite_cache": True, "plot_loss": True,
            "preprocessing_num_workers": 16, "overwrite_output_dir": False}
    with caplog.at_level(logging.WARNING, logger="flexfeed.config"):
        cfg = load_config(write(tmp_path, data))
    assert cfg.training["warmup_steps"] == 0.05 and cfg.model.attn_implementation == "sdpa"
    assert cfg.flex.plot_loss is True and cfg.data.preprocessing_num_workers == 16  # used with their meaning
    ignored = {w.split("key ")[1].split(" ")[0].strip("'") for w in cfg.warnings}
    assert ignored == {"overwrite_cache"}
    assert all("ignored:" in w for w in cfg.warnings) and len(caplog.records) == 1
    err = error_of(write(tmp_path, {**BASE, "flash_attn": "fa9"}))
    assert "fa9" in err.message and "fa2" in err.hint


def test_to_training_arguments_resolves_deepspeed(tmp_path, monkeypatch):
    ds = tmp_path / "cfg" / "ds" / "z2.json"
    ds.parent.mkdir(parents=True)
    ds.write_text((ROOT / "configs" / "deepspeed" / "ds_z2.json").read_text())
    data = {**BASE, "output_dir": str(tmp_path / "out"), "deepspeed": "ds/z2.json", "learning_rate": 3.0e-4,
            "per_device_train_batch_size": 2, "gradient_accumulation_steps": 3, "max_steps": 7, "seed": 11,
            "logging_steps": 2, "report_to": "none", "lr_scheduler_type": "cosine", "do_train": True}
    monkeypatch.chdir(tmp_path)  # the path is found relative to the config file, not the working directory
    cfg = load_config(write(tmp_path / "cfg", data))
    assert cfg.training["deepspeed"] == str(ds.resolve())
    args = to_training_arguments(cfg)
    assert args.deepspeed == str(ds.resolve())
    assert (args.learning_rate, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (3.0e-4, 2, 3)
    assert (args.max_steps, args.seed, args.logging_steps, args.output_dir) == (7, 11, 2, str(tmp_path / "out"))
    assert args.lr_scheduler_type.value == "cosine" and args.do_train


def test_deepspeed_missing_or_invalid(tmp_path):
    err = error_of(write(tmp_path, {**BASE, "deepspeed": "nope.json"}))
    assert "nope.json" in err.message and "not found" in err.message
    (tmp_path / "bad.json").write_text("{oops")
    assert "not valid JSON" in error_of(write(tmp_path, {**BASE, "deepspeed": "bad.json"})).message


def test_inline_deepspeed_dict_is_kept(tmp_path):
    inline = json.loads((ROOT / "configs" / "deepspeed" / "ds_z0.json").read_text())
    cfg = load_config(write(tmp_path, {**BASE, "deepspeed": inline}))
    assert cfg.training["deepspeed"] == inline


def test_flat_groups_do_not_collide():
    seen: dict[str, str] = {}
    for group, cls in config_mod.FLAT_GROUPS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in seen, f"{f.name} is in both {seen[f.name]} and {group}"
            seen[f.name] = group
    clash = set(seen) & set(config_mod.training_fields())
    assert not clash, f"flat keys shadow TrainingArguments fields: {clash}"
    assert not set(config_mod.SECTION_GROUPS) & (set(seen) | set(config_mod.training_fields()))


def test_key_table_follows_the_dataclasses(tmp_path, monkeypatch):
    from stages.args import ModelArgs

    @dataclasses.dataclass(kw_only=True)
    class Wider(ModelArgs):
        quantization_bit: int | None = None
        """Added later by someone else."""

    monkeypatch.setitem(config_mod.FLAT_GROUPS, "model", Wider)
    cfg = load_config(write(tmp_path, {**BASE, "quantization_bit": 4}))
    assert cfg.model.quantization_bit == 4
    assert "quantization_bit" in accepted_keys()


def test_string_numbers_and_lists(tmp_path):
    cfg = load_config(write(tmp_path, "model_name_or_path: m\ndataset: [a, b]\noutput_dir: o\n"
                                      "learning_rate: 1e-4\nnum_train_epochs: 2\nlora_target: q_proj,v_proj\n"))
    assert cfg.training["learning_rate"] == 1e-4 and cfg.training["num_train_epochs"] == 2.0
    assert cfg.data.dataset == ["a", "b"] and cfg.model.lora_target in ("q_proj,v_proj", ["q_proj", "v_proj"])


@pytest.mark.parametrize("override", [None, "eval_strategy=no"])
def test_yaml_booleans_are_their_words_for_a_string_choice(tmp_path, override):
    """YAML 1.1 reads `no` as false: a key whose choices are strings gets the word back, in a file or a key=value."""
    text = yaml.safe_dump(BASE) + ("eval_strategy: no\nsave_strategy: no\n" if override is None else "")
    cfg = load_config(write(tmp_path, text), [override] if override else [])
    assert cfg.training["eval_strategy"] == "no"
    if override is None:
        assert cfg.training["save_strategy"] == "no"


def test_a_yaml_boolean_is_still_refused_where_it_is_no_choice(tmp_path):
    with pytest.raises(FlexfeedError, match="mixture_sample_rule"):
        load_config(write(tmp_path, yaml.safe_dump(BASE)), ["mixture_sample_rule=no"])
