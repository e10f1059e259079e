"""`make demo`: the whole pipeline on an embedded corpus, ending in report.html and summary.json.

Everything is made here: a multi-domain corpus from the Python installation, a tokenizer trained on
it, a tiny Llama warmed up on it, then the offline stages into a store, one training run per
strategy and one composed data plan. A second run reuses the corpus, the models and every stored
signal (and says so).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from demo.corpus import DOMAINS, build_corpus, corpus_texts
from demo.tiny import build_tiny_llama, train_tokenizer
from pipeline.config import load_config
from pipeline.plan_record import filter_pools, served_order, stage_labels
from pipeline.report import write_report
from pipeline.run_files import DECISIONS_FILE, load_run
from pipeline.stage_job import run_stage_job
from pipeline.train import train

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "demo" / "base.yaml"
MODEL_CONFIG = ROOT / "configs" / "model" / "tiny_llama.json"
TARGET_DOMAIN = "arithmetic"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class DemoSize:
    rows_per_domain: int
    target_rows: int
    val_rows: int
    vocab_size: int
    base_steps: int
    lora_steps: int
    train_steps: int
    update_step: int


SIZES = {
    "full": DemoSize(rows_per_domain=200, target_rows=40, val_rows=20, vocab_size=1024, base_steps=150,
                     lora_steps=40, train_steps=60, update_step=10),
    "small": DemoSize(rows_per_domain=48, target_rows=16, val_rows=8, vocab_size=512, base_steps=40,
                      lora_steps=40, train_steps=30, update_step=10),
}

# The composed run's data plan (docs/plan.md): the loss filter keeps half the rows by the live loss; odm
# draws each window from that pool; saw orders each window's rows by the reference model's stored loss
# (fixed during the run, so read once: `every` beyond any demo run; every window is still ordered by it);
# the loss weighter reweights each batch.
PLAN = ("[{family: select, component: loss, mode: filter, keep_ratio: 0.5},"
        " {family: mix, component: odm},"
        " {family: reorder, component: saw, every: 1000000, component_args: {score: ref_loss}},"
        " {family: weight, component: loss, component_args: {strategy: linupper}}]")

# (run name, key=value overrides): one training run per strategy, then one composed plan
RUNS = [
    ("static", ["train_type=static"]),
    ("select_random", ["train_type=select", "component=random"]),
    # LESS's recipe: the top 5% of the pool chosen once, then served in passes (each row once per pass)
    ("select_less", ["train_type=select", "component=less", "refresh.max_staleness=25", "select_fraction=0.05"]),
    ("select_near", ["train_type=select", "component=near", "select_fraction=0.05"]),
    ("mix_doremi", ["train_type=mix", "component=doremi", "component_args.reweight_eta=1.0"]),
    ("mix_odm", ["train_type=mix", "component=odm"]),
    ("weight_loss", ["train_type=weight", "component=loss", "component_args.strategy=linupper"]),
    ("plan", ["train_type=plan", f"plan={PLAN}"]),
]


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def write_config(out: Path, name: str, overrides: dict) -> Path:
    """The base YAML with absolute paths and this run's keys, saved where a user can rerun it."""
    cfg = yaml.safe_load(BASE_CONFIG.read_text())

    def moved(path: str) -> str:
        return str(out / Path(path).relative_to("demo_out"))

    for key in ("model_name_or_path", "dataset_dir", "store"):
        cfg[key] = moved(cfg[key])
    cfg["output_dir"] = str(out / "runs" / name)
    cfg["grads"]["checkpoints"] = [moved(c) for c in cfg["grads"]["checkpoints"]]
    cfg.update(overrides)
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def build_model(out: Path, size: DemoSize) -> None:
    """Tokenizer trained on the corpus, tiny Llama from configs/model, warmed up on plain text."""
    if (out / "model" / "model.safetensors").exists():
        say("model: reusing demo_out/model")
        return
    t0 = time.perf_counter()
    init = out / "model_init"
    tok = train_tokenizer(corpus_texts(out / "data"), vocab_size=size.vocab_size)
    model = build_tiny_llama(tok, seed=0, **json.loads(MODEL_CONFIG.read_text()))
    model.save_pretrained(init)
    tok.save_pretrained(init)
    cfg = write_config(out, "warmup_base", {
        "model_name_or_path": str(init), "finetuning_type": "full", "stage": "pt",
        "dataset": ",".join(f"{d}_pt" for d in DOMAINS), "eval_dataset": "", "val_dataset": "",
        "max_steps": size.base_steps, "learning_rate": 3.0e-3, "per_device_train_batch_size": 16,
        "lr_scheduler_type": "cosine"})
    train(load_config(cfg, [f"dataset_dir={out / 'data'}"]))
    (out / "model").mkdir(exist_ok=True)
    for f in MODEL_FILES:
        src = out / "runs" / "warmup_base" / f
        if src.exists():
            shutil.copy2(src, out / "model" / f)
    shutil.rmtree(init)
    say(f"model: built and warmed up ({size.base_steps} steps) in {time.perf_counter() - t0:.0f} s")


