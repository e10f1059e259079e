"""The semdedup selector: on a decision context, alone in a run, and as the filter of a composed plan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.config import load_config
from pipeline.prepared import prepare
from pipeline.scheduler import configured_stages
from pipeline.strategies import SELECTORS
from pipeline.strategies.pool_view import pool_context
from pipeline.train import train
from stages.semdedup import SemDedupMask


def duplicated_rows() -> np.ndarray:
    """Rows 0-3 one direction (cosines >= 0.995), rows 4-5 another, rows 6 and 7 alone."""
    e = np.eye(4)
    near = lambda v, t: (v + t * e[3]) / np.linalg.norm(v + t * e[3])  # noqa: E731
    return np.array([near(e[0], t) for t in (0, 0.05, 0.08, 0.1)] + [near(e[1], t) for t in (0, 0.05)]
                    + [e[2], -e[0]], dtype=np.float32)


def test_the_filter_keeps_one_row_per_group_and_a_draw_samples_among_them(make_ctx):
    emb = duplicated_rows()
    selector = SELECTORS.build("semdedup", {"num_clusters": 1, "eps": 0.05}, seed=3)
    ctx = make_ctx(8, train={"embed": emb})
    kept = selector.select(ctx, 8).indices
    # one cluster, centroid ~ mean; groups {0..3}, {4, 5}: one survivor each; rows 6 and 7 stay
    assert kept.size == 4 and {6, 7} <= set(kept.tolist())
    assert len(set(kept.tolist()) & {0, 1, 2, 3}) == 1 and len(set(kept.tolist()) & {4, 5}) == 1
    drawn = selector.select(make_ctx(8, train={"embed": emb}, seed=1), 2).indices
    assert drawn.size == 2 and set(drawn.tolist()) <= set(kept.tolist())
    # a pool sees the mask of the whole train set, restricted to its rows
    pool = np.array([1, 2, 3, 6])
    in_pool = selector.select(pool_context(ctx, pool), 4).indices
    assert sorted(pool[in_pool].tolist()) == sorted(set(pool.tolist()) & set(kept.tolist()))


def _decisions(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "flexfeed_decisions.jsonl").read_text().splitlines()]


def _stored_mask(cfg, eps: float, seed: int) -> np.ndarray:
    p = prepare(cfg, need_target=False)
    (emb,) = p.train_store.find("embed")
    (sig,) = [s for s in p.train_store.find("semdedup") if s.meta.spec["params"]["eps"] == eps]
    assert sig.meta.spec["source"] == emb.key and sig.meta.spec["params"]["seed"] == seed
    expected = SemDedupMask(num_clusters=4, cluster_size=64, eps=eps, seed=seed).derive(emb.read_all())
    np.testing.assert_array_equal(sig.read_all(), expected)
    return expected > 0.5


def test_semdedup_alone_and_as_the_first_stage_of_a_plan(run_cfg, tmp_path):
    path, root = run_cfg
    alone = load_config(path, [f"output_dir={tmp_path / 'alone'}", "train_type=select", "component=semdedup",
                               "warmup_step=4", "update_step=4", "component_args.num_clusters=4",
                               "component_args.eps=0.3"])
    train(alone)
    keep = _stored_mask(alone, 0.3, alone.training["seed"])
    decided = [d for d in _decisions(tmp_path / "alone") if d["decision"]]
    assert decided and decided[0]["info"]["num_kept"] == int(keep.sum())
    assert decided[0]["derived"]["semdedup/train"]["computed"] is True
    assert all(d["derived"]["semdedup/train"]["computed"] is False for d in decided[1:])  # stored, then read

    plan = tmp_path / "plan.yaml"
    plan.write_text(path.read_text().replace(f"output_dir: {root}/out", f"output_dir: {tmp_path}/plan") + """
train_type: plan
warmup_step: 4
update_step: 4
plan:
  - {family: select, component: semdedup, mode: filter, component_args: {num_clusters: 4, eps: 0.3}}
  - {family: mix, component: odm}
""")
    train(load_config(plan))
    decided = [d for d in _decisions(tmp_path / "plan") if d["decision"]]
    first = decided[0]
    # the mask the first run stored is reused, and the pool is exactly its kept rows
    assert first["derived"]["semdedup/train"]["computed"] is False
    assert first["filter"][0]["pool"] == int(keep.sum()) < keep.size
    later = [d for d in _decisions(tmp_path / "plan") if d["step"] >= 4]
    assert sum(sum(d["per_domain"].values()) for d in later) > 0


def test_component_seed_seeds_the_components_and_keys_their_derived_signals(run_cfg):
    path, _ = run_cfg
    base = ["train_type=select", "component=semdedup"]
    (stage,) = configured_stages(load_config(path, base), seed=1)
    assert stage.strategy.seed == 1 and stage.strategy.mask_stage().seed == 1  # the training seed by default
    (stage,) = configured_stages(load_config(path, [*base, "component_seed=7"]), seed=1)
    assert stage.strategy.seed == 7 and stage.strategy.derivations()[0][0].seed == 7
