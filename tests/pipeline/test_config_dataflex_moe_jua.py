"""DataFlex 1.1.0's dynamic_moe and joint_update_aware entries load into flexfeed's config as worked out by hand:
each parameter to a component parameter, another config key (a pipeline stage's own for the target refresh), or a
warning saying why it changes nothing here."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import load_config
from store.errors import FlexfeedError

COMPONENTS = {
    "mixers": {"dynamic_moe": {"name": "dynamic_moe", "params": {
        "eta": 5.0, "c": 0.1, "collect_steps": 5, "eval_samples": 300, "eval_batch_size": 32}}},
    "weighters": {
        "joint_update_aware": {"name": "joint_update_aware", "params": {
            "beta": 0.2, "tau": 0.1, "fixed_point_iters": 5, "damping": 0.5, "target_update_step": 50,
            "target_batch_size": 4, "target_num_batches": 1, "embed_normalize": True, "pooling": "mean_pool",
            "embed_layer": -2, "objective_mode": "diverse_only"}},
        "loss": {"name": "loss", "params": {"strategy": "linupper"}}},
    "pipelines": {"weights": {"stages": [{"family": "weighter", "component": "loss"},
                                         {"family": "weighter", "component": "joint_update_aware"}]}},
}


def _load(tmp_path, train_type, name, components=COMPONENTS, **extra):
    (tmp_path / "components.yaml").write_text(yaml.safe_dump(components))
    path = tmp_path / "run.yaml"
    run = {"model_name_or_path": "m", "dataset": "a,b", "output_dir": "out", "train_type": train_type,
           "component_name": name, "components_cfg_file": "components.yaml", **extra}
    path.write_text(yaml.safe_dump(run))
    return load_config(path)


def _ignored(cfg) -> set[str]:
    return {w.split("DataFlex parameter ")[1].split(" ")[0] for w in cfg.warnings if "DataFlex parameter" in w}


def test_dynamic_moe_entry(tmp_path):
    cfg = _load(tmp_path, "dynamic_mix", "dynamic_moe")
    assert (cfg.flex.component, cfg.flex.component_args) == ("dynamic_moe", {"eta": 5.0, "c": 0.1, "eval_rows": 300})
    assert cfg.loss.batch_size == 32 and _ignored(cfg) == {"'collect_steps'"}


def test_joint_update_aware_entry_alone_and_in_a_pipeline(tmp_path):
    run = tmp_path / "alone"
    run.mkdir()
    cfg = _load(run, "dynamic_weight", "joint_update_aware")  # DataFlex's weight configs set no update_step
    assert cfg.flex.component_args == {"beta": 0.2, "tau": 0.1, "damping": 0.5, "objective_mode": "diverse_only"}
    assert (cfg.flex.update_step, cfg.embed.batch_size, cfg.embed.pooling, cfg.embed.layer) == (50, 4, "mean", -2)
    assert _ignored(cfg) == {"'fixed_point_iters'", "'target_num_batches'"}
    plan = _load(tmp_path, "dynamic_lego", "weights", update_step=10).flex.plan
    assert [(s.component, s.every) for s in plan] == [("loss", None), ("joint_update_aware", 50)]
    bad = {**COMPONENTS, "weighters": {"joint_update_aware": {"params": {"embed_normalize": False}}}}
    with pytest.raises(FlexfeedError, match="embed_normalize.*false is not supported"):
        _load(tmp_path, "dynamic_weight", "joint_update_aware", components=bad)