def warmup_lora(out: Path, size: DemoSize) -> None:
    """LESS's warm-up: a short LoRA run whose checkpoints (with Adam state) precondition gradients."""
    last = out / "runs" / "warmup_lora" / f"checkpoint-{size.lora_steps}"
    if (last / "optimizer.pt").exists():
        say("LoRA warm-up: reusing its checkpoints")
        return
    cfg = write_config(out, "warmup_lora", {"train_type": "static", "max_steps": size.lora_steps,
                                            "save_steps": size.lora_steps // 2, "learning_rate": 1.0e-3})
    train(load_config(cfg))
    say(f"LoRA warm-up: checkpoints at steps {size.lora_steps // 2} and {size.lora_steps}")


def run_stages(out: Path) -> int:
    """`flexfeed stage all` on the demo's config; returns how many shards were recomputed."""
    cfg = load_config(write_config(out, "stages", {}))
    t0 = time.perf_counter()
    results = run_stage_job(cfg, "all")
    recomputed = sum(len(r.computed) for r in results)
    for r in results:
        say(f"stage {r.summary()}")
    if recomputed == 0:
        say("stages: every signal was already in the store; nothing was recomputed")
    else:
        say(f"stages: recomputed {recomputed} shards in {time.perf_counter() - t0:.0f} s")
    return recomputed


def train_runs(out: Path, size: DemoSize) -> dict:
    """One training run per strategy in RUNS, each from a fresh output folder; their summaries by name."""
    summaries = {}
    for name, overrides in RUNS:
        run_dir = out / "runs" / name
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a demo run always starts fresh (no accidental resume)
        common = [f"max_steps={size.train_steps}", f"warmup_step={size.update_step}",
                  f"update_step={size.update_step}"]
        cfg = load_config(write_config(out, name, {}), [*overrides, *common])
        t0 = time.perf_counter()
        summaries[name] = train(cfg)
        say(f"run {name}: {summaries[name]['steps']} steps in {time.perf_counter() - t0:.0f} s")
    return summaries


def target_share(run_dir: Path, domain: str = TARGET_DOMAIN) -> float:
    """Share of the target domain among the rows chosen at decisions."""
    chosen = total = 0
    for line in (run_dir / DECISIONS_FILE).read_text().splitlines():
        d = json.loads(line)
        if d.get("decision"):
            chosen += d["per_domain"].get(domain, 0)
            total += sum(d["per_domain"].values())
    return chosen / max(1, total)


def plan_figures(run_dir: Path, num_rows: int) -> dict:
    """What the composed run's stages did: the filter's pool, the mixer's weights, the order, the weights."""
    run = load_run(run_dir)
    pools = [p for ps in filter_pools(run).values() for p in ps]
    order = served_order(run)
    windows = _order_by_window(run, order)
    weights = np.concatenate([np.asarray(r["weights"], dtype=float) for r in run.weights])
    return {
        "stages": " -> ".join(stage_labels(run)),
        "train_rows": num_rows,
        "filter_pool": [p.rows for p in pools],
        "last_pool_per_domain": pools[-1].per_domain if pools else {},
        "final_weights": run.run.get("final_weights"),
        # median score (the stored ref_loss) of the served rows at each window's first and last step
        "order_first_step_median": round(float(np.mean([q[0, 2] for q in windows])), 4),
        "order_last_step_median": round(float(np.mean([q[-1, 2] for q in windows])), 4),
        "order_windows": len(windows),
        "weight_mean": round(float(weights.mean()), 4),
        "weight_min": round(float(weights.min()), 4),
        "weight_max": round(float(weights.max()), 4),
    }


def _order_by_window(run, order) -> list[np.ndarray]:
    """The order's per-step quantiles cut at the decision steps (one array per window)."""
    if order is None:
        return []
    starts = sorted({int(d["step"]) for d in run.decisions if d.get("decision")})
    cuts = np.searchsorted(order.steps, starts[1:])
    return [q for q in np.split(order.quantiles, cuts) if len(q)]


def summarise(out: Path, summaries: dict, recomputed: int, num_rows: int) -> dict:
    runs = out / "runs"
    summary = {
        "target_domain": TARGET_DOMAIN,
        "target_share": {k: round(target_share(runs / f"select_{k}"), 4) for k in ("random", "less", "near")},
        "final_weights": {k: summaries[f"mix_{k}"].get("final_weights") for k in ("doremi", "odm")},
        "val_loss": {name: s.get("eval_loss") for name, s in summaries.items()},
        "recomputed_shards": recomputed,
        "plan": plan_figures(runs / "plan", num_rows),
    }
    static = summary["val_loss"]["static"] or {}
    summary["val_loss_vs_static"] = {
        name: {d: round(v - static.get(d, float("nan")), 4) for d, v in (losses or {}).items()}
        for name, losses in summary["val_loss"].items() if name != "static"}
    summary["findings"] = findings(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def findings(summary: dict) -> list[str]:
    """The demo's results in sentences (the top of report.html)."""
    share = summary["target_share"]
    dom = summary["target_domain"]
    out = [f"Target domain {dom}: {share['random']:.0%} of the rows chosen under random selection, "
           f"{share['less']:.0%} under less and {share['near']:.0%} under near."]
    for name, w in summary["final_weights"].items():
        if w:
            out.append(f"{name} ended with domain weights " + ", ".join(f"{d} {v:.2f}" for d, v in w.items()) + ".")
    diffs = summary.get("val_loss_vs_static", {})
    val = f"{dom}_val"
    if diffs:
        out.append(f"Validation loss on {dom} against static: " + ", ".join(
            f"{run} {d[val]:+.3f}" for run, d in diffs.items() if val in d and run != "plan") + " (negative is better).")
    if summary.get("plan"):
        out.append(plan_finding(summary["plan"], diffs.get("plan", {}).get(val), dom))
    out.append("Offline stages recomputed " + (f"{summary['recomputed_shards']} shards." if summary["recomputed_shards"]
                                                 else "nothing: every signal came from the store."))
    return out


def plan_finding(plan: dict, val_diff: float | None, dom: str) -> str:
    """The composed run in one sentence: what each of its stages did."""
    pools = "/".join(map(str, sorted(set(plan["filter_pool"]))))
    weights = ", ".join(f"{d} {v:.2f}" for d, v in (plan.get("final_weights") or {}).items())
    val = f"; validation loss on {dom} {val_diff:+.3f} against static" if val_diff is not None else ""
    return (f"Composed plan ({plan['stages']}): the loss filter kept {pools} of {plan['train_rows']} rows at each "
            f"of its {len(plan['filter_pool'])} firings; odm ended with {weights}; saw served each of "
            f"{plan['order_windows']} windows from a median ref_loss of {plan['order_first_step_median']:.2f} at its "
            f"first step to {plan['order_last_step_median']:.2f} at its last; sample weights averaged "
            f"{plan['weight_mean']:.2f} (range {plan['weight_min']:.2f} to {plan['weight_max']:.2f}){val}.")


def run_demo(out_dir: str | Path = "demo_out", size: str = "full") -> dict:
    """Build, compute, train, report; returns summary.json's content."""
    out = Path(out_dir).resolve()
    sz = SIZES[size]
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    build_corpus(out / "data", rows_per_domain=sz.rows_per_domain, target_rows=sz.target_rows,
                 val_rows=sz.val_rows, target_domain=TARGET_DOMAIN)
    say(f"corpus: {len(DOMAINS)} domains x {sz.rows_per_domain} rows, target set from {TARGET_DOMAIN}")
    build_model(out, sz)
    warmup_lora(out, sz)
    recomputed = run_stages(out)
    summaries = train_runs(out, sz)
    summary = summarise(out, summaries, recomputed, num_rows=len(DOMAINS) * sz.rows_per_domain)
    html = write_report([str(out / "runs" / name) for name, _ in RUNS], out_dir=str(out), stores=[str(out / "store")])
    share = summary["target_share"]
    say(f"target domain {TARGET_DOMAIN}: share {share['random']:.0%} under random selection, "
        f"{share['less']:.0%} under less, {share['near']:.0%} under near")
    for k, w in summary["final_weights"].items():
        say(f"{k} final domain weights: " + ", ".join(f"{d} {v:.2f}" for d, v in (w or {}).items()))
    say(next(f for f in summary["findings"] if f.startswith("Composed plan")))
    say(f"report: {html}  ({time.perf_counter() - t0:.0f} s in all)")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--out", default="demo_out", help="Folder for everything the demo makes.")
    parser.add_argument("--size", default="full", choices=sorted(SIZES), help="Corpus and run sizes.")
    args = parser.parse_args()
    run_demo(args.out, args.size)


if __name__ == "__main__":
    main()
