"""Online cost of data selection: `select` with `less` on a warm store vs `static`, side by side in one run.

Setup (made here, in a temporary folder): a tiny random Llama trained with LoRA, two train domains
of random word rows, a small target set. Offline and untimed, as in LESS: a short warm-up LoRA run
saves a checkpoint with its Adam state; the grads stage then computes the train set's
Adam-preconditioned gradient features (`grads`) and the target set's SGD features (`grads_sgd`) at
that checkpoint, into the store.

Timed: `static` (plain training) and `select` + `less` (a decision every `--update-step` steps:
read both gradient signals from the store, score every train row, take the top ones), the same
model, data, steps and seed, alternated `--repeats` times; the fastest of each is kept (the machine
is shared). Each timing is the whole `train(cfg)` call, model load and final save included, equal
for both. The decisions' own seconds come from the scheduler's records.

The reference cost is what LESS re-implementations pay per round: recomputing the gradient features
of the whole train set with the current model. It is timed here in-process with flexfeed's own
(batched) grads stage over every train row, model already loaded, so it is a lower bound on theirs.

The refresh case is what DataFlex pays at every decision: `less` with `refresh.max_staleness: 0`, so
every train row's gradient feature is recomputed at the live state (live model, live optimizer's
Adam moments) before each decision and committed to the store. Run once after the alternated pairs.
Its refresh of the train rows, as the decisions record it, is compared with one batched gradient
pass over them (the reference above): `refresh_over_pass` (target <= 1.2).

The bench exits 1 naming each figure that misses its target.

The last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as common
from _targets import ONLINE_OVERHEAD

CONFIG = """
model_name_or_path: {model}
finetuning_type: lora
lora_rank: 8
lora_target: all
attn_implementation: eager
stage: sft
dataset: wiki,chat
eval_dataset: target
dataset_dir: {data}
cutoff_len: {cutoff}
output_dir: {out}
per_device_train_batch_size: {batch}
gradient_accumulation_steps: 1
learning_rate: 1.0e-3
max_steps: {steps}
logging_steps: 10
save_strategy: "no"
report_to: none
disable_tqdm: true
dataloader_pin_memory: false
seed: 3
store: {store}
shard_rows: {shard_rows}
grads:
  proj_dim: {proj_dim}
  batch_size: 16
  grad_type: adam
  checkpoints: [{checkpoint}]
runner:
  scheduler: inline
"""


def chat_rows(num: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        a, b = rng.sample(common.WORDS, 2)
        rows.append({"instruction": f"how do a {a} and a {b} differ?", "input": "",
                     "output": f"a {a} is not a {b}; " + " ".join(rng.choice(common.WORDS)
                                                                for _ in range(rng.randint(50, 70)))})
    return rows


def write_config(tmp: Path, name: str, args, model: Path, data: Path, steps: int, checkpoint: str,
                 extra: dict) -> Path:
    text = CONFIG.format(model=model, data=data, out=tmp / "runs" / name, batch=args.batch, steps=steps,
                         store=tmp / "store", shard_rows=args.shard_rows, cutoff=args.cutoff_len, proj_dim=args.proj_dim,
                         checkpoint=json.dumps(checkpoint))
    for key, value in extra.items():
        text += f"{key}: {json.dumps(value)}\n"
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


def quiet(fn, *args, **kwargs):
    """Run fn with the Trainer's per-log prints kept out of the bench output."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        return fn(*args, **kwargs)


def timed_train(cfg_path: Path, out_dir: Path):
    from pipeline.config import load_config
    from pipeline.train import train

    t0 = time.perf_counter()
    summary = quiet(train, load_config(cfg_path, [f"output_dir={out_dir}"]))
    return time.perf_counter() - t0, summary


def decision_records(out_dir: Path) -> list[dict]:
    path = out_dir / "flexfeed_decisions.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("decision")]


def full_regrad_seconds(cfg, repeats: int) -> tuple[float, float, int]:
    """(compute seconds over every train row, setup seconds, rows): the grads stage in-process, no commit."""
    from pipeline.prepared import prepare
    from pipeline.signal_stages import stages_for

    p = prepare(cfg, need_target=False)
    lengths = [len(r) for r in p.train.rows(0, len(p.train))["input_ids"]]
    print(f"train row lengths: {min(lengths)}..{max(lengths)} tokens")
    stage = stages_for(cfg, "grads", "train")[0]
    t0 = time.perf_counter()
    stage.setup()
    setup_s = time.perf_counter() - t0
    rows = p.train.rows(0, len(p.train))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stage.compute(rows)
        times.append(time.perf_counter() - t0)
    return min(times), setup_s, len(p.train)


