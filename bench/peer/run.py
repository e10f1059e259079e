"""flexfeed against DataFlex 1.1.0 on DataFlex's own `less` example: the same config, model, data and steps.

Not part of `make bench` (it needs DataFlex's own venv): `make bench-peer` installs DataFlex 1.1.0 and
LLaMA-Factory 0.9.5 once into bench_out/peer/venv (bench/peer/install.sh), then runs this script with
flexfeed's venv.

Setup (untimed, in bench_out/peer/work): one tiny random Llama and its tokenizer (bench/_common.make_model,
with the llama3 template's special tokens in its vocabulary, so neither side resizes embeddings), two
train domains (`wiki`, `chat`) and a target set (`target`), and a folder laid out as DataFlex expects
to be run from: `data/` (dataset_info.json), `examples/train_lora/selectors/less.yaml` (DataFlex's
example as shipped in tests/pipeline/data/dataflex_examples, only `model_name_or_path` changed) and
`src/dataflex/configs/components.yaml` (DataFlex's packaged components.yaml, its model paths changed),
with DataFlex's outputs in `../dataflex_saves` as its examples write them.

Timed, each as a subprocess from that folder with OMP_NUM_THREADS=1 and CUDA_VISIBLE_DEVICES="" (wall
clock, process start and model load included, the same for both sides):

- `dataflex-cli train less.yaml` and `flexfeed train less.yaml` with the same command-line overrides
  (the train and target sets, 12 steps: warmup 4, a decision every 4 steps, 2 decisions; batch,
  cutoff). `less` with `gradient_type: adam` and proj_dim 4096 from the components file: at each
  decision both recompute every train row's Adam-preconditioned gradient and every target row's SGD
  gradient with the live model and optimizer (DataFlex: one row at a time, TRAK's projector;
  flexfeed: batched, its factored projection, every shard refreshed);
- both with `train_type=static` (DataFlex's plain LLaMA-Factory trainer), 12 steps;
- flexfeed with the offline store warm and no refresh: the gradient features computed beforehand
  (untimed, `flexfeed stage all`) at a checkpoint of a short warm-up run, as LESS defines them, and
  `refresh.enabled=false`.

Each side's selected rows per domain are read from its own records (DataFlex's step_N.json selections,
flexfeed's decisions file). Targets: speedup (DataFlex less / flexfeed less) >= 20, speedup_warm
(DataFlex less / flexfeed warm) >= 100; the bench exits 1 naming a missed one. It also times a process that
only starts Python and imports flexfeed's training modules (`speedup_ceiling`: DataFlex less over that floor,
the most any flexfeed process could reach at this size). The last line printed is
the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as common  # noqa: E402  (pins threads through the environment before torch)

ROOT = common.ROOT
EXAMPLE = ROOT / "tests" / "pipeline" / "data" / "dataflex_examples" / "selectors_less.yaml"
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"]
SPEEDUP_TARGET = 20.0
SPEEDUP_WARM_TARGET = 100.0


def chat_rows(num: int, seed: int) -> list[dict]:
    """Question-and-answer rows about pairs of words (the `chat` domain and the target set)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        a, b = rng.sample(common.WORDS, 2)
        words = " ".join(rng.choice(common.WORDS) for _ in range(rng.randint(50, 70)))
        rows.append({"instruction": f"how do a {a} and a {b} differ?", "input": "", "output": f"a {a} is not a {b}; {words}"})
    return rows


def domain_rows(args) -> dict[str, list[dict]]:
    """Two train domains of different text and a target set that resembles one of them."""
    return {"wiki": common.sentence_rows(args.rows_per_domain, seed=1, min_words=30, max_words=50),
            "chat": chat_rows(args.rows_per_domain, seed=2),
            "target": chat_rows(args.target_rows, seed=3)}


