"""DataFlex 1.1.0's `nice` entry loads: every parameter translated to a grads.nice_* key or ignored with a reason."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline import config as config_mod
from pipeline.config import load_config
from pipeline.config.compat import (
    DATAFLEX_PARAMS,
    Spread,
    component_entry,
    read_components_file,
    translate_params,
)
from stages.args import GradsArgs
from store.errors import FlexfeedError

NICE_FILE = Path(__file__).parent / "data" / "dataflex_1_1_nice.yaml"
BASE = {"model_name_or_path": "demo_out/model", "dataset": "pydoc,arithmetic", "eval_dataset": "arithmetic",
        "output_dir": "out", "do_train": True, "train_type": "dynamic_select", "component_name": "nice"}


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as a CPU one whatever it has: the local_vllm judge resolves to transformers."""
    monkeypatch.setattr("stages.grads.reward_models.vllm_refusal", lambda: "vllm is not installed here")


@pytest.fixture
def run(tmp_path):
    def load(extra: dict | None = None, entry: dict | None = None, overrides=()):
        (tmp_path / "cfg").mkdir(exist_ok=True)
        comp = tmp_path / "cfg" / "components.yaml"
        if entry is None:
            shutil.copy(NICE_FILE, comp)
        else:
            comp.write_text(yaml.safe_dump({"selectors": {"nice": {"name": "nice", "params": entry}}}))
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump({**BASE, "components_cfg_file": "cfg/components.yaml", **(extra or {})}))
        return load_config(path, overrides)

    return load


def test_dataflex_1_1_nice_entry_loads_and_translates(run, no_gpu):
    cfg = run()
    g = cfg.grads
    assert (cfg.flex.train_type, cfg.flex.component, cfg.flex.component_args) == ("select", "nice", {})
    assert (g.grad_type, g.proj_dim, g.seed) == ("adam", 4096, 123)
    assert (g.nice_num_samples, g.nice_max_new_tokens, g.nice_temperature, g.nice_max_prompt_tokens) == (4, 512, 0.7, 4096)
    assert g.nice_reward_backend == "transformers"  # local_vllm without vllm or a GPU
    assert (g.nice_reward_model, g.nice_reward_temperature, g.nice_reward_top_p, g.nice_reward_top_k,
            g.nice_reward_seed, g.nice_reward_max_new_tokens, g.nice_reward_max_model_len) == (
        "meta-llama/Llama-3.1-8B", 0.0, 0.9, 40, 42, 512, None)
    assert (g.nice_reward_api_url, g.nice_reward_api_key_env, g.nice_reward_api_model, g.nice_reward_api_temperature) == (
        "https://api.openai.com/v1/chat/completions", "DF_API_KEY", "gpt-4o", 0.0)
    # vllm's engine settings have no meaning for the transformers judge: accepted, each with a warning saying why
    assert (g.nice_reward_tensor_parallel_size, g.nice_reward_gpu_memory_utilization) == (1, 0.9)  # defaults
    text = "\n".join(cfg.warnings)
    assert "local_vllm judges with transformers: vllm is not installed here" in text
    for key in ("vllm_tensor_parallel_size", "vllm_gpu_memory_utilization"):
        assert f"local_vllm.{key} ignored: vllm is not installed here, so the judge runs with transformers" in text
    assert "'cache_dir' ignored" in text and "'save_interval' ignored" in text
    # one line saying which judge was chosen
    assert sum("judges with" in w for w in cfg.warnings) == 1


def test_local_vllm_on_a_gpu_machine_with_vllm_keeps_the_engine_settings(monkeypatch, tmp_path):
    monkeypatch.setattr("stages.grads.reward_models.vllm_refusal", lambda: None)
    params = component_entry(read_components_file(NICE_FILE), "select", "nice", NICE_FILE, "out")
    args, elsewhere, warnings = translate_params("select", "nice", params, {"task_reduce"}, "nice")
    assert args == {}
    assert elsewhere["grads.nice_reward_backend"] == "vllm"
    assert elsewhere["grads.nice_reward_tensor_parallel_size"] == 1
    assert elsewhere["grads.nice_reward_gpu_memory_utilization"] == 0.9
    assert any("local_vllm judges with vllm" in w for w in warnings)
    assert not any("ignored: vllm" in w for w in warnings)


def test_every_translated_nice_key_is_a_grads_field(no_gpu):
    params = component_entry(read_components_file(NICE_FILE), "select", "nice", NICE_FILE, "out")
    _, elsewhere, _ = translate_params("select", "nice", params, {"task_reduce"}, "nice")
    fields = {f.name for f in dataclasses.fields(GradsArgs)}
    assert all(t.startswith("grads.") and t.partition(".")[2] in fields for t in elsewhere)
    table = DATAFLEX_PARAMS["selectors"]["nice"]
    assert set(params) <= set(table) | set(DATAFLEX_PARAMS["selectors"]["*"]), "every DataFlex nice param has a rule"
    assert isinstance(table["reward_backend_params"].translate({"api": {"model_name": "m"}}, "x"), Spread)
    assert config_mod.SECTION_GROUPS["grads"] is GradsArgs


def test_api_backend_and_run_keys_win(run, no_gpu):
    entry = {"reward_model_backend": "api", "reward_backend_params": {"api": {
        "api_url": "http://127.0.0.1:9/v1/chat/completions", "api_key": "MY_JUDGE_KEY", "model_name": "judge"}},
        "mc_samples": 2}
    cfg = run({"grads": {"nice_num_samples": 3}}, entry=entry)
    g = cfg.grads
    assert (g.nice_reward_backend, g.nice_reward_api_key_env, g.nice_reward_api_model) == ("api", "MY_JUDGE_KEY", "judge")
    assert g.nice_num_samples == 3  # the run config's own key wins over the components file
    assert not any("judges with" in w for w in cfg.warnings)


@pytest.mark.parametrize(("entry", "words"), [
    ({"reward_model_backend": "openai"}, "unknown value 'openai'"),
    ({"reward_backend_params": {"local_vllm": {"vllm_temprature": 0.1}}}, "did you mean 'vllm_temperature'"),
    ({"reward_backend_params": {"remote": {}}}, "unknown block 'remote'"),
    ({"reward_backend_params": ["api"]}, "must be a mapping"),
    ({"mc_samples": 0}, "nice_num_samples"),
    ({"generation_temperature": 0.0}, "nice_temperature"),
    ({"reward_model_backend": "api", "reward_backend_params": {"api": {"api_url": "ftp://x", "model_name": "m"}}},
     "http(s) URL"),
    ({"reward_model_backend": "api", "reward_backend_params": {"api": {"api_url": "https://x/v1",
                                                                       "api_key": "sk-123 secret", "model_name": "m"}}},
     "not an environment variable's name"),
])
def test_bad_nice_values_are_refused_on_load(run, no_gpu, entry, words):
    with pytest.raises(FlexfeedError) as info:
        run(entry=entry)
    assert words in str(info.value)


def test_vllm_backend_is_refused_on_load_without_vllm(run, no_gpu):
    with pytest.raises(FlexfeedError) as info:
        run({"grads": {"nice_reward_backend": "vllm", "nice_reward_model": "judge"}}, entry={})
    text = str(info.value)
    assert "vllm refused, vllm is not installed here" in text and "\n" not in text.strip()
