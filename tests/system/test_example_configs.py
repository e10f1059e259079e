"""Every shipped config, and DataFlex's and LLaMA-Factory's example training configs, train end to end.

The DataFlex and LLaMA-Factory examples (tests/pipeline/data/dataflex_examples: their files with the
comments removed; LLaMA-Factory's llama3_lora_sft with its commented-out `### eval` block switched on) run with only what their READMEs tell a user to change: the model path,
`dataset_dir`, the components file and the output folder. The components file is DataFlex 1.1.0's own
(tests/pipeline/data/dataflex_1_1_0_components.yaml) with its model paths pointed at the tiny model and
NICE's generation shortened. On the command line, small sizes for a 2-core CPU: a few steps with a
decision every 2 steps, short rows. The DeepSpeed ZeRO-3 path their full-fine-tuning examples name
(`examples/deepspeed/ds_z3_config.json`, relative to where DataFlex is run) is laid out in the working
folder; one of them runs under DeepSpeed in a subprocess, the others without it (ZeRO-3 on a CPU
costs ~30 s a run; tests/pipeline/test_deepspeed.py covers it).

Each run must finish with the steps asked for, write its run summary and, for a dynamic train type, the
decisions it made at the steps asked for.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.run_files import DECISIONS_FILE, RUN_FILE, WEIGHTS_FILE
from pipeline.train import train

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "tests" / "pipeline" / "data" / "dataflex_examples"
DATAFLEX_COMPONENTS = ROOT / "tests" / "pipeline" / "data" / "dataflex_1_1_0_components.yaml"

STEPS = 6
SMALL = [f"max_steps={STEPS}", "warmup_step=2", "update_step=2", "cutoff_len=48", "per_device_train_batch_size=2",
         "gradient_accumulation_steps=1", "save_steps=1000", "logging_steps=1", "eval_steps=3",
         "per_device_eval_batch_size=4"]
"""The command-line overrides every example runs with: sizes for a 2-core CPU, nothing else."""
DECISION_STEPS = [2, 4]

ALPACA_SETS = ("alpaca_en_demo", "alpaca_zh_demo", "identity", "mmlu_eval")
TEXT_SETS = ("c4_demo", "wiki_demo")


def _lf_dataset_dir(out: Path, rows: int = 24) -> Path:
    """A dataset_dir laid out as LLaMA-Factory's data/: the names its examples use, small made-up rows."""
    out.mkdir(parents=True)
    words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
             "upsilon phi chi psi omega").split()
    info = {}
    for k, name in enumerate(ALPACA_SETS):
        data = [{"instruction": f"Spell {words[(i + k) % len(words)]} backwards.", "input": "",
                 "output": words[(i + k) % len(words)][::-1] + f" ({i})"} for i in range(rows)]
        (out / f"{name}.json").write_text(json.dumps(data))
        info[name] = {"file_name": f"{name}.json"}
    for k, name in enumerate(TEXT_SETS):
        lines = [json.dumps({"text": " ".join(words[(i * 3 + j + k) % len(words)] for j in range(12))})
                 for i in range(rows)]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        info[name] = {"file_name": f"{name}.jsonl", "columns": {"prompt": "text"}}
    (out / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return out


@pytest.fixture(scope="module")
def workdir(tiny_checkpoint, tmp_path_factory):
    """A working folder as a DataFlex user has it: data, a components file, DeepSpeed configs."""
    root = tmp_path_factory.mktemp("examples")
    _lf_dataset_dir(root / "data")
    components = yaml.safe_load(DATAFLEX_COMPONENTS.read_text())
    components["mixers"]["doremi"]["params"]["reference_model_path"] = str(tiny_checkpoint)
    nice = components["selectors"]["nice"]["params"]
    nice["reward_backend_params"]["local_vllm"]["hf_model_name_or_path"] = str(tiny_checkpoint)
    nice.update(max_new_tokens=4, mc_samples=2, max_prompt_length=48, proj_dim=64)
    for entry in components["selectors"].values():
        if "proj_dim" in (entry.get("params") or {}):
            entry["params"]["proj_dim"] = 64
    (root / "components.yaml").write_text(yaml.safe_dump(components, sort_keys=False))
    ds = root / "examples" / "deepspeed"
    ds.mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "deepspeed" / "ds_z3.json", ds / "ds_z3_config.json")
    return root


