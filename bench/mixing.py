"""Quality of dynamic mixing: worst-domain validation loss of `doremi` and `odm` against `static` uniform, over seeds.

Setup (all made here, in a temporary folder):

- a tiny random Llama (hidden 64, 2 layers) and a BPE tokenizer trained on the data;
- domain `easy`: the same four sentences, repeated (each row answers "recite motto k");
- domain `hard`: integer arithmetic with fresh random operands in every row ("compute 47 * 83 + 12");
  the answer is learnable only slowly and never fully by a model this size;
- held-out `easy_val` and `hard_val` sets drawn the same way (new arithmetic operands), used as the
  run's `eval_dataset`, so each run ends with a per-domain validation loss;
- DoReMi's reference (steps 1 and 2 of its workflow, made once): `static` uniform trained for `--ref-steps`
  steps (default: as many as the proxy) at seed 7, then the loss stage scores every train row with it into
  `ref_loss`. The reference is this trained model, not the initial one: against the initial model every
  excess loss is clipped to 0 as soon as the proxy learns anything, and DoReMi would never move.

Then, per seed (`--seeds`, 0..n-1), one run per method, all from the same random initial model with the same
steps, batch and learning rate, a decision every `--update-step` steps; the seed changes the rows drawn and
the mixers' random draws:

- `static`: uniform, the baseline;
- `doremi` in each form of `--forms` (`reweight`, the paper's and flexfeed's default: windows drawn uniformly,
  losses weighted by alpha; `sample`: windows drawn from alpha) with each eps of `--eps` (DoReMi's own 1e-3
  and 0.05, tuned earlier on this bench so that `sample` keeps every domain in its windows): named
  `doremi` for reweight at 1e-3 (the target's), else `doremi[_sample][_eps<eps>]`;
- `odm` with its defaults.

The figure is the worst domain's validation loss at the end (the larger of easy_val and hard_val): what
Group DRO (DoReMi) minimises, and what a mixer that leans on the hard domain should lower. Printed per
method: the mean, the per-seed values, `wins` (seeds where it is below static uniform's at the same seed),
each domain's mean validation loss, the mean final weights (DoReMi's averaged alpha, ODM's last policy)
and the longest stretch of decisions that left a domain without rows. The last line is the JSON summary;
targets (bench/_targets.py MIXING, for the default study only): `doremi` (reweight, eps 1e-3) and `odm`
beat uniform in at least 4 of 5 seeds, else the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import tempfile
import time
from pathlib import Path

import _common as common
from _targets import MIXING

REF_SEED = 7
DOMAINS = ("easy", "hard")
FORMS = ("reweight", "sample")
PAPER_EPS = 1e-3
EPS = (PAPER_EPS, 0.05)
TARGET_DOREMI = "doremi"  # reweight (the default form) at the paper's eps

MOTTOS = [
    "the early bird catches the worm and the night owl sees the stars",
    "a stitch in time saves nine and a penny saved is a penny earned",
    "still waters run deep and every cloud has a silver lining",
    "practice makes perfect and patience is a quiet kind of strength",
]

CONFIG = """
model_name_or_path: {model}
finetuning_type: full
attn_implementation: eager
stage: sft
dataset: easy,hard
eval_dataset: easy_val,hard_val
dataset_dir: {data}
cutoff_len: 64
output_dir: {out}
per_device_train_batch_size: {batch}
gradient_accumulation_steps: 1
learning_rate: {lr}
lr_scheduler_type: constant
max_steps: {steps}
logging_steps: 10
save_strategy: "no"
report_to: none
disable_tqdm: true
dataloader_pin_memory: false
seed: {seed}
store: {store}
shard_rows: 256
runner:
  scheduler: inline
