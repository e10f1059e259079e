"""Memory of a stage run against dataset size: the embed stage over N rows vs 8N rows, side by side.

Each size runs in a fresh child process with the inline scheduler (the process that computes is the
process that is measured; a LocalCluster worker would hide its memory from the driver), builds its
own data (random word rows of 12..40 words, two domains) against one shared tiny random Llama, runs
the embed stage (hf backend, last-token pooling) shard by shard into a fresh store, and reports
its peak resident set (VmHWM from /proc/self/status) at the end, plus the peak before the stage ran
(imports, model files, tokenized data) so the stage's own share is visible.

A stage whose memory does not grow with the dataset gives a ratio near 1. The last line printed is
the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as common


def child(args) -> None:
    common.pin_threads()
    from stages.args import DataArgs, EmbedArgs, ModelArgs, RunnerArgs
    from stages.data import load_data
    from stages.embed import EmbedStage
    from stages.models import load_tokenizer
    from stages.runner import run_stage
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
    before_mb = common.peak_rss_mb()
    t0 = time.perf_counter()
    result = run_stage(EmbedStage(model_args, EmbedArgs(backend="hf", batch_size=16), cutoff_len=128), data, store,
                       RunnerArgs(scheduler="inline"), progress=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(r) for r in data.rows(0, len(data))["input_ids"])
    Path(args.out).write_text(json.dumps({"rows": len(data), "tokens": tokens, "shards": len(result.computed),
                                          "seconds": seconds, "peak_before_mb": before_mb,
                                          "peak_rss_mb": common.peak_rss_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512, help="N; the second run has 8N rows")
    parser.add_argument("--shard-rows", type=int, default=128)
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
        model = common.make_model(tmp / "model", texts)
        results = []
        for rows in sizes:
            out = tmp / f"result{rows}.json"
            cmd = [sys.executable, __file__, "--child", "--rows", str(rows), "--shard-rows", str(args.shard_rows),
                   "--model", str(model), "--work", str(tmp), "--out", str(out)]
            subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            r = json.loads(out.read_text())
            results.append(r)
            print(f"{r['rows']:6d} rows ({r['tokens']} tokens, {r['shards']} shards of {args.shard_rows}): "
                  f"{r['seconds']:6.1f} s, peak RSS before the stage {r['peak_before_mb']:7.1f} MB, "
                  f"at the end {r['peak_rss_mb']:7.1f} MB", flush=True)
    a, b = results[0]["peak_rss_mb"], results[1]["peak_rss_mb"]
    ratio = b / a
    print(f"peak RSS ratio 8N / N = {ratio:.3f} (target <= 1.3)")
    common.emit({
        "bench": "stage_scale",
        "rows": sizes,
        "peak_rss_mb": [round(a, 1), round(b, 1)],
        "ratio": round(ratio, 4),
        "peak_before_stage_mb": [round(r["peak_before_mb"], 1) for r in results],
        "stage_growth_mb": [round(r["peak_rss_mb"] - r["peak_before_mb"], 1) for r in results],
        "seconds": [round(r["seconds"], 2) for r in results],
        "shard_rows": args.shard_rows,
        "scheduler": "inline",
        "torch_threads": 1,
    })


if __name__ == "__main__":
    main()