def decision_breakdown(cfg, repeats: int) -> dict:
    """Seconds of the parts of one `less` decision, timed apart (median of `repeats`), refresh off.

    identity: building the stages and their signal keys (hashes the model and checkpoint files);
    seed: the first decision's copy of the offline signals into run-scoped ones (once per run);
    read: reading both gradient signals from the store and casting them to float32;
    score: LESS scores of every train row (re-normalising rows, products with the target centres);
    rank: ordering the scores and taking the top rows.
    """
    import numpy as np

    from pipeline.plan import rng_for
    from pipeline.prepared import prepare
    from pipeline.refresh import StoreSignals, plan_routes, run_signal
    from pipeline.signal_stages import stages_for
    from pipeline.strategies import DecisionContext
    from pipeline.strategies.selectors.less import LessSelector, less_scores
    from pipeline.strategies.selectors.sampling import ranking, take_ranked

    p = prepare(cfg)
    parts: dict[str, list[float]] = {"identity": [], "read": [], "score": [], "rank": []}
    for rep in range(repeats):
        t0 = time.perf_counter()
        stages = stages_for(cfg, "grads", "train") + stages_for(cfg, "grads_sgd", "target")
        for st in stages:
            st.signal()
        parts["identity"].append(time.perf_counter() - t0)
        source = StoreSignals(cfg, p, 0, plan_routes(cfg, LessSelector().needs(), "less"))
        t0 = time.perf_counter()
        source.get_all("grads", "train")
        source.get_all("grads_sgd", "target")
        parts["read"].append(time.perf_counter() - t0 - parts["identity"][-1])
        ctx = DecisionContext(step=0, num_rows=len(p.train), domain_ids=p.train.domain_ids(),
                              domain_names=p.train.domain_names, rng=rng_for(0, 99, rep), signals=source,
                              target_domain_ids=p.target.domain_ids())
        t0 = time.perf_counter()
        scores = less_scores(ctx)
        parts["score"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        take_ranked(ranking(scores), cfg.flex.update_step * cfg.training["per_device_train_batch_size"])
        parts["rank"].append(time.perf_counter() - t0)
    out = {k: float(np.median(v)) for k, v in parts.items()}
    seeds = []
    for rep in range(repeats):
        t0 = time.perf_counter()
        for st, store in ((stages_for(cfg, "grads", "train")[0], p.train_store),
                          (stages_for(cfg, "grads_sgd", "target")[0], p.target_store)):
            run_signal(st, store, f"bench-seed-{rep}")
        seeds.append(time.perf_counter() - t0)
    out["seed"] = float(np.median(seeds)) - out["identity"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512, help="train rows per domain (two domains)")
    parser.add_argument("--target-rows", type=int, default=32)
    parser.add_argument("--shard-rows", type=int, default=256)
    parser.add_argument("--proj-dim", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup-steps", type=int, default=20, help="LESS warm-up LoRA run (untimed)")
    parser.add_argument("--update-step", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cutoff-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="alternated timed runs of each path")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    common.pin_threads()
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("flexfeed").setLevel(logging.ERROR)
    from pipeline.config import load_config
    from pipeline.stage_job import run_stage_job

    # every row is longer than cutoff_len, so every row is cut to the same length and a training step costs
    # the same whichever rows the selector picks: the wall-time difference is the decisions' cost
    datasets = {"wiki": common.sentence_rows(args.rows, seed=1, min_words=50, max_words=70), "chat": chat_rows(args.rows, seed=2),
                "target": chat_rows(args.target_rows, seed=3)}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = common.write_datasets(tmp / "data", datasets)
        model = common.make_model(tmp / "model", common.tokenizer_texts(datasets), hidden_size=args.hidden,
                                  intermediate_size=2 * args.hidden, num_hidden_layers=args.layers)
        print(f"model: tiny Llama hidden {args.hidden}, {args.layers} layers, LoRA r=8 on all linear layers; "
              f"train rows {2 * args.rows}, target rows {args.target_rows}, proj_dim {args.proj_dim}; "
              f"{args.steps} steps of batch {args.batch}, a decision every {args.update_step} steps", flush=True)

        # offline, untimed: LESS warm-up checkpoint, then train `grads` (adam) and target `grads_sgd`
        warm_cfg = write_config(tmp, "warmup", args, model, data, args.warmup_steps, "", {"train_type": "static"})
        warm_cfg.write_text(warm_cfg.read_text().replace('save_strategy: "no"', f"save_steps: {args.warmup_steps}")
                            .replace("  checkpoints: [\"\"]\n", "").replace("grad_type: adam", "grad_type: sgd"))
        quiet(timed_train, warm_cfg, tmp / "runs" / "warmup")
        checkpoint = str(tmp / "runs" / "warmup" / f"checkpoint-{args.warmup_steps}")
        runs = {"static": {"train_type": "static"},
                "select": {"train_type": "select", "component": "less", "warmup_step": 0,
                           "update_step": args.update_step}}
        cfgs = {n: write_config(tmp, n, args, model, data, args.steps, checkpoint, extra) for n, extra in runs.items()}
        t0 = time.perf_counter()
        for r in run_stage_job(load_config(cfgs["select"]), "grads", progress=False):
            print(f"offline: {r.summary()}")
        print(f"offline grads stage (train + target, with commits): {time.perf_counter() - t0:.1f} s", flush=True)

        times: dict[str, list[float]] = {"static": [], "select": []}
        decisions: list[list[dict]] = []
        for rep in range(args.repeats):
            order = ("static", "select") if rep % 2 == 0 else ("select", "static")
            for name in order:
                out = tmp / "runs" / f"{name}{rep}"
                seconds, summary = timed_train(cfgs[name], out)
                times[name].append(seconds)
                if name == "select":
                    decisions.append(decision_records(out))
                print(f"run {rep} {name:>6}: {seconds:6.2f} s, {summary['steps']} steps, "
                      f"train loss {summary['train_loss']:.4f}", flush=True)

        refresh_cfg = write_config(tmp, "refresh", args, model, data, args.steps, checkpoint,
                                   {**runs["select"], "refresh": {"max_staleness": 0}})
        refresh_s, _ = timed_train(refresh_cfg, tmp / "runs" / "refresh")
        refresh_decisions = decision_records(tmp / "runs" / "refresh")
        print(f"run refresh: {refresh_s:6.2f} s ({len(refresh_decisions)} decisions)", flush=True)
        regrad_s, regrad_setup_s, num_rows = full_regrad_seconds(load_config(cfgs["select"]), 1)
        parts = decision_breakdown(load_config(cfgs["select"]), 5)

    static_s, select_s = min(times["static"]), min(times["select"])
    best = decisions[times["select"].index(select_s)]
    per_decision = [r["seconds"] for r in best]
    decision_s = statistics.mean(per_decision)
    ratio = select_s / static_s
    print(f"static: {', '.join(f'{t:.2f}' for t in times['static'])} s; "
          f"select (less): {', '.join(f'{t:.2f}' for t in times['select'])} s")
    print(f"decisions in the fastest select run: {len(best)}, seconds each: "
          + ", ".join(f"{s:.3f}" for s in per_decision)
          + f" (mean {decision_s:.3f}, total {sum(per_decision):.2f})")
    for r in best[:2]:
        info = r.get("info", {})
        print(f"decision at step {r['step']}: refresh {json.dumps(r.get('refresh'))}, "
              f"selected per domain {info.get('selected_per_domain')}, distinct rows {info.get('num_unique')}")
    print("one decision, parts timed apart (median of 5): "
          + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in parts.items()) + " (seed: first decision only)")
    print(f"decisions' own time over the static run: {sum(per_decision) / static_s:.3f}")
    print(f"full re-gradient of {num_rows} train rows (in-process, model loaded, batched): {regrad_s:.2f} s "
          f"(+ {regrad_setup_s:.2f} s setup) = {regrad_s / decision_s:.0f}x one decision")
    print(f"select / static = {ratio:.3f} (target <= 1.10)")
    refresh_train_s = [r["refresh"]["grads/train"]["seconds"] for r in refresh_decisions]
    refresh_shards = [r["refresh"]["grads/train"]["stale"] for r in refresh_decisions]
    decision_refresh_s = statistics.mean(r["seconds"] for r in refresh_decisions)
    refresh_over_pass = statistics.median(refresh_train_s) / regrad_s
    print(f"refresh run (less, every train row refreshed at every decision): {refresh_s:.2f} s = "
          f"{refresh_s / static_s:.3f} x static; decisions {len(refresh_decisions)}, stale train shards each "
          f"{refresh_shards}; train refresh seconds {', '.join(f'{t:.2f}' for t in refresh_train_s)}")
    print(f"one refresh of all train rows (median) / one batched gradient pass = {refresh_over_pass:.3f} "
          f"(target <= 1.2)")
    missed = []
    if any(n != refresh_shards[0] or n == 0 for n in refresh_shards):
        missed.append(f"not every decision refreshed every train shard: {refresh_shards}")
    summary = {
        "bench": "online_overhead",
        "refresh_over_static": round(refresh_s / static_s, 4),
        "decision_refresh_s": round(decision_refresh_s, 4),
        "refresh_over_pass": round(refresh_over_pass, 4),
        "refresh_train_s": [round(t, 3) for t in refresh_train_s],
        "select_over_static": round(ratio, 4),
        "decision_s": round(decision_s, 4),
        "full_regrad_s": round(regrad_s, 3),
        "regrad_over_decision": round(regrad_s / decision_s, 1),
        "static_s": round(static_s, 3),
        "select_s": round(select_s, 3),
        "static_all_s": [round(t, 3) for t in times["static"]],
        "select_all_s": [round(t, 3) for t in times["select"]],
        "decisions": len(best),
        "decisions_total_s": round(sum(per_decision), 3),
        "first_decision_s": round(per_decision[0], 4),
        "decisions_over_static": round(sum(per_decision) / static_s, 4),
        "decision_parts_ms": {k: round(v * 1000, 2) for k, v in parts.items()},
        "selector": "less",
        "train_rows": num_rows,
        "proj_dim": args.proj_dim,
        "steps": args.steps,
        "update_step": args.update_step,
        "torch_threads": 1,
        "missed": missed,
    }
    common.emit(summary)
    if missed:
        print("missed: " + "; ".join(missed), file=sys.stderr)
        sys.exit(1)
    common.exit_on_misses(summary, ONLINE_OVERHEAD)


if __name__ == "__main__":
    main()
