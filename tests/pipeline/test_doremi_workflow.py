"""The DoReMi three-step workflow with the shipped configs: reference run, proxy run, final run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.stage_job import run_stage_job
from pipeline.train import train
from tests.helpers.run_fixtures import make_run_dir

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_three_doremi_configs_run_in_order_and_the_third_reads_the_second(tiny_checkpoint, tmp_path):
    make_run_dir(tmp_path, tiny_checkpoint)
    common = [f"model_name_or_path={tmp_path / 'model'}", f"dataset_dir={tmp_path / 'data'}", "dataset=a,b",
              f"store={tmp_path / 'store'}", "cutoff_len=48", "max_steps=8", "save_steps=100", "logging_steps=2",
              "per_device_train_batch_size=4"]
    out = {i: tmp_path / f"doremi_{i}" for i in (1, 2, 3)}
    # 1. reference model: a uniform static mixture
    train(load_config(CONFIGS / "doremi_1_reference.yaml", [*common, f"output_dir={out[1]}"]))
    # 2. reference losses from the step-1 adapter into the store, then the proxy run with doremi
    proxy = load_config(CONFIGS / "doremi_2_proxy.yaml", [*common, f"output_dir={out[2]}", "update_step=2",
                                                           f"loss.adapter_name_or_path={out[1]}"])
    assert proxy.loss.signal == "ref_loss"
    (ref,) = run_stage_job(proxy, "loss", progress=False)
    assert ref.signal == "ref_loss" and ref.computed
    train(proxy)
    weights = json.loads((out[2] / "domain_weights.json").read_text())["domain_weights"]
    assert set(weights) == {"a", "b"} and sum(weights.values()) == pytest.approx(1.0)
    # 3. the final run samples with the proxy's averaged weights
    final = load_config(CONFIGS / "doremi_3_final.yaml",
                        [*common, f"output_dir={out[3]}", f"component_args.proportions={out[2] / 'domain_weights.json'}"])
    train(final)
    decisions = [json.loads(x) for x in (out[3] / "flexfeed_decisions.jsonl").read_text().splitlines()]
    used = [d["proportions"] for d in decisions if d["decision"]]
    assert used and all(p == pytest.approx(weights) for p in used)