def build_model(out: Path, datasets: dict[str, list[dict]], hidden: int, layers: int) -> Path:
    """The tiny Llama, its tokenizer given the llama3 template's special tokens (the example's `template`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common.make_model(out, common.tokenizer_texts(datasets), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers)
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_special_tokens({"additional_special_tokens": LLAMA3_TOKENS})
    model = AutoModelForCausalLM.from_pretrained(out)
    model.resize_token_embeddings(len(tok))
    model.config.vocab_size = len(tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def layout(work: Path, model: Path, datasets: dict[str, list[dict]], components_src: Path) -> Path:
    """The folder DataFlex's README runs its examples from; returns it (the working folder of every run)."""
    import yaml

    home = work / "DataFlex"
    common.write_datasets(home / "data", datasets)
    example = home / "examples" / "train_lora" / "selectors" / "less.yaml"
    example.parent.mkdir(parents=True, exist_ok=True)
    text = re.sub(r"^model_name_or_path:.*$", f"model_name_or_path: {model}", EXAMPLE.read_text(), flags=re.M)
    example.write_text(text)
    components = yaml.safe_load(components_src.read_text())
    components["mixers"]["doremi"]["params"]["reference_model_path"] = str(model)
    components["selectors"]["nice"]["params"]["reward_backend_params"]["local_vllm"]["hf_model_name_or_path"] = str(model)
    target = home / "src" / "dataflex" / "configs" / "components.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(components, sort_keys=False))
    return home


def overrides(args, name: str, train_type: str) -> list[str]:
    """The command-line overrides both sides run with (DataFlex's OmegaConf and flexfeed's `key=value`)."""
    out = ["dataset=wiki,chat", "eval_dataset=target", f"cutoff_len={args.cutoff_len}",
           f"per_device_train_batch_size={args.batch}", "warmup_step=4", "update_step=4", "update_times=2",
           f"output_dir=../dataflex_saves/runs/{name}",
           # the example's bf16 on a CPU: transformers refuses it without use_cpu (flexfeed would set it itself)
           "use_cpu=true"]
    if train_type == "static":  # DataFlex's static trainer is LLaMA-Factory's: epochs unless max_steps
        out += ["train_type=static", f"max_steps={args.steps}"]
    return out


def timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> float:
    """Wall seconds of one subprocess (start, load, train, save); its output goes to `log`."""
    t0 = time.perf_counter()
    with open(log, "w") as sink:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        sys.exit(f"{' '.join(cmd[:3])} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    return seconds


def train_runtime(log: Path) -> float | None:
    """The Trainer's own `train_runtime` in a run's log (the wall time less process start, load and save)."""
    found = re.findall(r"'train_runtime': '?([0-9.]+)", log.read_text(errors="replace"))
    return float(found[-1]) if found else None


def per_domain(indices: list[int], sizes: list[tuple[str, int]]) -> dict[str, int]:
    """Rows per domain of indices into the concatenation of the domains in order."""
    counts, start = {}, 0
    for name, size in sizes:
        counts[name] = sum(start <= i < start + size for i in indices)
        start += size
    return counts


def dataflex_selected(saves: Path, sizes) -> list[dict[str, int]]:
    """Per decision, DataFlex's selected rows per domain (its cached selections, step_N.json)."""
    files = sorted((saves / "less_output").glob("step_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    return [per_domain(json.loads(p.read_text())["indices"], sizes) for p in files]


def flexfeed_decisions(out_dir: Path) -> list[dict]:
    """flexfeed's decision records (its decisions file)."""
    records = [json.loads(line) for line in (out_dir / "flexfeed_decisions.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("decision")]


def selected(decisions: list[dict]) -> list[dict[str, int]]:
    return [r["info"]["selected_per_domain"] for r in decisions]


def refreshed(decisions: list[dict]) -> list[dict[str, float]]:
    """Per decision, the seconds of each signal's refresh (every shard stale and recomputed, or none)."""
    return [{k: v["seconds"] for k, v in (r.get("refresh") or {}).items() if v["stale"] and v["recomputed_here"]}
            for r in decisions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=ROOT / "bench_out" / "peer" / "venv", help="DataFlex's venv")
    parser.add_argument("--stubs", type=Path, default=ROOT / "bench_out" / "peer" / "stubs",
                        help="folder with the torchaudio stand-in, put on DataFlex's PYTHONPATH")
    parser.add_argument("--work", type=Path, default=ROOT / "bench_out" / "peer" / "work")
    parser.add_argument("--rows-per-domain", type=int, default=128, help="train rows per domain (two domains)")
    parser.add_argument("--target-rows", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size, both sides")
    parser.add_argument("--cutoff-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="warmup 4 + 2 decisions x 4 steps")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    threads = common.pin_threads()
    dataflex_cli = args.venv / "bin" / "dataflex-cli"
    if not dataflex_cli.exists():
        sys.exit(f"no DataFlex venv at {args.venv}: run `make bench-peer` (it installs it with bench/peer/install.sh)")
    components_src = next((args.venv / "lib").glob("python3*/site-packages/dataflex/configs/components.yaml"))

    shutil.rmtree(args.work, ignore_errors=True)
    datasets = domain_rows(args)
    model = build_model(args.work / "model", datasets, args.hidden, args.layers)
    home = layout(args.work, model, datasets, components_src)
    saves = args.work / "dataflex_saves"
    sizes = [("wiki", args.rows_per_domain), ("chat", args.rows_per_domain)]
    example = "examples/train_lora/selectors/less.yaml"
    base_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    dataflex_env = {**base_env, "PYTHONPATH": str(args.stubs), "DISABLE_VERSION_CHECK": "1"}
    flexfeed_env = {**base_env, "PYTHONPATH": str(ROOT)}
    flexfeed = [sys.executable, "-m", "pipeline.cli"]
    logs = args.work / "logs"
    logs.mkdir()
    print(f"model: tiny Llama hidden {args.hidden}, {args.layers} layers; train rows 2 x {args.rows_per_domain}, "
          f"target rows {args.target_rows}; {args.steps} steps of batch {args.batch}, decisions at steps 4 and 8; "
          f"DataFlex's less example (proj_dim 4096, adam), working folder {home}", flush=True)

    def dataflex(name: str, train_type: str) -> float:
        shutil.rmtree(saves, ignore_errors=True)  # DataFlex reuses any cached selection it finds there
        seconds = timed([str(dataflex_cli), "train", example, *overrides(args, name, train_type)], home,
                        dataflex_env, logs / f"{name}.log")
        print(f"{name}: {seconds:.1f} s", flush=True)
        return seconds

    def flexfeed_train(name: str, train_type: str, extra: list[str]) -> float:
        store = args.work / "stores" / name
        seconds = timed([*flexfeed, "train", example, *overrides(args, name, train_type), f"store={store}", *extra],
                        home, flexfeed_env, logs / f"{name}.log")
        print(f"{name}: {seconds:.1f} s", flush=True)
        return seconds

    times = {"dataflex_static": dataflex("dataflex_static", "static"),
             "flexfeed_static": flexfeed_train("flexfeed_static", "static", [])}
    times["dataflex_less"] = dataflex("dataflex_less", "less")
    dataflex_rows = dataflex_selected(saves, sizes)
    times["flexfeed_less"] = flexfeed_train("flexfeed_less", "less", [])
    less_decisions = flexfeed_decisions(saves / "runs" / "flexfeed_less")

    # warm store, untimed: a warm-up run saves a checkpoint with its Adam state, the grads stage computes
    # the features there (LESS's offline definition); then the timed run reads them, refreshing nothing
    warm_store = args.work / "stores" / "flexfeed_less_warm"
    ckpt_run = saves / "runs" / "warmup"
    timed([*flexfeed, "train", example, *overrides(args, "warmup", "static"), "max_steps=4", "save_steps=4",
           f"store={warm_store}"], home, flexfeed_env, logs / "warmup.log")
    warm = [f"grads.checkpoints=[{ckpt_run / 'checkpoint-4'}]", "refresh.enabled=false"]
    timed([*flexfeed, "stage", "all", example, *overrides(args, "flexfeed_less_warm", "less"), f"store={warm_store}",
           *warm], home, flexfeed_env, logs / "stage_all.log")
    times["flexfeed_less_warm"] = flexfeed_train("flexfeed_less_warm", "less", warm)
    warm_decisions = flexfeed_decisions(saves / "runs" / "flexfeed_less_warm")
    flexfeed_rows, warm_rows = selected(less_decisions), selected(warm_decisions)

    # the floor of any `flexfeed train` process: start Python and import what a LoRA run imports, nothing else
    floor_s = timed([sys.executable, "-c", "import pipeline.train, transformers.trainer"], home, flexfeed_env,
                    logs / "import_floor.log")
    print(f"flexfeed import floor: {floor_s:.1f} s", flush=True)

    speedup = times["dataflex_less"] / times["flexfeed_less"]
    static_speedup = times["dataflex_static"] / times["flexfeed_static"]
    speedup_warm = times["dataflex_less"] / times["flexfeed_less_warm"]
    print(f"less: DataFlex {times['dataflex_less']:.1f} s, flexfeed {times['flexfeed_less']:.1f} s (every row "
          f"refreshed at each decision) = {speedup:.1f}x (target >= {SPEEDUP_TARGET:g}); flexfeed warm store, "
          f"no refresh {times['flexfeed_less_warm']:.1f} s = {speedup_warm:.1f}x (target >= {SPEEDUP_WARM_TARGET:g})")
    print(f"no flexfeed process can beat {times['dataflex_less'] / floor_s:.1f}x: starting Python and importing "
          f"its training modules alone takes {floor_s:.1f} s")
    print(f"static: DataFlex {times['dataflex_static']:.1f} s, flexfeed {times['flexfeed_static']:.1f} s = "
          f"{static_speedup:.2f}x")
    print(f"selected rows per domain at each decision: DataFlex {dataflex_rows}, flexfeed {flexfeed_rows}, "
          f"flexfeed warm {warm_rows}")
    missed = []
    if [set(r) for r in refreshed(less_decisions)] != [{"grads/train", "grads_sgd/target"}] * 2:
        missed.append(f"flexfeed did not refresh every gradient at each decision: {refreshed(less_decisions)}")
    if any(refreshed(warm_decisions)):
        missed.append(f"the warm run refreshed: {refreshed(warm_decisions)}")
    if speedup < SPEEDUP_TARGET:
        missed.append(f"speedup {speedup:.1f} < {SPEEDUP_TARGET:g}")
    if speedup_warm < SPEEDUP_WARM_TARGET:
        missed.append(f"speedup_warm {speedup_warm:.1f} < {SPEEDUP_WARM_TARGET:g}")
    common.emit({
        "bench": "peer_dataflex",
        "dataflex_version": "1.1.0",
        **{f"{k}_s": round(v, 2) for k, v in times.items()},
        "train_runtime_s": {k: train_runtime(logs / f"{k}.log") for k in times},
        "speedup": round(speedup, 2),
        "static_speedup": round(static_speedup, 3),
        "speedup_warm": round(speedup_warm, 2),
        "flexfeed_import_floor_s": round(floor_s, 2),
        "speedup_ceiling": round(times["dataflex_less"] / floor_s, 1),
        "dataflex_selected_per_domain": dataflex_rows,
        "flexfeed_selected_per_domain": flexfeed_rows,
        "flexfeed_warm_selected_per_domain": warm_rows,
        "flexfeed_decision_s": [r["seconds"] for r in less_decisions],
        "flexfeed_refresh_s": refreshed(less_decisions),
        "flexfeed_warm_decision_s": [r["seconds"] for r in warm_decisions],
        "train_rows": 2 * args.rows_per_domain,
        "target_rows": args.target_rows,
        "proj_dim": 4096,
        "steps": args.steps,
        "batch": args.batch,
        "torch_threads": threads,
        "missed": missed,
    })
    if missed:
        print("missed: " + "; ".join(missed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
