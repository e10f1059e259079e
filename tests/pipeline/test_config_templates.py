"""The `template` key in a run config: LLaMA-Factory names accepted, unknown ones refused in one line listing the
known ones, and the template's special tokens carried by the model args (so every loader and key sees them)."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import load_config
from store.errors import FlexfeedError

BASE = {"model_name_or_path": "demo_out/model", "dataset": "pydoc", "dataset_dir": "demo_out/data",
        "output_dir": "demo_out/runs/t"}


def _write(tmp_path, **keys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, **keys}))
    return path


def test_named_template_tokens_reach_the_model_args(tmp_path):
    cfg = load_config(_write(tmp_path, template="llama3", new_special_tokens="<x>"))
    assert cfg.data.template == "llama3"
    assert cfg.model.new_special_tokens == ["<x>", "<|eot_id|>", "<|eom_id|>", "<|start_header_id|>",
                                            "<|end_header_id|>"]
    assert load_config(_write(tmp_path, template="default")).model.new_special_tokens == []


def test_unknown_template_is_one_line_listing_the_known_ones(tmp_path):
    with pytest.raises(FlexfeedError) as info:
        load_config(_write(tmp_path, template="lama3"))
    err = info.value
    assert "\n" not in str(err) and "run.yaml" in err.message and "template" in err.message
    assert err.hint.startswith("did you mean 'llama3'?")
    assert "qwen3_nothink" in err.hint and "lf_default" in err.hint
