"""coincide end to end: `flexfeed stage all` computes its hidden features, then it trains alone and in a plan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.config import load_config
from pipeline.stage_job import run_stage_job
from pipeline.train import train


def _decisions(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "flexfeed_decisions.jsonl").read_text().splitlines()]


def test_coincide_alone_and_after_a_semdedup_filter(run_cfg, tmp_path):
    path, root = run_cfg
    overrides = [f"output_dir={tmp_path / 'alone'}", "train_type=select", "component=coincide", "warmup_step=4",
                 "update_step=4", "component_args.num_clusters=4", "hidden.num_layers=2"]
    cfg = load_config(path, overrides)
    done = {r.signal: r for r in run_stage_job(cfg, "all", progress=False)}
    assert done["hidden"].computed and done["hidden"].rows == 64  # the component reads it: computed for every row
    assert done["kmeans"].computed and "derived from hidden" in done["kmeans"].note  # then its clustering
    again = {r.signal: r for r in run_stage_job(cfg, "all", progress=False)}
    assert not again["hidden"].computed and not again["kmeans"].computed  # both reused
    train(cfg)
    decided = [d for d in _decisions(tmp_path / "alone") if d["decision"]]
    # the clustering stage all stored, with the seed training gives the component, is what every decision reads
    assert decided and all(d["derived"]["kmeans/train"]["computed"] is False for d in decided)
    assert all(d["info"]["num_clusters"] <= 4 and d["info"]["num_unique"] == 16 for d in decided)

    plan = tmp_path / "plan.yaml"
    plan.write_text(path.read_text().replace(f"output_dir: {root}/out", f"output_dir: {tmp_path}/plan") + """
train_type: plan
warmup_step: 4
update_step: 4
hidden: {num_layers: 2}
plan:
  - {family: select, component: semdedup, mode: filter, component_args: {num_clusters: 4, eps: 0.005}}
  - {family: select, component: coincide, component_args: {num_clusters: 4}}
  - {family: weight, component: loss, component_args: {strategy: linupper}}
""")
    train(load_config(plan))
    decided = [d for d in _decisions(tmp_path / "plan") if d["decision"]]
    pool = decided[0]["filter"][0]["pool"]
    assert 16 < pool < 64 and decided[0]["derived"]["kmeans/train"]["computed"] is False  # same clustering as alone
    assert all(d["info"]["num_unique"] == 16 and sum(d["per_domain"].values()) == 16 for d in decided)
    weights = [json.loads(x) for x in (tmp_path / "plan" / "flexfeed_weights.jsonl").read_text().splitlines()]
    assert weights and not np.allclose(weights[-1]["weights"], 1.0)
