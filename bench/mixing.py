"""Quality of dynamic mixing: `doremi` and `odm` against `static` uniform on two domains of different difficulty.

Setup (all made here, in a temporary folder):

- a tiny random Llama (hidden 64, 2 layers) and a BPE tokenizer trained on the data;
- domain `easy`: the same four sentences, repeated (each row answers "recite motto k");
- domain `hard`: integer arithmetic with fresh random operands in every row ("compute 47 * 83 + 12");
  the answer is learnable only slowly and never fully by a model this size;
- held-out `easy_val` and `hard_val` sets drawn the same way (new arithmetic operands), used as the
  run's `eval_dataset`, so each run ends with a per-domain validation loss.

Every run starts from the same random initial model, with the same steps, batch, learning rate and
seed; only the mixture differs:

1. reference: `static` uniform for `--ref-steps` steps (default: as many as the proxy; DoReMi step 1).
   The reference is this trained model, not the initial one: against the initial model every excess
   loss is clipped to 0 as soon as the proxy learns anything, and DoReMi would never move;
2. the loss stage scores every train row with the reference into `ref_loss` (DoReMi step 2);
3. `static` uniform, `doremi` (DoReMi step 3, the proxy run) and `odm`, each for `--steps` steps with a
   decision every `--update-step` steps.

DoReMi's smoothing: flexfeed's `doremi` samples each window with the current alpha (it does not
reweight a uniformly sampled batch as the paper does), and a domain that gets no rows in a window has
no measured excess (it counts as 0). With the paper's eps = 1e-3 the floor is eps/K = 0.05 % of a
window, so once alpha swings to one domain the other is not sampled for many decisions and its weight
only creeps back through the smoothing. The bench therefore runs `doremi` with eps = 0.05 (at least
2.5 % of every window per domain) and, for comparison, once more with the paper's 1e-3
(`doremi_paper_eps`), printing the longest stretch of decisions that left a domain without rows.

Printed: the proportions of each dynamic run over time (with the rows each window drew and, for
doremi, the excess losses it saw), the final weights (DoReMi's averaged alpha; ODM's last policy),
and each run's final validation loss per domain next to static uniform. The last line printed is
the JSON summary.
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
seed: 7
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


def write_config(tmp: Path, name: str, args, model: Path, data: Path, steps: int, extra: dict) -> Path:
    text = CONFIG.format(model=model, data=data, out=tmp / "runs" / name, batch=args.batch, lr=args.lr,
                         steps=steps, store=tmp / "store")
    for key, value in extra.items():
        text += f"{key}: {json.dumps(value)}\n"
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


def proportions_over_time(out_dir: Path, every: int) -> list[tuple[int, dict, dict]]:
    """(step, proportions, decision record) of every `every`-th decision and the last one."""
    decisions = [json.loads(line) for line in (out_dir / "flexfeed_decisions.jsonl").read_text().splitlines()]
    made = [(d["step"], d["proportions"], d) for d in decisions if d.get("decision")]
    return [m for i, m in enumerate(made) if i % every == 0 or i == len(made) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="train rows per domain")
    parser.add_argument("--val-rows", type=int, default=64, help="validation rows per domain")
    parser.add_argument("--ref-steps", type=int, default=None, help="reference run steps (default: --steps)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--update-step", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eta", type=float, default=1.0, help="doremi reweight_eta")
    parser.add_argument("--eps", type=float, default=0.05,
                        help="doremi reweight_eps (the floor eps/K keeps every domain sampled, see the module doc)")
    parser.add_argument("--paper-eps", type=float, default=1e-3,
                        help="also run doremi with this eps (DoReMi's own value) to show domain starvation; 0 skips")
    parser.add_argument("--odm-reward-scale", type=float, default=1.0)
    args = parser.parse_args()
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
    hard, domains = "hard", ["easy", "hard"]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = common.write_datasets(tmp / "data", datasets)
        model = common.make_model(tmp / "model", common.tokenizer_texts(datasets))
        print(f"domains: easy ({args.rows} rows, 4 distinct sentences), hard ({args.rows} rows, random arithmetic); "
              f"batch {args.batch}, lr {args.lr}, {args.steps} steps, decision every {args.update_step} steps, "
              f"full fine-tuning of a random tiny Llama", flush=True)

        # DoReMi step 1: the reference model, trained on the uniform mixture
        t0 = time.perf_counter()
        ref_cfg = write_config(tmp, "reference", args, model, data, args.ref_steps, {"train_type": "static"})
        ref = quiet(train, load_config(ref_cfg))
        ref_dir = Path(ref["output_dir"])
        print(f"reference: static uniform, {ref['steps']} steps, train loss {ref['train_loss']:.3f}, "
              f"val loss {fmt(ref['eval_loss'])} ({time.perf_counter() - t0:.1f} s)", flush=True)

        # DoReMi step 2: reference losses of every train row, into the shared store
        ref_loss_args = {"loss": {"model_name_or_path": str(ref_dir), "signal": "ref_loss", "batch_size": 32}}
        runs = {
            "static": {"train_type": "mix", "component": "static", "component_args": {"proportions": "uniform"},
                       "warmup_step": 0, "update_step": args.update_step},
            "doremi": {"train_type": "mix", "component": "doremi",
                       "component_args": {"reweight_eta": args.eta, "reweight_eps": args.eps},
                       "warmup_step": 0, "update_step": args.update_step, **ref_loss_args},
            "odm": {"train_type": "mix", "component": "odm",
                    "component_args": {"alpha": 0.9, "reward_scale": args.odm_reward_scale},
                    "warmup_step": 0, "update_step": args.update_step},
        }
        if args.paper_eps:
            runs["doremi_paper_eps"] = dict(runs["doremi"], component_args={"reweight_eta": args.eta,
                                                                            "reweight_eps": args.paper_eps})
        cfgs = {name: write_config(tmp, name, args, model, data, args.steps, extra) for name, extra in runs.items()}
        for r in run_stage_job(load_config(cfgs["doremi"]), "loss", progress=False):
            print(f"reference losses: {r.summary()}")

        # DoReMi step 3 (proxy run) next to ODM and static uniform
        summaries = {}
        for name, cfg in cfgs.items():
            t0 = time.perf_counter()
            summaries[name] = quiet(train, load_config(cfg))
            s = summaries[name]
            print(f"{name:>7}: train loss {s['train_loss']:.3f}, val loss {fmt(s['eval_loss'])}, "
                  f"final weights {fmt(s['final_weights'])} ({time.perf_counter() - t0:.1f} s)", flush=True)

        for name in [n for n in ("doremi", "doremi_paper_eps", "odm") if n in summaries]:
            print(f"{name} proportions over time (step: {' / '.join(domains)}):")
            for step, props, record in proportions_over_time(Path(summaries[name]["output_dir"]), every=3):
                seen = " / ".join(str(record["per_domain"][d]) for d in domains)
                why = ""
                if "doremi/excess" in record:  # what the update saw since the previous decision
                    why = (f"  excess {' / '.join(f'{x:.3f}' for x in record['doremi/excess'])}"
                           f" on {' / '.join(str(int(c)) for c in record['doremi/counts'])} samples")
                print(f"  {step:4d}: " + " / ".join(f"{props[d]:.3f}" for d in domains) + f"  window rows {seen}{why}")
            if name.startswith("doremi"):
                print("  averaged (output): " + " / ".join(f"{summaries[name]['final_weights'][d]:.3f}"
                                                          for d in domains))

        starved = {name: longest_starvation(Path(summaries[name]["output_dir"]), domains) for name in summaries
                   if name != "static"}
    val = {name: {d: s["eval_loss"][f"{d}_val"] for d in domains} for name, s in summaries.items()}
    final_weights = {name: summaries[name]["final_weights"] for name in ("doremi", "odm")}
    uniform = 1.0 / len(domains)
    print("longest run of decisions in a row that gave a domain no rows: "
          + ", ".join(f"{n} {v}" for n, v in starved.items()))
    print("validation loss vs static uniform (ratio < 1 is better):")
    for name in [n for n in summaries if n != "static"]:
        print(f"  {name:>7}: " + ", ".join(f"{d} {val[name][d]:.3f} ({val[name][d] / val['static'][d]:.3f}x)"
                                           for d in domains))
    above = {name: final_weights[name][hard] > uniform for name in final_weights}
    print(f"final weight on {hard!r} above uniform {uniform:.2f}: "
          + ", ".join(f"{n} {final_weights[n][hard]:.3f} {'yes' if ok else 'NO'}" for n, ok in above.items()))
    common.emit({
        "bench": "mixing",
        "hard_domain": hard,
        "final_weights": {n: {d: round(w, 4) for d, w in fw.items()} for n, fw in final_weights.items()},
        "hard_above_uniform": above,
        "doremi_paper_eps": ({"final_weights": {d: round(w, 4) for d, w in summaries["doremi_paper_eps"]
                                                ["final_weights"].items()},
                              "val_loss": {d: round(v, 4) for d, v in val["doremi_paper_eps"].items()},
                              "eps": args.paper_eps} if "doremi_paper_eps" in summaries else None),
        "longest_starved_decisions": starved,
        "val_loss": {n: {d: round(v, 4) for d, v in vals.items()} for n, vals in val.items()
                     if n != "doremi_paper_eps"},
        "val_loss_ratio_vs_static": {n: {d: round(val[n][d] / val["static"][d], 4) for d in domains}
                                     for n in ("doremi", "odm")},
        "reference": {"kind": "static uniform", "steps": args.ref_steps},
        "steps": args.steps, "update_step": args.update_step, "batch": args.batch, "lr": args.lr,
        "doremi_eta": args.eta, "doremi_eps": args.eps, "odm_reward_scale": args.odm_reward_scale,
        "seconds": round(time.perf_counter() - t_start, 1),
        "torch_threads": 1,
    })


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
