"""Memory of a stage run against dataset size: the embed stage over N rows vs 8N rows, side by side.

Each size runs in a fresh child process with the inline scheduler (the process that computes is the
process that is measured; a LocalCluster worker would hide its memory from the driver), builds its
own data (random word rows of 12..40 words, two domains) against one shared tiny random Llama, sets
the embed stage up (hf backend, last-token pooling: imports, model load) and runs it once on one
batch, then restarts the kernel's high-water mark at the resident set (VmRSS, /proc/self/clear_refs),
runs the stage shard by shard into a fresh store, and reads the high-water mark (VmHWM) again.

Judged: `stage_growth_ratio`, the stage's own growth above that baseline at 8N over its growth at N
(target <= 1.3; growth below 8 MB, the allocator's noise here, counts as 8 MB). Whole-process peaks are printed too, but not judged: the torch import and the model
dominate them, so a stage that kept every output would still pass a ratio of those. `--keep-outputs`
runs a stage that does keep every output, to show the judged ratio catches it. The last line printed
is the JSON summary; the exit status is 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as common
from _targets import STAGE_SCALE as TARGETS

ALLOCATOR_MB = 8.0
"""Growth below this counts as this much (measured here: 1-9 MB at N and 8N alike, run to run)."""


def child(args) -> None:
    common.pin_threads()
    from stages.args import DataArgs, EmbedArgs, ModelArgs, RunnerArgs
    from stages.data import load_data
    from stages.embed import EmbedStage
    from stages.models import load_tokenizer
    from stages.runner import _ready_stage, run_stage
    from store.store import Store

    tmp = Path(args.work)
    datasets = {"alpha": common.sentence_rows(args.rows // 2, seed=1),
                "beta": common.sentence_rows(args.rows - args.rows // 2, seed=2)}
    data_dir = common.write_datasets(tmp / f"data{args.rows}", datasets)
    model_args = ModelArgs(model_name_or_path=args.model, finetuning_type="full", attn_implementation="eager")
    tok = load_tokenizer(model_args)
    data = load_data(DataArgs(dataset=list(datasets), dataset_dir=str(data_dir), cutoff_len=128), tok)
    store = Store.open_or_create(tmp / f"store{args.rows}", dataset_fingerprint=data.fingerprint,
                                 num_rows=len(data), shard_rows=args.shard_rows)
    stage = EmbedStage(model_args, EmbedArgs(backend="hf", batch_size=16), cutoff_len=128)
    if args.keep_outputs:
        stage = _Keeping(stage)
    # set up (imports, model) and warmed on one batch in this process, in the runner's cache of ready
    # stages, so the run below reuses it: the baseline holds everything that does not scale with rows
    ready = _ready_stage(stage, 1)
    ready.compute(data.rows(0, min(16, len(data))))
    if args.keep_outputs:
        stage.kept.clear()
    process_peak_mb = common.peak_rss_mb()
    gc.collect()
    # the stage's own peak: the high-water mark restarted at the resident set after set-up (loading the
    # data may have peaked higher than the stage ever will, which a plain peak would hide)
    reset = common.reset_peak_rss()
    before_mb = common.status_mb("VmRSS")
    t0 = time.perf_counter()
    result = run_stage(stage, data, store, RunnerArgs(scheduler="inline"), progress=False)
    seconds = time.perf_counter() - t0
    stage_peak_mb = common.status_mb("VmHWM") if reset else common.peak_rss_mb()
    tokens = sum(len(r) for r in data.rows(0, len(data))["input_ids"])
    Path(args.out).write_text(json.dumps({"rows": len(data), "tokens": tokens, "shards": len(result.computed),
                                          "seconds": seconds, "peak_before_mb": before_mb,
                                          "peak_rss_mb": max(stage_peak_mb, process_peak_mb),
                                          "stage_peak_mb": stage_peak_mb, "hwm_reset": reset}))


class _Keeping:
    """A stage that keeps a copy of every output it returns (what the judged ratio must catch)."""

    def __init__(self, stage):
        self.__dict__["stage"], self.__dict__["kept"] = stage, []

    def __getattr__(self, name):
        return getattr(self.stage, name)

    def compute(self, rows):
        out = self.stage.compute(rows)
        self.kept.append(out.copy())
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024, help="N; the second run has 8N rows")
    parser.add_argument("--shard-rows", type=int, default=128)
    parser.add_argument("--keep-outputs", action="store_true",
                        help="run a stage that keeps every output (the bench must then fail)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    common.pin_threads()
    sizes = [args.rows, 8 * args.rows]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        texts = common.tokenizer_texts({"a": common.sentence_rows(200, seed=1), "b": common.sentence_rows(200, seed=2)})
        # 512-wide hidden states: each row's output is 2 KB, so a stage that kept its outputs would grow
        # by 16 MB at 8N, above the allocator's noise (a few MB)
        model = common.make_model(tmp / "model", texts, hidden_size=512, intermediate_size=512,
                                  num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8)
        results = []
        for rows in sizes:
            out = tmp / f"result{rows}.json"
            cmd = [sys.executable, __file__, "--child", "--rows", str(rows), "--shard-rows", str(args.shard_rows),
                   "--model", str(model), "--work", str(tmp), "--out", str(out),
                   *(["--keep-outputs"] if args.keep_outputs else [])]
            subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            r = json.loads(out.read_text())
            results.append(r)
            print(f"{r['rows']:6d} rows ({r['tokens']} tokens, {r['shards']} shards of {args.shard_rows}): "
                  f"{r['seconds']:6.1f} s, RSS before the stage {r['peak_before_mb']:7.1f} MB, "
                  f"at the end {r['peak_rss_mb']:7.1f} MB", flush=True)
    a, b = results[0]["peak_rss_mb"], results[1]["peak_rss_mb"]
    growth = [r["stage_peak_mb"] - r["peak_before_mb"] for r in results]
    # below ALLOCATOR_MB the growth is the C allocator's bookkeeping (freed activations of varied batch
    # shapes kept in its heap), not data the stage holds: such noise must not decide the ratio
    ratio = max(growth[1], ALLOCATOR_MB) / max(growth[0], ALLOCATOR_MB)
    print(f"stage growth above set-up: {growth[0]:.1f} MB at N, {growth[1]:.1f} MB at 8N; "
          f"ratio {ratio:.3f} (target <= {TARGETS['stage_growth_ratio'][1]})")
    summary = {
        "bench": "stage_scale",
        "rows": sizes,
        "stage_growth_mb": [round(g, 1) for g in growth],
        "stage_growth_ratio": round(ratio, 4),
        "peak_rss_mb": [round(a, 1), round(b, 1)],
        "peak_rss_ratio_not_judged": round(b / a, 4),
        "rss_before_stage_mb": [round(r["peak_before_mb"], 1) for r in results],
        "hwm_reset": all(r["hwm_reset"] for r in results),
        "seconds": [round(r["seconds"], 2) for r in results],
        "shard_rows": args.shard_rows,
        "keep_outputs": args.keep_outputs,
        "scheduler": "inline",
        "torch_threads": 1,
    }
    common.emit(summary)
    common.exit_on_misses(summary, TARGETS)

if __name__ == "__main__":
    main()
