"""Every range and choice a group declares refuses a bad value, naming the field; the config names file and key."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from pipeline.config import FLAT_GROUPS, SECTION_GROUPS, TRAINING_RANGES, load_config, training_fields
from stages.values import FieldError, literal_choices
from store.errors import FlexfeedError

GROUPS = {**FLAT_GROUPS, **SECTION_GROUPS}
BASE = {"model_name_or_path": "m", "dataset": "a", "output_dir": "o"}


def _bad_values(f: dataclasses.Field, annotation) -> list:
    """Values just outside the field's declared range, or not among its Literal choices."""
    if literal_choices(annotation) is not None:
        return ["no_such_choice"]
    limits = f.metadata.get("range")
    if limits is None:
        return []
    out = []
    if limits.low is not None:
        below = limits.low if limits.low_open else limits.low - 1
        out.append(below - 1 if below in limits.allow else below)
    if limits.high is not None:
        out.append(limits.high * 2)
    return out


def _checked_fields():
    for group, cls in GROUPS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            for value in _bad_values(f, hints[f.name]):
                yield pytest.param(group, cls, f.name, value, id=f"{group}.{f.name}={value}")


CHECKED = list(_checked_fields())


def test_every_group_declares_checks():
    checked = {case.values[0] for case in CHECKED}
    assert checked == set(GROUPS), f"groups without a range or choice check: {set(GROUPS) - checked}"


@pytest.mark.parametrize(("group", "cls", "name", "value"), CHECKED)
def test_group_refuses_a_bad_value_naming_the_field(group, cls, name, value):
    kwargs = {"component": "less"} if cls is FLAT_GROUPS["flex"] and name != "train_type" else {}
    with pytest.raises(FlexfeedError) as info:
        cls(**kwargs, **{name: value})
    assert name in info.value.message and info.value.hint
    if name != "train_type":  # train_type's own message also accepts DataFlex's spellings
        assert isinstance(info.value, FieldError) and info.value.field == name


@pytest.mark.parametrize(("group", "name", "value"), [
    ("model", "lora_rank", 0), ("model", "finetuning_type", "qlora"),
    ("data", "cutoff_len", 0), ("data", "stage", "dpo"), ("data", "template", "chatml2"),
    ("store", "shard_rows", 10**9),
    ("flex", "update_step", 0), ("flex", "mixture_sample_rule", "mixtures"),
    ("embed", "pooling", "max"), ("loss", "batch_size", 0), ("grads", "proj_type", "sign"),
    ("index", "flat_max_rows", 0), ("runner", "retries", 101), ("refresh", "max_staleness", -1),
])
def test_config_names_the_file_and_key(tmp_path, group, name, value):
    key = name if group in FLAT_GROUPS else f"{group}.{name}"
    data = {**BASE, name: value} if group in FLAT_GROUPS else {**BASE, group: {name: value}}
    with pytest.raises(FlexfeedError) as info:
        load_config(_write(tmp_path, data))
    assert f"run.yaml, key {key!r}" in info.value.message and info.value.hint
    with pytest.raises(FlexfeedError) as info:
        load_config(_write(tmp_path, BASE), [f"{key}={value}"])
    assert f"command-line override, key {key!r}" in info.value.message


def _write(tmp_path, data):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_training_ranges_name_training_arguments_fields():
    assert set(TRAINING_RANGES) <= set(training_fields())


@pytest.mark.parametrize(("name", "value"), [(n, r.high * 2 if r.high else -1) for n, r in TRAINING_RANGES.items()]
                         + [("save_steps", -1), ("eval_steps", 10**10)])
def test_training_ranges_refuse_naming_the_key(tmp_path, name, value):
    with pytest.raises(FlexfeedError) as info:
        load_config(_write(tmp_path, {**BASE, name: value}))
    assert f"key {name!r}" in info.value.message and info.value.hint