def _localised(example: Path, root: Path, model: Path, *, keep_deepspeed: bool = False) -> Path:
    """The example with model path, dataset_dir, components file and output folder changed (and nothing else)."""
    text = example.read_text()
    text = re.sub(r"^model_name_or_path:.*$", f"model_name_or_path: {model}", text, flags=re.M)
    text = re.sub(r"^components_cfg_file:.*$", f"components_cfg_file: {root / 'components.yaml'}", text, flags=re.M)
    text = re.sub(r"^output_dir:.*$", f"output_dir: {root / 'out' / example.stem}", text, flags=re.M)
    text = re.sub(r"^dataset_dir:.*$", "", text, flags=re.M) + f"\ndataset_dir: {root / 'data'}\n"
    if not keep_deepspeed:
        text = re.sub(r"^deepspeed:.*$", "", text, flags=re.M)
    path = root / f"{example.stem}.yaml"
    path.write_text(text)
    return path


def _check_run(out_dir: Path, train_type: str) -> dict:
    """The run trained STEPS steps; a dynamic one decided at DECISION_STEPS (a weighter: weighted from then on)."""
    summary = json.loads((out_dir / RUN_FILE).read_text())
    assert summary["steps"] == STEPS and summary["train_type"] == train_type
    if train_type == "weight":  # the plain loss until warmup_step, weights at every step from then on
        steps = [r["step"] for r in _jsonl(out_dir / WEIGHTS_FILE)]
        assert steps == list(range(DECISION_STEPS[0], STEPS)), steps
    elif train_type != "static":
        steps = [d["step"] for d in _jsonl(out_dir / DECISIONS_FILE) if d["decision"]]
        assert steps == DECISION_STEPS, steps
    return summary


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _small(raw: dict) -> list[str]:
    """SMALL, with DataFlex's train_step (its name for max_steps) overridden where the example sets it."""
    if raw.get("train_step"):
        return [f"train_step={STEPS}" if o.startswith("max_steps=") else o for o in SMALL]
    return SMALL


EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
DEEPSPEED_EXAMPLE = "full_mixers_odm_dynamic_qwen_pt_full"


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_foreign_example_trains(example, workdir, tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(workdir)
    path = _localised(example, workdir, tiny_checkpoint)
    raw = yaml.safe_load(example.read_text())
    cfg = load_config(path, _small(raw))
    summary = train(cfg)
    _check_run(Path(cfg.training["output_dir"]), cfg.flex.train_type)
    evaluates = raw.get("eval_strategy") == "steps"
    if evaluates:
        logged = [e["step"] for e in summary["log_history"] if "eval_loss" in e]
        assert logged == [3, 6], logged
    if raw.get("plot_loss"):  # LLaMA-Factory's file names
        plots = sorted(p.name for p in Path(cfg.training["output_dir"]).glob("training_*loss.png"))
        assert plots == (["training_eval_loss.png", "training_loss.png"] if evaluates else ["training_loss.png"])


def test_foreign_example_under_deepspeed(workdir, tiny_checkpoint):
    """DataFlex's ODM full fine-tune as written, ZeRO-3 config and all, through the `flexfeed` command."""
    example = EXAMPLES / f"{DEEPSPEED_EXAMPLE}.yaml"
    path = _localised(example, workdir, tiny_checkpoint, keep_deepspeed=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(path), *SMALL], cwd=workdir,
                          env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_run(workdir / "out" / example.stem, "mix")


SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "demo"
                 and p.name != "components.yaml")
"""configs/*.yaml and configs/dataflex/*.yaml, in an order where DoReMi's steps follow each other."""


@pytest.fixture(scope="module")
def demo_layout(tiny_checkpoint, tmp_path_factory):
    """`demo_out/` as the shipped configs expect it (a small corpus, the tiny model) in a working folder."""
    from demo.corpus import build_corpus

    root = tmp_path_factory.mktemp("shipped")
    build_corpus(root / "demo_out" / "data", rows_per_domain=16, target_rows=8, val_rows=4)
    shutil.copytree(tiny_checkpoint, root / "demo_out" / "model")
    return root


@pytest.mark.parametrize("config", SHIPPED, ids=[str(p.relative_to(ROOT / "configs")) for p in SHIPPED])
def test_shipped_config_trains(config, demo_layout, monkeypatch):
    monkeypatch.chdir(demo_layout)
    raw = yaml.safe_load(config.read_text())
    cfg = load_config(config, _small(raw))
    train(cfg)
    _check_run(Path(cfg.training["output_dir"]), cfg.flex.train_type)
