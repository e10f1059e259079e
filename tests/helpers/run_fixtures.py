"""A tiny two-domain run (model, data, target set, config) for trainer tests."""

from __future__ import annotations

import json
from pathlib import Path

BASE_CONFIG = """
model_name_or_path: {root}/model
finetuning_type: lora
lora_rank: 4
lora_target: all
attn_implementation: eager
stage: sft
dataset: a,b
eval_dataset: t
dataset_dir: {root}/data
cutoff_len: 48
output_dir: {root}/out
per_device_train_batch_size: 4
gradient_accumulation_steps: 1
learning_rate: 1.0e-3
max_steps: 12
logging_steps: 2
save_steps: 6
report_to: none
seed: 1
store: {root}/store
shard_rows: 16
embed:
  backend: hf
  batch_size: 16
loss:
  batch_size: 16
grads:
  proj_dim: 64
  batch_size: 8
  grad_type: sgd
runner:
  scheduler: inline
"""


def make_run_dir(root: Path, checkpoint: Path) -> Path:
    """Data with two domains (a: arithmetic, b: repetition) and a target set like domain a."""
    root = Path(root)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    (root / "model").symlink_to(checkpoint, target_is_directory=True)
    a = [{"instruction": f"add {i} and {i + 1}", "input": "", "output": f"{2 * i + 1}"} for i in range(40)]
    b = [{"instruction": f"repeat word{i}", "input": "", "output": f"word{i} word{i} word{i}"} for i in range(24)]
    t = [{"instruction": f"add {i} and {i + 2}", "input": "", "output": f"{2 * i + 2}"} for i in range(6)]
    for name, rows in (("a", a), ("b", b), ("t", t)):
        (data / f"{name}.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({n: {"file_name": f"{n}.json"} for n in "abt"}))
    cfg = root / "cfg.yaml"
    cfg.write_text(BASE_CONFIG.format(root=root))
    return cfg
