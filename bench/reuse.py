"""Reuse of committed signals: a stage run on a cold store vs the same run on the warm store, side by side.

Every run goes through the real runner with a Dask LocalCluster (`RunnerArgs()` defaults, 2 workers):
the embed stage (hf backend, last-token pooling), the loss stage and the grads stage (Adam-preconditioned,
from a Trainer-style LoRA checkpoint with its optimizer state), over the same tokenized rows of a tiny
random Llama. The cold run starts a cluster, loads the model in every worker and commits every shard.
The warm run builds fresh stage objects (their keys hash the model and checkpoint files again) against a
freshly opened store and must find every shard committed: it should read commit records only, start
no cluster and load no model. Both are counted by wrapping the runner's `open_client` and the
`load_model` of stages.models in this process; worker processes only exist if a cluster starts.

The relocated run copies the warm store, the model and the checkpoint to another folder (new paths,
new mtimes and inodes), then runs fresh stage objects against the copies once: keys hold content
only, so it must recompute nothing and find the same keys; its time includes hashing the copied files.

The cold run happens once (a store is only cold once); the warm run is repeated and its median kept.
The last line printed is the JSON summary; the exit status is 1 when a figure misses its target
(bench/_targets.py REUSE; each miss is named on stderr).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import _common as common
from _targets import REUSE


def build(tmp: Path, num_rows: int):
    from stages.args import DataArgs, ModelArgs
    from stages.data import load_data
    from stages.models import load_tokenizer

    datasets = {"alpha": common.sentence_rows(num_rows // 2, seed=1),
                "beta": common.sentence_rows(num_rows - num_rows // 2, seed=2, min_words=4, max_words=20)}
    data_dir = common.write_datasets(tmp / "data", datasets)
    model_dir = common.make_model(tmp / "model", common.tokenizer_texts(datasets))
    model_args = ModelArgs(model_name_or_path=str(model_dir), finetuning_type="full", attn_implementation="eager")
    tok = load_tokenizer(model_args)
    data = load_data(DataArgs(dataset=list(datasets), dataset_dir=str(data_dir), cutoff_len=128), tok)
    make_checkpoint(lora_args(model_args), data, tmp / "run" / "checkpoint-1")
    return model_args, data


def lora_args(model_args):
    return replace(model_args, finetuning_type="lora", lora_rank=4, lora_target="q_proj,v_proj")


def make_checkpoint(model_args, data, out: Path) -> None:
    """A LoRA checkpoint after one AdamW step, saved as the Trainer saves it (adapter, optimizer.pt, state)."""
    import torch

    from stages.batching import pad_batch
    from stages.models import load_model

    torch.manual_seed(0)
    model = load_model(model_args, trainable=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rows = data.rows(0, 8)
    model(**pad_batch(rows["input_ids"], rows["labels"])).loss.backward()
    opt.step()
    model.save_pretrained(out)
    torch.save(opt.state_dict(), out / "optimizer.pt")
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 1,
                                                        "log_history": [{"learning_rate": 1e-3, "step": 1}]}))


def make_stages(model_args, checkpoint: Path):
    from stages.args import EmbedArgs, GradsArgs, LossArgs
    from stages.embed import EmbedStage
    from stages.grads.stage import GradsStage
    from stages.loss import LossStage

    return [EmbedStage(model_args, EmbedArgs(backend="hf", batch_size=16), cutoff_len=128),
            LossStage(model_args, LossArgs(batch_size=16)),
            GradsStage(lora_args(model_args), GradsArgs(grad_type="adam", proj_dim=256, batch_size=16),
                       str(checkpoint))]


class Counters:
    """Counts cluster starts and model loads made from this process (the driver)."""

    def __init__(self):
        import stages.models as models
        import stages.runner as runner

        self.clusters = 0
        self.loads = 0
        open_client, load_model = runner.open_client, models.load_model

        def counted_open_client(*a, **k):
            self.clusters += 1
            return open_client(*a, **k)

        def counted_load_model(*a, **k):
            self.loads += 1
            return load_model(*a, **k)

        runner.open_client = counted_open_client
        models.load_model = counted_load_model

    def reset(self):
        self.clusters = self.loads = 0


def run_all(root: Path, model_args, data, shard_rows: int, runner_args):
    """Open (or create) the store under ``root``, build the stages on the model and checkpoint there and run
    each; returns (seconds, results, stages)."""
    from stages.runner import run_stage
    from store.store import Store

    t0 = time.perf_counter()
    store = Store.open_or_create(root / "store", dataset_fingerprint=data.fingerprint, num_rows=len(data),
                                 shard_rows=shard_rows)
    model_args = replace(model_args, model_name_or_path=str(root / "model"))
    stages = make_stages(model_args, root / "run" / "checkpoint-1")
    results = [run_stage(s, data, store, runner_args, progress=False) for s in stages]
    return time.perf_counter() - t0, results, stages


def relocate(tmp: Path, moved: Path) -> None:
    """Copy the store, the model and the checkpoint elsewhere with new mtimes (shutil.copy keeps none)."""
    for name in ("store", "model", "run"):
        shutil.copytree(tmp / name, moved / name, copy_function=shutil.copy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--shard-rows", type=int, default=128)
    parser.add_argument("--warm-repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    common.pin_threads()
    from stages.args import RunnerArgs

    runner_args = RunnerArgs(n_workers=args.workers)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_args, data = build(tmp, args.rows)
        counters = Counters()
        print(f"rows: {len(data)}, shard_rows: {args.shard_rows}, stages: embed (hf, last) + loss + grads (adam, "
              f"one checkpoint), runner: LocalCluster with {args.workers} workers", flush=True)

        cold_s, cold_results, _ = run_all(tmp, model_args, data, args.shard_rows, runner_args)
        cold_clusters = counters.clusters
        for r in cold_results:
            print(f"cold: {r.summary()}")
        print(f"cold: {cold_s:.2f} s, clusters started {cold_clusters}")

        warm_times, warm_recomputed, warm_clusters, warm_loads, models_in_stages = [], 0, 0, 0, 0
        for _ in range(args.warm_repeats):
            counters.reset()
            seconds, results, stages = run_all(tmp, model_args, data, args.shard_rows, runner_args)
            warm_times.append(seconds)
            warm_recomputed += sum(len(r.computed) for r in results)
            warm_clusters += counters.clusters
            warm_loads += counters.loads
            models_in_stages += sum(getattr(s, "_model", None) is not None for s in stages)
        for r in results:
            print(f"warm: {r.summary()}")
        warm_s = statistics.median(warm_times)
        print(f"warm: median {warm_s * 1000:.1f} ms of {', '.join(f'{t * 1000:.1f}' for t in warm_times)} ms; "
              f"clusters started {warm_clusters}, models loaded {warm_loads + models_in_stages}")
        ratio = warm_s / cold_s
        print(f"warm / cold = {ratio:.4f} (target <= 0.05)")

        moved = tmp / "moved"
        relocate(tmp, moved)
        counters.reset()
        moved_s, moved_results, moved_stages = run_all(moved, model_args, data, args.shard_rows, runner_args)
        moved_recomputed = sum(len(r.computed) for r in moved_results)
        moved_loads = counters.loads + sum(getattr(s, "_model", None) is not None for s in moved_stages)
        same_keys = [r.key for r in moved_results] == [r.key for r in cold_results]
        for r in moved_results:
            print(f"relocated: {r.summary()}")
        print(f"relocated to {moved}: {moved_s * 1000:.1f} ms (hashing the copied files included); same keys "
              f"{same_keys}; clusters started {counters.clusters}, models loaded {moved_loads}")
        moved_ratio = moved_s / cold_s
        print(f"relocated / cold = {moved_ratio:.4f} (target <= 0.05)")
        summary = {
            "bench": "reuse",
            "warm_over_cold": round(ratio, 5),
            "recomputed_shards": warm_recomputed,
            "relocated_over_cold": round(moved_ratio, 5),
            "relocated_recomputed_shards": moved_recomputed,
            "relocated_same_keys": same_keys,
            "cold_s": round(cold_s, 3),
            "warm_s": round(warm_s, 4),
            "warm_all_s": [round(t, 4) for t in warm_times],
            "relocated_s": round(moved_s, 4),
            "cold_shards": sum(len(r.computed) for r in cold_results),
            "warm_clusters_started": warm_clusters,
            "warm_models_loaded": warm_loads + models_in_stages,
            "relocated_clusters_started": counters.clusters,
            "relocated_models_loaded": moved_loads,
            "rows": len(data),
            "shard_rows": args.shard_rows,
            "torch_threads": 1,
        }
        common.emit(summary)
        common.exit_on_misses(summary, REUSE)


if __name__ == "__main__":
    main()
