"""Targeted selection against random: target-domain validation loss at equal steps, over seeds.

Setup: the demo's corpus, model and store (demo/run.py, full size: five domains of 200 training rows, a
target set drawn from `arithmetic`, disjoint from training rows; a tiny Llama warmed up on the corpus; a
LoRA warm-up whose two checkpoints precondition LESS's gradients; embeddings, gradient features and a
FAISS index computed by `flexfeed stage all`), built in `--out` (reused when already there).

Then, per seed, one LoRA run per method, each `--steps` steps (batch 8, a uniform warm-up window of
`--update-step` steps, then a decision every `--update-step` steps), selection by `less`, `near`, `tsds`,
`coincide`, `icons`, `rho_loss`, `dsir` and `random` with their defaults (less and icons from the stored
checkpoint gradients, no refresh; coincide from the hidden features its first run computes; dsir from the
ngram counts its first run computes; rho_loss against a reference LoRA trained on the target set, which is
held out of training, as RHO-LOSS trains its irreducible-loss model on held-out data). Every run starts
from the same model with the same steps, batch and learning rate; the seed changes the LoRA
initialisation, the warm-up window's rows and the random draws. The measured figure is the validation
loss on `arithmetic_val` (rows of the target domain held out from training) at the end.

Printed per method: the mean, the per-seed values, `wins` (seeds whose loss is below random's at the same
seed) and the distinct rows each run trained on (mean over seeds). The last line is the JSON summary;
targets (bench/_targets.py SELECTION, for the default methods and 5 seeds): less and near beat random in
at least 4 of 5 seeds, else the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import _common as common
from _targets import SELECTION

METHODS = ("random", "less", "near", "tsds", "coincide", "icons", "rho_loss", "dsir")
TARGET_VAL = "arithmetic_val"


def reference_adapter(out: Path, steps: int) -> Path:
    """RHO-LOSS's irreducible-loss model: a LoRA trained on the target rows only (reused when already there)."""
    from demo.run import write_config
    from pipeline.config import load_config
    from pipeline.train import train

    last = out / "runs" / "rho_reference" / f"checkpoint-{steps}"
    if not (last / "adapter_config.json").exists():
        cfg = write_config(out, "rho_reference", {"train_type": "static", "dataset": "target", "max_steps": steps,
                                                  "save_steps": steps, "learning_rate": 1.0e-3})
        train(load_config(cfg))
    return last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out/selection", help="folder for corpus, models, store and runs")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--update-step", type=int, default=10)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="components, each optionally with run keys: less+select_fraction=0.2,near+allow_repeats=true")
    args = parser.parse_args()
    common.pin_threads()

    from demo.corpus import DOMAINS, build_corpus
    from demo.run import SIZES, TARGET_DOMAIN, build_model, run_stages, warmup_lora, write_config
    from pipeline.config import load_config
    from pipeline.run_files import DECISIONS_FILE
    from pipeline.train import train

    out = Path(args.out).resolve()
    size = SIZES["full"]
    t0 = time.perf_counter()
    build_corpus(out / "data", rows_per_domain=size.rows_per_domain, target_rows=size.target_rows,
                 val_rows=size.val_rows, target_domain=TARGET_DOMAIN)
    build_model(out, size)
    warmup_lora(out, size)
    run_stages(out)
    methods = args.methods.split(",")
    component_keys = {}
    if any(m.split("+")[0] == "rho_loss" for m in methods):
        ref = reference_adapter(out, size.lora_steps)
        component_keys["rho_loss"] = ["loss.signal=ref_loss", f"loss.adapter_name_or_path={ref}"]
    setup_s = time.perf_counter() - t0
    print(f"setup (corpus, model, LoRA warm-ups, stages): {setup_s:.0f} s", flush=True)

    losses: dict[str, list[float]] = {m: [] for m in methods}
    distinct: dict[str, list[int]] = {m: [] for m in methods}
    train_s = 0.0
    for seed in range(args.seeds):
        for method in methods:
            component, *keys = method.split("+")
            name = method.replace("+", "_").replace("=", "")
            run_dir = out / "runs" / f"{name}_{seed}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            cfg = load_config(write_config(out, f"{name}_{seed}", {}), [
                "train_type=select", f"component={component}", *component_keys.get(component, []), *keys,
                f"seed={seed}", f"max_steps={args.steps}",
                f"warmup_step={args.update_step}", f"update_step={args.update_step}", "save_steps=100000"])
            t1 = time.perf_counter()
            summary = train(cfg)
            train_s += time.perf_counter() - t1
            losses[method].append(round(float(summary["eval_loss"][TARGET_VAL]), 5))
            records = [json.loads(x) for x in (run_dir / DECISIONS_FILE).read_text().splitlines()]
            distinct[method].append(int(records[-1].get("rows_seen", 0)))
            print(f"seed {seed} {method}: {TARGET_VAL} loss {losses[method][-1]:.4f}, "
                  f"{distinct[method][-1]} distinct rows trained on", flush=True)

    result: dict = {"bench": "selection", "target": TARGET_VAL, "seeds": args.seeds, "steps": args.steps,
                    "update_step": args.update_step, "train_rows": len(DOMAINS) * size.rows_per_domain,
                    "setup_s": round(setup_s, 1), "train_s": round(train_s, 1)}
    for method in methods:
        vals = losses[method]
        entry = {"mean": round(sum(vals) / len(vals), 5), "per_seed": vals,
                 "distinct_rows_mean": sum(distinct[method]) / len(distinct[method])}
        if "random" in losses and method != "random":
            entry["wins"] = sum(v < r for v, r in zip(vals, losses["random"], strict=True))
            result[f"{method}_wins"] = entry["wins"]
        result[method] = entry
        print(f"{method}: mean {entry['mean']:.4f}  per seed {vals}" +
              (f"  wins over random {entry['wins']}/{args.seeds}" if "wins" in entry else ""), flush=True)
    common.emit(result)
    if methods == list(METHODS) and args.seeds == 5:  # the targets are set for the default study
        common.exit_on_misses(result, SELECTION)


if __name__ == "__main__":
    main()