"""


def easy_rows(num: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        k = rng.randrange(len(MOTTOS))
        rows.append({"instruction": f"recite motto {k}", "input": "", "output": MOTTOS[k]})
    return rows


def hard_rows(num: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)
        op = rng.choice("+-*")
        value = {"+": a + b, "-": a - b, "*": a * b}[op] + c
        rows.append({"instruction": f"compute {a} {op} {b} + {c}", "input": "",
                     "output": f"{a} {op} {b} = {value - c} , {value - c} + {c} = {value}"})
    return rows


def write_config(tmp: Path, name: str, args, model: Path, data: Path, steps: int, seed: int, extra: dict) -> Path:
    text = CONFIG.format(model=model, data=data, out=tmp / "runs" / name, batch=args.batch, lr=args.lr,
                         steps=steps, seed=seed, store=tmp / "store")
    for key, value in extra.items():
        text += f"{key}: {json.dumps(value)}\n"
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


def doremi_name(form: str, eps: float) -> str:
    """`doremi` for the paper's own setting (reweight, eps 1e-3); the other variants say how they differ."""
    return "doremi" + ("" if form == "reweight" else f"_{form}") + ("" if eps == PAPER_EPS else f"_eps{eps:g}")


def method_runs(args) -> dict[str, dict]:
    """Run keys of each method of the study, static uniform first (the baseline every seed compares with)."""
    mix = {"train_type": "mix", "warmup_step": 0, "update_step": args.update_step}
    runs = {"static": dict(mix, component="static", component_args={"proportions": "uniform"})}
    ref_loss = {"loss": {"model_name_or_path": "{ref}", "signal": "ref_loss", "batch_size": 32}}
    for form in args.forms:
        for eps in args.eps:
            runs[doremi_name(form, eps)] = dict(mix, component="doremi", **ref_loss, component_args={
                "reweight_eta": args.eta, "reweight_eps": eps, "form": form})
    runs["odm"] = dict(mix, component="odm", component_args={"alpha": 0.9, "reward_scale": args.odm_reward_scale})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=256, help="train rows per domain")
    parser.add_argument("--val-rows", type=int, default=64, help="validation rows per domain")
    parser.add_argument("--ref-steps", type=int, default=None, help="reference run steps (default: --steps)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--update-step", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eta", type=float, default=1.0, help="doremi reweight_eta")
    parser.add_argument("--eps", default=",".join(f"{e:g}" for e in EPS), help="doremi reweight_eps values")
    parser.add_argument("--forms", default=",".join(FORMS), help="doremi forms (reweight, sample, weights_only)")
    parser.add_argument("--odm-reward-scale", type=float, default=1.0)
    args = parser.parse_args()
    default_study = vars(args) == vars(parser.parse_args([]))  # the targets are set for it alone
    args.eps = [float(e) for e in args.eps.split(",")]
    args.forms = args.forms.split(",")
    args.ref_steps = args.ref_steps or args.steps
    common.pin_threads()
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("flexfeed").setLevel(logging.ERROR)
    from pipeline.config import load_config
    from pipeline.stage_job import run_stage_job
    from pipeline.train import train

    datasets = {"easy": easy_rows(args.rows, 1), "hard": hard_rows(args.rows, 2),
                "easy_val": easy_rows(args.val_rows, 3), "hard_val": hard_rows(args.val_rows, 4)}
    runs = method_runs(args)
    methods = list(runs)
    val: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    weights: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    starved: dict[str, list[int]] = {m: [] for m in methods}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = common.write_datasets(tmp / "data", datasets)
        model = common.make_model(tmp / "model", common.tokenizer_texts(datasets))
        print(f"domains: easy ({args.rows} rows, 4 distinct sentences), hard ({args.rows} rows, random arithmetic); "
              f"batch {args.batch}, lr {args.lr}, {args.steps} steps, decision every {args.update_step} steps, "
              f"full fine-tuning of a random tiny Llama; {args.seeds} seeds; methods {', '.join(methods)}", flush=True)

        # DoReMi steps 1 and 2, once: the reference trained on the uniform mixture, and its loss on every train row
        ref_cfg = write_config(tmp, "reference", args, model, data, args.ref_steps, REF_SEED, runs["static"])
        ref = quiet(train, load_config(ref_cfg))
        ref_dir = Path(ref["output_dir"])
        print(f"reference: static uniform, seed {REF_SEED}, {ref['steps']} steps, val loss {fmt(ref['eval_loss'])}",
              flush=True)
        for extra in runs.values():
            if "loss" in extra:
                extra["loss"] = dict(extra["loss"], model_name_or_path=str(ref_dir))
        doremi_any = next((m for m in methods if m.startswith("doremi")), None)
        if doremi_any:
            ref_loss_cfg = write_config(tmp, "ref_loss", args, model, data, args.steps, REF_SEED, runs[doremi_any])
            for r in run_stage_job(load_config(ref_loss_cfg), "loss", progress=False):
                print(f"reference losses: {r.summary()}")
        setup_s = time.perf_counter() - t_start
        print(f"setup (data, model, reference, reference losses): {setup_s:.1f} s", flush=True)

        # DoReMi step 3 (the proxy run) in each variant, next to ODM and static uniform, per seed
        train_s = 0.0
        for seed in range(args.seeds):
            for name, extra in runs.items():
                cfg = write_config(tmp, f"{name}_{seed}", args, model, data, args.steps, seed, extra)
                t0 = time.perf_counter()
                s = quiet(train, load_config(cfg))
                train_s += time.perf_counter() - t0
                val[name].append({d: float(s["eval_loss"][f"{d}_val"]) for d in DOMAINS})
                weights[name].append({d: float(w) for d, w in s["final_weights"].items()})
                starved[name].append(longest_starvation(Path(s["output_dir"]), list(DOMAINS)))
                print(f"seed {seed} {name:>22}: val loss {fmt(val[name][-1])}, worst {max(val[name][-1].values()):.4f}, "
                      f"final weights {fmt(weights[name][-1])} ({time.perf_counter() - t0:.1f} s)", flush=True)

    worst = {m: [round(max(v.values()), 4) for v in val[m]] for m in methods}
    result: dict = {"bench": "mixing", "figure": "worst_domain_val_loss", "target_doremi": TARGET_DOREMI,
                    "seeds": args.seeds, "steps": args.steps, "update_step": args.update_step, "batch": args.batch,
                    "lr": args.lr, "rows_per_domain": args.rows, "doremi_eta": args.eta, "doremi_eps": args.eps,
                    "doremi_forms": args.forms, "odm_reward_scale": args.odm_reward_scale,
                    "reference": {"kind": "static uniform", "steps": args.ref_steps, "seed": REF_SEED},
                    "setup_s": round(setup_s, 1), "train_s": round(train_s, 1), "torch_threads": 1}
    print(f"worst-domain validation loss over {args.seeds} seeds (wins: seeds below static uniform's):")
    for m in methods:
        entry = {"worst_domain_val_loss": {"mean": round(sum(worst[m]) / len(worst[m]), 4), "per_seed": worst[m]},
                 "val_loss_mean": {d: round(sum(v[d] for v in val[m]) / len(val[m]), 4) for d in DOMAINS},
                 "final_weights_mean": {d: round(sum(w[d] for w in weights[m]) / len(weights[m]), 4) for d in DOMAINS},
                 "longest_starved_decisions": max(starved[m])}
        if m != "static":
            entry["wins"] = sum(x < b for x, b in zip(worst[m], worst["static"], strict=True))
            result[f"{m}_wins"] = entry["wins"]
        result[m] = entry
        print(f"  {m:>22}: mean {entry['worst_domain_val_loss']['mean']:.4f}  per seed {worst[m]}"
              + (f"  wins {entry['wins']}/{args.seeds}" if "wins" in entry else "")
              + f"  mean val {fmt(entry['val_loss_mean'])}  mean weights {fmt(entry['final_weights_mean'])}"
              + f"  longest starvation {entry['longest_starved_decisions']}", flush=True)
    print(f"setup {setup_s:.1f} s, training {train_s:.1f} s ({len(methods) * args.seeds} runs)", flush=True)
    common.emit(result)
    if default_study:
        common.exit_on_misses(result, MIXING)


def longest_starvation(out_dir: Path, domains: list[str]) -> int:
    """Most consecutive decisions after which some domain got no rows at all (its loss goes unmeasured)."""
    decisions = [json.loads(line) for line in (out_dir / "flexfeed_decisions.jsonl").read_text().splitlines()]
    best, run = 0, 0
    for d in decisions:
        if not d.get("decision"):
            continue
        run = run + 1 if min(d["per_domain"][x] for x in domains) == 0 else 0
        best = max(best, run)
    return best


def quiet(fn, *args):
    """Run fn with the Trainer's per-log prints kept out of the bench output."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        return fn(*args)


def fmt(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:.3f}" for k, v in d.items()) + "}"


if __name__ == "__main__":
    main()
