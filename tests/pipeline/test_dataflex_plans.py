"""DataFlex 1.1's reorder presets and pipelines: each loads into the flexfeed config worked out by hand and
trains under `flexfeed train`; bad files are refused with one line naming file, key and fix.

data/dataflex_1_1_components.yaml holds DataFlex 1.1.0's ten reorder presets and four pipelines (and the
selector, mixer and weighter presets they name) with its names and values.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import FLAT_GROUPS, SECTION_GROUPS, load_config
from pipeline.config.dataflex_plans import (
    PATTERN_PARAMS,
    PIPELINE_KEYS,
    REORDER_KEYS,
    SCORE_SOURCES,
    STAGE_KEYS,
)
from pipeline.stage_job import run_stage_job
from pipeline.strategies import REORDERS
from pipeline.strategies.reorders import read_score_file
from stages.data import load_data, row_values
from stages.models import load_tokenizer
from store.errors import FlexfeedError
from tests.helpers.run_fixtures import make_run_dir

COMPONENTS = Path(__file__).parent / "data" / "dataflex_1_1_components.yaml"
NUM_ROWS = 64  # 40 rows of domain a, 24 of b (make_run_dir)
CACHED = {3: 2.5, 7: 0.5, 11: 4.0, 20: 1.5}  # a loss selector's cache: the rows it picked, with their loss


def score_of(row: int) -> float:
    """The `score` field written into each raw row: a permutation of 0..63, not monotone in the row id."""
    return float(row * 29 % NUM_ROWS)


STATIC = {"polarity": "higher_later", "score": "field", "score_key": "score", "live": False}
LIVE_SAW = {"polarity": "higher_later", "score": "loss", "live": True, "window_size": 0, "num_sections": 3,
            "folding_ratio": 0.075, "layers": 2}
REORDER_PRESETS = {
    "sorting": ("sorting", {**STATIC, "window_size": 0}),
    "shuffle": ("shuffle", STATIC),
    "segment": ("segment", {**STATIC, "x_pct": 10, "y_pct": 10, "front_is_high": False, "back_is_high": True}),
    "folding": ("folding", {**STATIC, "window_size": 0, "layers": 3}),
    "zigzag": ("zigzag", {**STATIC, "window_size": 0, "layers": 3}),
    "stair": ("stair", {**STATIC, "window_size": 0, "num_sections": 2, "folding_ratio": 0.225, "layers": 3}),
    "saw": ("saw", {**STATIC, "window_size": 0, "num_sections": 3, "folding_ratio": 0.075, "layers": 2}),
    "dynamic_saw": ("saw", LIVE_SAW),
    "dynamic_folding": ("folding", {"polarity": "higher_later", "score": "loss", "live": True, "layers": 3}),
    "reuse_selector_scores": ("saw", {"polarity": "higher_later", "score": "file", "score_path": "CACHE",
                                      "score_key": "loss", "score_fill": 0.0, "live": False, "num_sections": 3,
                                      "folding_ratio": 0.075, "layers": 2}),
}
"""preset -> (flexfeed reorder, its component_args), worked out from the preset by the translation tables."""

SELECT_LOSS = {"family": "select", "component": "loss", "component_args": {"focus": "medium"}}
ODM = {"family": "mix", "component": "odm", "component_args": {"alpha": 0.9, "reward_scale": 15.0}, "mode": "draw",
       "warmup_step": 2000, "every": 50}  # ODM's warmup_steps: 2000 is its stage's warmup
WEIGHT_LOSS = {"family": "weight", "component": "loss", "component_args": {"strategy": "linupper", "delta": 1.0},
               "mode": "draw", "warmup_step": 10, "every": None}
PIPELINES = {
    "hierarchical": [
        {**SELECT_LOSS, "mode": "filter", "keep_ratio": 0.5, "warmup_step": 10, "every": 200}, ODM,
        {"family": "reorder", "component": "saw", "component_args": LIVE_SAW, "mode": "draw", "warmup_step": None,
         "every": 50},
        WEIGHT_LOSS],
    "select_then_reorder": [
        {**SELECT_LOSS, "mode": "filter", "keep_ratio": 0.5, "warmup_step": 10, "every": 100},
        {"family": "reorder", "component": "saw", "component_args": LIVE_SAW, "mode": "draw", "warmup_step": None,
         "every": 20}],
    "mix_then_weight": [ODM, WEIGHT_LOSS],
    "select_only": [{**SELECT_LOSS, "mode": "draw", "warmup_step": 10, "every": 1}],
}
"""pipeline -> its plan stages (family, component, component_args, mode, warmup_step, every, keep_ratio)."""


def _stage(s) -> dict:
    out = {"family": s.family, "component": s.component, "component_args": s.component_args, "mode": s.mode,
           "warmup_step": s.warmup_step, "every": s.every}
    return {**out, "keep_ratio": s.keep_ratio} if s.mode == "filter" else out


def write_components(exp: Path, text: str | None = None) -> Path:
    """The components file at exp/cfg/components.yaml and the selector cache its reuse preset names."""
    (exp / "cfg").mkdir(parents=True, exist_ok=True)
    path = exp / "cfg" / "components.yaml"
    path.write_text(text if text is not None else COMPONENTS.read_text())
    cache = exp / "dataflex_saves" / "loss_output" / "step_10.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"indices": list(CACHED), "metric": {"loss": list(CACHED.values())}}))
    return path


# ---------------------------------------------------------------- loading, by hand

@pytest.fixture
def load(tmp_path):
    exp = tmp_path / "exp"
    write_components(exp)

    def run(train_type: str, name: str, **extra):
        path = exp / "run.yaml"
        path.write_text(yaml.safe_dump({
            "model_name_or_path": "m", "dataset": "a,b", "output_dir": "out", "train_type": train_type,
            "component_name": name, "components_cfg_file": "cfg/components.yaml", "warmup_step": 2,
            "update_step": 2, **extra}))
        return load_config(path)

    run.cache = str((exp / "dataflex_saves" / "loss_output" / "step_10.json").resolve())
    return run


@pytest.mark.parametrize("preset", sorted(REORDER_PRESETS))
def test_each_reorder_preset_loads_as_its_pattern(load, preset):
    cfg = load("dynamic_reorder", preset)
    component, args = REORDER_PRESETS[preset]
    args = {k: (load.cache if v == "CACHE" else v) for k, v in args.items()}
    assert (cfg.flex.train_type, cfg.flex.component, cfg.flex.component_args) == ("reorder", component, args)
    assert cfg.loss.batch_size == (8 if args["score"] == "loss" else 16)  # score_params.batch_size
    ignored = {w.split("DataFlex parameter ")[1].split(" ")[0] for w in cfg.warnings}
    assert "'seed'" in ignored  # no per-component seed, said in the warning
    assert ("'apply_at'" in ignored) == (preset in ("sorting", "shuffle", "segment", "folding", "zigzag", "stair",
                                                    "saw"))
    assert ("'score_params.max_samples'" in ignored) == preset.startswith("dynamic_")


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_each_pipeline_loads_as_a_plan(load, name):
    cfg = load("dynamic_lego", name)
    assert cfg.flex.train_type == "plan" and cfg.flex.component is None
    assert [_stage(s) for s in cfg.flex.plan] == PIPELINES[name]
    assert cfg.flex.warmup_step == 2  # ODM's warmup went to its stage, not to the run
    uses_odm = any(s["component"] == "odm" for s in PIPELINES[name])
    assert cfg.flex.init_mixture_proportions == ([0.5, 0.5] if uses_odm else None)
    assert cfg.loss.batch_size == (16 if name == "mix_then_weight" else 8)
    ignored = {w.split("DataFlex parameter ")[1].split(" ")[0] for w in cfg.warnings}
    assert "'cache_dir'" in ignored and ("'min_exploration_rate'" in ignored) == uses_odm


def test_reorder_every_and_the_run_config_keys(load, tmp_path):
    text = COMPONENTS.read_text().replace("reorder_every: 1\n      consume_once: true\n  dynamic_folding",
                                          "reorder_every: 3\n      consume_once: true\n  dynamic_folding")
    write_components(tmp_path / "exp", text)
    cfg = load("dynamic_reorder", "dynamic_saw", loss={"batch_size": 4})
    assert cfg.flex.train_type == "plan" and cfg.loss.batch_size == 4  # the run config's key wins
    assert [_stage(s) for s in cfg.flex.plan] == [{"family": "reorder", "component": "saw", "component_args": LIVE_SAW,
                                                   "mode": "draw", "warmup_step": None, "every": 6}]
    plan = load("dynamic_lego", "hierarchical").flex.plan
    assert plan[2].every == 150  # the stage's every: 50, re-scored every 3rd firing


def test_precomputed_scores_from_a_file_and_descending(load, tmp_path):
    np.save(tmp_path / "exp" / "cfg" / "scores.npy", np.arange(4.0))
    text = COMPONENTS.read_text().replace("      ascending: true\n      window_size: 0\n      seed: 42\n      score_source: "
                                          "precomputed\n      score_params:\n        score_field: score\n",
                                          "      ascending: false\n      score_source: precomputed\n      score_params:\n"
                                          "        score_path: scores.npy\n", 1)
    write_components(tmp_path / "exp", text)
    cfg = load("dynamic_reorder", "sorting")
    assert cfg.flex.component_args == {"polarity": "higher_earlier", "score": "file", "live": False, "score_key": "score",
                                       "score_path": str((tmp_path / "exp" / "cfg" / "scores.npy").resolve())}


# ---------------------------------------------------------------- score files and row fields

def test_a_selector_cache_scores_the_rows_it_lists(tmp_path):
    path = tmp_path / "step_10.json"
    path.write_text(json.dumps({"indices": [4, 1], "metric": {"loss": [2.0, 3.0], "other": [0, 0]}}))
    assert read_score_file(str(path), "loss", 6, fill=0.5).tolist() == [0.5, 3.0, 0.5, 0.5, 2.0, 0.5]
    with pytest.raises(FlexfeedError, match="scores 2 of 6 train rows") as info:
        read_score_file(str(path), "loss", 6)
    assert "score_fill" in info.value.hint
    with pytest.raises(FlexfeedError, match="no metric 'los'") as info:
        read_score_file(str(path), "los", 6, fill=0.0)
    assert info.value.hint == "did you mean 'loss'?"
    path.write_text(json.dumps({"metric": {"loss": [1, 2, 3]}}))  # a dense list under metric
    assert read_score_file(str(path), "loss", 3).tolist() == [1.0, 2.0, 3.0]


def _data_dir(tmp_path: Path, scores: dict[int, object]) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}", **({"score": scores[i]} if i in scores else {})}
            for i in range(4)]
    (data / "x.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"x": {"file_name": "x.json"}}))
    return data


@pytest.mark.parametrize("value,words", [(None, "no value"), ("7", "not a finite number"),
                                         (float("nan"), "not a finite number"), (True, "not a finite number")])
def test_row_scores_are_numbers_in_every_row(tmp_path, value, words):
    scores = {0: 1.0, 1: 2, 2: value, 3: 0.5}
    if value is None:
        del scores[2]
    cfg = load_config(_light_run(tmp_path, _data_dir(tmp_path, scores)), training=False)
    with pytest.raises(FlexfeedError, match=words) as info:
        row_values(cfg.data, "score")
    assert "x.json, row 3, column 'score'" in info.value.message and info.value.hint


def _light_run(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset": "x", "dataset_dir": str(data)}))
    return path


# ---------------------------------------------------------------- training, under `flexfeed train`

@pytest.fixture(scope="module")
def run_root(tiny_checkpoint, tmp_path_factory):
    """The tiny run (make_run_dir) with a `score` in every raw row; its stages computed once."""
    root = tmp_path_factory.mktemp("dataflex_run")
    base = make_run_dir(root, tiny_checkpoint)
    cfg = load_config(base)
    before = load_data(cfg.data, load_tokenizer(cfg.model)).fingerprint
    row = 0
    for name in ("a", "b"):
        path = root / "data" / f"{name}.json"
        rows = json.loads(path.read_text())
        for r in rows:
            r["score"] = score_of(row)
            row += 1
        path.write_text(json.dumps(rows))
    assert row == NUM_ROWS
    assert load_data(cfg.data, load_tokenizer(cfg.model)).fingerprint == before  # the score field changes no key
    assert row_values(cfg.data, "score").tolist() == [score_of(r) for r in range(NUM_ROWS)]
    run_stage_job(cfg, "all", progress=False)
    write_components(root)
    return root


def flexfeed_train(root: Path, out: Path, dataflex: str) -> list[dict]:
    """`flexfeed train` on the tiny run with DataFlex's keys added; the decisions it wrote."""
    text = (root / "cfg.yaml").read_text().replace(f"output_dir: {root}/out", f"output_dir: {out}")
    path = out.parent / f"{out.name}.yaml"
    path.write_text(text + f"components_cfg_file: {root}/cfg/components.yaml\n" + dataflex)
    result = CliRunner().invoke(main, ["train", str(path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "trained 12 steps" in result.output
    return [json.loads(x) for x in (out / "flexfeed_decisions.jsonl").read_text().splitlines()]


EVERY_2 = "warmup_step: 2\nupdate_step: 2\n"


@pytest.mark.parametrize("preset", sorted(REORDER_PRESETS))
def test_each_reorder_preset_trains(run_root, tmp_path, seen_rows, preset):
    decisions = flexfeed_train(run_root, tmp_path / "out", f"train_type: dynamic_reorder\ncomponent_name: {preset}\n"
                               + EVERY_2)
    # a reorder on fixed scores orders from the run's start (as DataFlex's static reorders do); one on the
    # live loss decides from the first decision window on
    first = [2] if preset.startswith("dynamic_") else [0, 2]
    assert [d["step"] for d in decisions if d["decision"]] == [*first, 4, 6, 8, 10]
    served = [r for batch in seen_rows[2:] for r in batch]  # from the first decision: 10 steps x 4 rows
    assert len(served) == 40 and len(set(served)) == 40  # one pass: no row twice
    scores = [score_of(r) for r in served]
    if preset == "sorting":
        assert scores == sorted(scores)
    if preset == "reuse_selector_scores":  # listed rows have their cached loss, the rest 0.0: all low first
        assert all(CACHED.get(r, 0.0) <= 1.5 for r in served[:30])


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_each_pipeline_trains(run_root, tmp_path, seen_rows, name):
    decisions = flexfeed_train(run_root, tmp_path / "out", f"train_type: dynamic_lego\ncomponent_name: {name}\n"
                               + EVERY_2)
    assert len(seen_rows) == 12
    fired = {s["stage"]: [] for d in decisions if "stages" in d for s in d["stages"]}
    for d in decisions:
        for s in d.get("stages", []):
            if s["fired"]:
                fired[s["stage"]].append(d["step"])
    if name == "select_then_reorder":  # the filter fires at 10; the reorder then orders its pool
        assert fired == {"select:loss(filter)": [10], "reorder:saw": [2]}
        at_10 = next(d for d in decisions if d["step"] == 10)
        assert at_10["filter"][0]["pool"] == NUM_ROWS // 2 and at_10["reorder"]["rows"] == NUM_ROWS // 2
    if name == "hierarchical":  # odm waits for its 2000 warmup steps: the initial mixture throughout
        assert fired["mix:odm"] == [] and fired["select:loss(filter)"] == [10] and fired["weight:loss"] == [10]


def test_select_only_gives_the_rows_of_a_loss_selection(run_root, tmp_path, seen_rows):
    timing = "warmup_step: 10\nupdate_step: 1\n"  # select_only's stage: warmup_step 10, every 1
    decisions = flexfeed_train(run_root, tmp_path / "plan", "train_type: dynamic_lego\ncomponent_name: select_only\n"
                               + timing)
    assert [d["step"] for d in decisions if d["decision"]] == [10, 11]
    plan = list(seen_rows)
    seen_rows.clear()
    flexfeed_train(run_root, tmp_path / "select", "train_type: dynamic_select\ncomponent_name: loss\n" + timing)
    assert seen_rows == plan and len(plan) == 12


# ---------------------------------------------------------------- refused, one line each

BAD = {
    "unknown section": ("reorders:", "reorderz:", "unknown section 'reorderz'", "did you mean 'reorders'?"),
    "unknown stage key": ("{family: reorder, component: dynamic_saw, every: 20}",
                          "{family: reorder, component: dynamic_saw, evry: 20}",
                          "pipelines.select_then_reorder.stages[1]: unknown stage key 'evry'", "did you mean 'every'?"),
    "missing preset": ("{family: reorder, component: dynamic_saw, every: 20}",
                       "{family: reorder, component: dynamic_sw, every: 20}",
                       "pipelines.select_then_reorder.stages[1]: component 'dynamic_sw' is not a preset of the "
                       "reorders: section", "did you mean 'dynamic_saw'?"),
    "unknown pipeline key": ("      cache_dir: ../dataflex_saves/lego_output\n      stages:\n        - {family: selector, "
                             "component: loss, mode: filter, keep_ratio: 0.5, warmup_step: 10, every: 100}",
                             "      cache_dr: x\n      stages:\n        - {family: selector, "
                             "component: loss, mode: filter, keep_ratio: 0.5, warmup_step: 10, every: 100}",
                             "pipelines.select_then_reorder: unknown pipeline key 'cache_dr'", "did you mean 'cache_dir'?"),
    "unknown reorder key": ("      reorder_every: 1\n      consume_once: true\n  dynamic_folding",
                            "      reorder_evry: 1\n      consume_once: true\n  dynamic_folding",
                            "reorders.dynamic_saw: unknown reorder key 'reorder_evry'", "did you mean 'reorder_every'?"),
    "consume_once false": ("      reorder_every: 1\n      consume_once: true\n  dynamic_folding",
                           "      reorder_every: 1\n      consume_once: false\n  dynamic_folding",
                           "reorders.dynamic_saw, 'consume_once': consume_once False is not supported",
                           "serves each row once per pass"),
    "unknown entry key": ("  select_then_reorder:\n    name: select_then_reorder\n",
                          "  select_then_reorder:\n    name: select_then_reorder\n    parms: {}\n",
                          "pipelines.select_then_reorder: unknown key 'parms'", "did you mean 'params'?"),
    "presets disagree": ("      score_batch_size: 8\n\nmixers", "      score_batch_size: 4\n\nmixers",
                         "stages[1]: its presets set loss.batch_size to 8, an earlier part of the pipeline to 4",
                         "make them agree, or set loss.batch_size in the run config"),
    "unknown score param": ("        num_workers: 2", "        num_worker: 2",
                            "reorders.dynamic_saw: unknown score_params key 'num_worker'", "did you mean 'num_workers'?"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_components_files_are_one_error_line(tmp_path, case):
    old, new, message, hint = BAD[case]
    text = COMPONENTS.read_text()
    assert old in text
    components = write_components(tmp_path, text.replace(old, new, 1))
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset": "a", "output_dir": str(tmp_path / "out"),
                                   "train_type": "dynamic_lego", "component_name": "select_then_reorder",
                                   "components_cfg_file": "cfg/components.yaml"}))
    result = CliRunner().invoke(main, ["train", str(run)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert str(components) in lines[0] and message in lines[0] and hint in lines[0], lines[0]


def _table_targets():
    rules = {**REORDER_KEYS, **PATTERN_PARAMS, **PIPELINE_KEYS, **STAGE_KEYS}
    for src in SCORE_SOURCES.values():
        rules.update(src.params)
    for rule in rules.values():
        yield from ([rule.target] if rule.target else []) + list(rule.sets)


def test_every_translation_target_exists():
    reorder_params = {f for name in REORDERS.names() for f in REORDERS.resolve(name).Params.__dataclass_fields__}
    groups = {**FLAT_GROUPS, **SECTION_GROUPS}
    for target in set(_table_targets()):
        group, _, name = target.partition(".")
        if group == "component_args":
            assert name in reorder_params or not name, target
        elif group not in ("component", "stage"):
            assert name in groups[group].__dataclass_fields__, target


def test_a_pattern_parameter_the_pattern_lacks_is_refused(load, tmp_path):
    text = COMPONENTS.read_text().replace("pattern: sorting\n      apply_at: raw\n",
                                          "pattern: sorting\n      apply_at: raw\n      pattern_params: {layers: 3}\n")
    write_components(tmp_path / "exp", text)
    with pytest.raises(FlexfeedError, match="pattern 'sorting' has no parameter 'layers'"):
        load("dynamic_reorder", "sorting")
    assert "layers" not in {f for f in REORDERS.resolve("sorting").Params.__dataclass_fields__}

