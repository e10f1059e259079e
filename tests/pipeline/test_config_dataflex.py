"""DataFlex configs load with the same meaning: keys, train_type spellings, the components file."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import yaml

from pipeline import config as config_mod
from pipeline.config import load_config
from pipeline.config.compat import (
    DATAFLEX_PARAMS,
    SECTIONS,
    component_entry,
    read_components_file,
    translate_params,
)
from pipeline.strategies.registry import registry_for
from store.errors import FlexfeedError

ROOT = Path(__file__).resolve().parents[2]
FAMILY = {section: train_type for train_type, section in SECTIONS.items()}

BASE = {"model_name_or_path": "demo_out/model", "dataset": "pydoc,arithmetic", "output_dir": "out",
        "do_train": True, "overwrite_output_dir": True}

COMPONENTS = {
    "selectors": {"less": {"name": "less", "params": {"cache_dir": "${output_dir}/less", "gradient_type": "sgd",
                                                      "proj_dim": 256, "seed": 7, "save_interval": 16}},
                  "random": {"name": "random", "params": {"seed": 5, "replacement": True}},
                  "loss": {"name": "loss", "params": {"focus": "medium", "window": 3}}},
    "mixers": {"static": {"name": "static", "params": {"proportions": [0.5, 0.5]}},
               "doremi": {"name": "doremi", "params": {"reference_model_path": "ref/model", "reweight_eta": 0.1,
                                                        "reweight_eps": 0.01}}},
    "weighters": {"loss": {"name": "loss", "params": {"strategy": "quadratic", "delta": 2.0}}},
}


def _registered(train_type: str, name: str):
    try:
        return registry_for(train_type).resolve(name)
    except FlexfeedError:
        return None


@pytest.fixture
def run(tmp_path):
    """Write a config under tmp/exp/ and the components file under tmp/exp/cfg/, then load it."""

    def load(data: dict, overrides=()):
        (tmp_path / "exp" / "cfg").mkdir(parents=True, exist_ok=True)
        (tmp_path / "exp" / "cfg" / "components.yaml").write_text(yaml.safe_dump(COMPONENTS))
        path = tmp_path / "exp" / "run.yaml"
        path.write_text(yaml.safe_dump({**BASE, "components_cfg_file": "cfg/components.yaml", **data}))
        return load_config(path, overrides)

    return load


def test_select_keys_and_components_file(run, caplog):
    with caplog.at_level(logging.WARNING, logger="flexfeed.config"):
        cfg = run({"train_type": "dynamic_select", "component_name": "less", "warmup_step": 10, "update_step": 10,
                   "update_times": 2})
    assert cfg.flex.train_type == "select" and cfg.flex.component == "less"
    assert (cfg.flex.warmup_step, cfg.flex.update_step, cfg.flex.update_times) == (10, 10, 2)
    assert (cfg.grads.grad_type, cfg.grads.proj_dim, cfg.grads.seed) == ("sgd", 256, 7)
    assert cfg.flex.component_args == {}
    ignored = sorted(w.split("parameter ")[1].split(" ")[0] for w in cfg.warnings if "DataFlex parameter" in w)
    assert ignored == ["'cache_dir'", "'save_interval'"]
    assert any("overwrite_output_dir" in r.getMessage() for r in caplog.records)


def test_run_config_keys_win_over_components_file(run):
    cfg = run({"train_type": "dynamic_select", "component_name": "less", "grads": {"proj_dim": 64}})
    assert cfg.grads.proj_dim == 64 and cfg.grads.seed == 7


def test_params_pass_through_when_the_component_has_them(run):
    cfg = run({"train_type": "dynamic_select", "component_name": "random"})
    assert cfg.flex.component_args == {"replacement": True} and cfg.flex.component_seed == 5
    cfg = run({"train_type": "dynamic_weight", "component_name": "loss", "train_step": 50})
    assert cfg.flex.component_args == {"strategy": "quadratic", "delta": 2.0}
    assert cfg.training["max_steps"] == 50


def test_component_overrides_and_component_args_merge(run):
    cfg = run({"train_type": "dynamic_weight", "component_name": "loss", "component_overrides": {"delta": 3.0}},
              ["component_args.strategy=uniform"])
    assert cfg.flex.component_args == {"strategy": "uniform", "delta": 3.0}


def test_unlisted_parameter_without_equivalent_is_an_error(run):
    with pytest.raises(FlexfeedError) as info:
        run({"train_type": "dynamic_select", "component_name": "loss"})
    assert "'window'" in info.value.message and "components.yaml" in info.value.message
    assert "no flexfeed equivalent" in info.value.message and info.value.hint


def test_doremi_reference_model_goes_to_the_loss_stage(run):
    cfg = run({"train_type": "dynamic_mix", "component_name": "doremi", "mixture_sample_rule": "mixture",
               "init_mixture_proportions": [1, 3], "update_times": -1})
    assert cfg.loss.model_name_or_path == "ref/model"
    assert cfg.flex.component_args == {"reweight_eta": 0.1, "reweight_eps": 0.01}
    assert cfg.flex.init_mixture_proportions == [0.25, 0.75] and cfg.flex.update_times is None


@pytest.mark.parametrize(("extra", "expected"), [
    ({"init_mixture_proportions": [0.7, 0.3]}, [0.7, 0.3]),
    ({"mixture_sample_rule": "stratified"}, "stratified"),
    ({}, "uniform"),
])
def test_static_mix_uses_the_sample_rule_not_the_file(run, extra, expected):
    cfg = run({"train_type": "dynamic_mix", "static_mix": True, "train_step": 3, **extra})
    assert cfg.flex.component == "static" and cfg.flex.component_args == {"proportions": expected}
    assert cfg.training["max_steps"] == 3


def test_static_mix_with_another_component_is_refused(run):
    with pytest.raises(FlexfeedError, match="would never run"):
        run({"train_type": "dynamic_mix", "static_mix": True, "component_name": "doremi"})


def test_conflicts_and_missing_entries(run, tmp_path):
    with pytest.raises(FlexfeedError, match="disagree"):
        run({"train_type": "dynamic_weight", "component_name": "loss", "train_step": 50, "max_steps": 60})
    with pytest.raises(FlexfeedError, match="both 'component_name' and 'component'"):
        run({"train_type": "dynamic_weight", "component_name": "loss", "component": "loss"})
    with pytest.raises(FlexfeedError) as info:
        run({"train_type": "dynamic_mix", "component_name": "odm"})
    assert "no mixers.odm entry" in info.value.message and info.value.hint
    with pytest.raises(FlexfeedError) as info:
        run({"train_type": "dynamic_select", "component_name": "less", "components_cfg_file": "nowhere.yaml"})
    assert "nowhere.yaml" in info.value.message and "not found" in info.value.message


def test_static_train_type_ignores_the_components_file(run):
    cfg = run({"train_type": "static", "component_name": "Loss"})
    assert cfg.flex.train_type == "static"


def test_shipped_dataflex_example(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "configs" / "dataflex" / "less.yaml")
    assert (cfg.flex.train_type, cfg.flex.component, cfg.flex.update_times) == ("select", "less", 2)
    assert (cfg.grads.proj_dim, cfg.grads.seed, cfg.grads.grad_type) == (512, 123, "adam")
    assert cfg.training["ddp_timeout"] == 180000000 and cfg.training["warmup_steps"] == 0.1
    cfg = load_config(ROOT / "configs" / "dataflex" / "loss_weight.yaml")
    assert cfg.flex.train_type == "weight" and cfg.training["max_steps"] == 60


def _table_cases():
    for section, comps in DATAFLEX_PARAMS.items():
        for comp, params in comps.items():
            for key, rule in params.items():
                if rule.target:
                    yield pytest.param(section, comp, key, rule.target, id=f"{section}.{comp}.{key}")


@pytest.mark.parametrize(("section", "comp", "key", "target"), list(_table_cases()))
def test_translation_targets_exist(section, comp, key, target):
    group, _, name = target.partition(".")
    if group == "component_args":
        cls = _registered(FAMILY[section], comp)
        if cls is None:
            pytest.skip(f"{section[:-1]} {comp!r} is not registered yet")
        assert name in {f.name for f in dataclasses.fields(cls.Params)}
    else:
        cls = {**config_mod.FLAT_GROUPS, **config_mod.SECTION_GROUPS}[group]
        assert name in {f.name for f in dataclasses.fields(cls)}


def _shipped_entries():
    path = ROOT / "configs" / "dataflex" / "components.yaml"
    for section, entries in read_components_file(path).items():
        for name in entries:
            yield pytest.param(path, section, name, id=f"{section}.{name}")


@pytest.mark.parametrize(("path", "section", "name"), list(_shipped_entries()))
def test_shipped_components_file_entries_translate_and_build(path, section, name):
    train_type = FAMILY[section]
    cls = _registered(train_type, name)
    if cls is None:
        pytest.skip(f"{section[:-1]} {name!r} is not registered yet")
    params = component_entry(read_components_file(path), train_type, name, path, "out")
    known = {f.name for f in dataclasses.fields(cls.Params)}
    args, elsewhere, _ = translate_params(train_type, name, params, known, name)
    registry_for(train_type).build(name, args)
    for target in elsewhere:
        group, _, key = target.partition(".")
        cls = {**config_mod.FLAT_GROUPS, **config_mod.SECTION_GROUPS}[group]
        assert key in {f.name for f in dataclasses.fields(cls)}
