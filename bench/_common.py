"""Shared helpers of the benchmarks: thread pinning, tiny model and data on disk, peak RSS, the summary line.

Import this module before torch: it pins BLAS/torch threads through the environment (the machine is
shared, and timings are only comparable with a fixed thread count).
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORDS = ("river", "stone", "cloud", "lamp", "paper", "garden", "signal", "window", "copper", "forest",
         "engine", "harbor", "violet", "marble", "thunder", "pocket", "silver", "candle", "meadow", "anchor")


def pin_threads() -> int:
    """One torch thread; prints the setting so a reader of the log knows what was measured."""
    import torch

    torch.set_num_threads(1)
    print(f"torch threads: {torch.get_num_threads()}  (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})",
          flush=True)
    return torch.get_num_threads()


def sentence_rows(num_rows: int, seed: int = 0, min_words: int = 12, max_words: int = 40) -> list[dict]:
    """Alpaca rows of random word sequences (varied lengths), the same for a given seed."""
    rng = random.Random(seed)
    rows = []
    for i in range(num_rows):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        rows.append({"instruction": f"continue text {i}", "input": "", "output": " ".join(words)})
    return rows


def write_datasets(data_dir: str | os.PathLike, datasets: dict[str, list[dict]]) -> Path:
    """Write each dataset as `<name>.json` (alpaca rows) plus the dataset_info.json naming them."""
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in datasets.items():
        (data / f"{name}.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({n: {"file_name": f"{n}.json"} for n in datasets}))
    return data


def tokenizer_texts(datasets: dict[str, list[dict]], limit: int = 2000) -> list[str]:
    """Texts to train the tiny tokenizer on: instructions and outputs of the first rows of each set."""
    texts = []
    for rows in datasets.values():
        for r in rows[:limit]:
            texts.append(r["instruction"])
            texts.append(r["output"])
    return texts


def make_model(out_dir: str | os.PathLike, texts: list[str], vocab_size: int = 512, seed: int = 0,
               **overrides) -> Path:
    """A tiny random Llama and its tokenizer saved at `out_dir` (demo.tiny)."""
    from demo.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(out_dir, texts, vocab_size=vocab_size, seed=seed, **overrides)


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB."""
    try:
        return status_mb("VmHWM")
    except RuntimeError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(summary: dict) -> None:
    """The bench's last line: one JSON object."""
    print(json.dumps(summary), flush=True)


def exit_on_misses(summary: dict, targets: dict) -> None:
    """Exit 1, naming each figure of `summary` that misses its target in bench/_targets.py."""
    from _targets import misses

    missed = misses(summary, targets)
    for line in missed:
        print(f"missed target: {line}", file=sys.stderr, flush=True)
    if missed:
        sys.exit(1)


def status_mb(field: str) -> float:
    """A field of /proc/self/status (VmRSS: resident now; VmHWM: the peak since start or the last reset), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Restart the kernel's high-water mark (VmHWM) at the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
