"""Gradient features: this stage vs LESS-style batch-size-1 baselines vs a plain batched backward.

Four paths over the same rows of a random-initialised Llama (hidden 256, 4 layers, vocab 2048,
LoRA r=8 on every linear layer but the head), each in its own process so peak RSS is its own:

- stage:          flexfeed's compute_features (one batched backward per 16 rows, per-weight hooks,
                  per-weight Kronecker projection to proj_dim), L2-normalised.
- baseline_fp32:  what LESS does with TRAK's BasicProjector, in the model's dtype (float32 here, as
                  LESS hands it): one forward+backward per row, flatten the LoRA gradient, every 16
                  rows project with a dense Rademacher matrix regenerated block by block (128 columns)
                  on every call. The strongest fair version of what a LESS user runs on this machine.
- baseline_fp16:  the same with the projection in float16: DataFlex's case (its projector casts to
                  float16), slow on a CPU.
- floor:          a plain batched forward+backward of the same per-sample losses, no per-sample work.
- stage_bf16:     the stage with `grads.compute_dtype: bfloat16` (forward and backward under bf16 autocast):
                  its time over the float32 stage's and its features' cosine to them (reported, not judged).

The baselines are slow, so they run on a subset of rows (spread over the length range, after one
untimed warm-up row) and their time is scaled per row; the JSON says so. Every path keeps the fastest
of ``--repeats`` passes (the machine is shared). Targets: bench/_targets.py (GRADS); the last line
printed is the JSON summary, and the exit status is 1 when a figure misses its target.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import exit_on_misses  # noqa: E402
from _targets import GRADS  # noqa: E402

VOCAB, HIDDEN, LAYERS, INTERMEDIATE, RANK = 2048, 256, 4, 512, 8
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LESS_BLOCK, LESS_PROJECT_EVERY = 128, 16


def build_model():
    """The bench model: random Llama with random (not zero) LoRA B, so every LoRA weight has a gradient."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=LORA_TARGETS,
                                             init_lora_weights=False))
    model.eval()
    return model


def make_rows(num_rows: int) -> list[list[int]]:
    """Random token ids, 32 to 128 tokens per row, the same in every process."""
    gen = torch.Generator().manual_seed(1234)
    lengths = torch.randint(32, 129, (num_rows,), generator=gen)
    return [torch.randint(0, VOCAB, (int(n),), generator=gen).tolist() for n in lengths]


def baseline_subset(rows: list[list[int]], count: int) -> list[int]:
    """``count`` row indices spread evenly over the length-sorted rows (representative lengths)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    step = len(order) / count
    return [order[int(i * step + step / 2)] for i in range(count)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class BlockDenseProjector:
    """TRAK-BasicProjector-style: dense Rademacher (grad_dim x proj_dim) drawn in column blocks per call."""

    def __init__(self, grad_dim: int, proj_dim: int, seed: int = 0, block: int = LESS_BLOCK,
                 dtype=torch.float16):
        self.proj_dim, self.block, self.dtype, self.seed = proj_dim, block, dtype, seed
        self.matrix = torch.empty(grad_dim, block, dtype=dtype)
        self.generator = torch.Generator()

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(grads.shape[0], self.proj_dim, dtype=self.dtype)
        grads = grads.to(self.dtype)
        for b in range(math.ceil(self.proj_dim / self.block)):
            self.generator.manual_seed(self.seed + 1000 * b)
            self.matrix.bernoulli_(0.5, generator=self.generator).mul_(2).sub_(1)
            lo, hi = b * self.block, min((b + 1) * self.block, self.proj_dim)
            out[:, lo:hi] = grads @ self.matrix[:, : hi - lo]
        return out


def run_stage(rows, args, check_rows, compute_dtype: str = "float32") -> dict:
    from stages.batching import length_sorted_batches, pad_batch
    from stages.grads import build_projector, compute_features
    from stages.grads.hooks import per_sample_grads

    model = build_model()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        projector = build_projector(model, args.proj_dim)
        feats = torch.zeros(len(rows), args.proj_dim)
        for index in length_sorted_batches([len(r) for r in rows], args.batch_size):
            batch = pad_batch([rows[i] for i in index])
            feats[index] = compute_features(model, batch, projector, compute_dtype=compute_dtype)
        times.append(time.perf_counter() - start)
    torch.save(feats, args.out + ".feats.pt")
    # exactness check rows: unprojected per-sample gradients, flattened in parameter order
    batch = pad_batch([rows[i] for i in check_rows])
    grads = per_sample_grads(model, batch)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([grads[n].reshape(len(check_rows), -1) for n in names], dim=1)
    return {"seconds": min(times), "all_s": times, "rows": len(rows), "finite": bool(torch.isfinite(feats).all())}, flat


def run_baseline(rows, args, check_rows, dtype: torch.dtype) -> dict:
    model = build_model()
    params = [p for p in model.parameters() if p.requires_grad]
    grad_dim = sum(p.numel() for p in params)
    subset = baseline_subset(rows, args.baseline_rows + 1)
    warm, subset = subset[0], subset[1:]
    projector = BlockDenseProjector(grad_dim, args.proj_dim, dtype=dtype)

    def gradient(i: int) -> torch.Tensor:
        ids = torch.tensor([rows[i]])
        model(input_ids=ids, labels=ids).loss.backward()
        vec = torch.cat([p.grad.reshape(-1) for p in params])
        model.zero_grad(set_to_none=True)
        return vec

    projector.project(gradient(warm)[None])  # untimed: first-call costs of autograd and the projector
    times, kept = [], {}
    for _ in range(args.repeats):
        start = time.perf_counter()
        pending, out = [], []
        for i in subset:
            vec = gradient(i)
            if i in check_rows:
                kept[i] = vec.clone()
            pending.append(vec)
            if len(pending) == LESS_PROJECT_EVERY:
                out.append(projector.project(torch.stack(pending)))
                pending = []
        if pending:
            out.append(projector.project(torch.stack(pending)))
        times.append(time.perf_counter() - start)
    flat = torch.stack([kept[i] for i in check_rows if i in kept])
    return {"seconds": min(times), "all_s": times, "rows": len(subset), "grad_dim": grad_dim}, flat


def run_floor(rows, args, check_rows) -> dict:
    from stages.batching import length_sorted_batches, pad_batch
    from stages.loss import per_sample_loss

    model = build_model()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for index in length_sorted_batches([len(r) for r in rows], args.batch_size):
            batch = pad_batch([rows[i] for i in index])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            per_sample_loss(logits, batch["labels"])[0].sum().backward()
            model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "all_s": times, "rows": len(rows)}, None


def child(args) -> None:
    torch.set_num_threads(1)
    rows = make_rows(args.rows)
    check_rows = baseline_subset(rows, args.baseline_rows + 1)[1: args.check_rows + 1]
    paths = {"stage": run_stage, "floor": run_floor,
             "stage_bf16": lambda *a: run_stage(*a, compute_dtype="bfloat16"),
             "baseline_fp32": lambda *a: run_baseline(*a, torch.float32),
             "baseline_fp16": lambda *a: run_baseline(*a, torch.float16)}
    result, flat = paths[args.path](rows, args, check_rows)
    result["peak_rss_mb"] = peak_rss_mb()
    if flat is not None:
        torch.save(flat, args.out + ".pt")
    Path(args.out).write_text(json.dumps(result))


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest over samples of max|got - ref| / max|ref| (float32, before projection)."""
    return max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(got, ref))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--proj-dim", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--baseline-rows", type=int, default=32, help="rows the baselines are timed on")
    parser.add_argument("--check-rows", type=int, default=8, help="rows whose raw gradients are compared")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes of every path (min is kept)")
    parser.add_argument("--path", choices=["stage", "stage_bf16", "baseline_fp32", "baseline_fp16", "floor"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        return child(args)

    torch.set_num_threads(1)
    print(f"torch threads: {torch.get_num_threads()}  (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    print(f"model: Llama hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB}, LoRA r={RANK} on {','.join(LORA_TARGETS)}")
    print(f"rows: {args.rows} of 32..128 tokens, proj_dim {args.proj_dim}, stage batch {args.batch_size}")
    results, flats, feats = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in ("floor", "stage", "stage_bf16", "baseline_fp32", "baseline_fp16"):
            out = os.path.join(tmp, path + ".json")
            cmd = [sys.executable, __file__, "--path", path, "--out", out, "--rows", str(args.rows),
                   "--proj-dim", str(args.proj_dim), "--batch-size", str(args.batch_size),
                   "--baseline-rows", str(args.baseline_rows), "--check-rows", str(args.check_rows),
                   "--repeats", str(args.repeats)]
            subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            results[path] = json.loads(Path(out).read_text())
            if os.path.exists(out + ".pt"):
                flats[path] = torch.load(out + ".pt", weights_only=True)
            if os.path.exists(out + ".feats.pt"):
                feats[path] = torch.load(out + ".feats.pt", weights_only=True)
            r = results[path]
            passes = f" (min of {', '.join(f'{t:.2f}' for t in r['all_s'])})" if "all_s" in r else ""
            print(f"{path:>8}: {r['seconds']:8.2f} s for {r['rows']:4d} rows = {1000 * r['seconds'] / r['rows']:8.2f}"
                  f" ms/row, peak RSS {r['peak_rss_mb']:7.1f} MB{passes}")
    per_row = {p: r["seconds"] / r["rows"] for p, r in results.items()}
    for path in ("baseline_fp32", "baseline_fp16"):
        print(f"{path} scaled to {args.rows} rows: {per_row[path] * args.rows:.1f} s "
              f"(timed on {results[path]['rows']} rows spread over the length range)")
    print(f"LoRA parameters: {results['baseline_fp32']['grad_dim']}")
    # grads.compute_dtype: bfloat16 against the float32 stage, same rows and projection (not judged: a CPU
    # without bf16 units gains nothing; the error is what a user trades)
    bf16_cos = torch.nn.functional.cosine_similarity(feats["stage"], feats["stage_bf16"], dim=1)
    print(f"stage under bf16 autocast: {per_row['stage_bf16'] / per_row['stage']:.3f}x the float32 stage's time, "
          f"feature cosine to float32 min {bf16_cos.min():.5f}, mean {bf16_cos.mean():.5f}")
    summary = {
        "bench": "grads",
        "speedup_vs_less_fp32": round(per_row["baseline_fp32"] / per_row["stage"], 2),
        "speedup_vs_dataflex_fp16": round(per_row["baseline_fp16"] / per_row["stage"], 2),
        "floor_ratio": round(per_row["stage"] / per_row["floor"], 3),
        "peak_rss_mb": round(results["stage"]["peak_rss_mb"], 1),
        "baseline_rss_mb": round(results["baseline_fp32"]["peak_rss_mb"], 1),
        "max_rel_err": float(f"{max_rel_err(flats['stage'], flats['baseline_fp32']):.3e}"),
        "proj_dim": args.proj_dim,
        "rows": args.rows,
        "baseline_rows_timed": results["baseline_fp32"]["rows"],
        "baseline_scaled_per_row": True,
        "repeats": args.repeats,
        "stage_s": round(results["stage"]["seconds"], 3),
        "floor_s": round(results["floor"]["seconds"], 3),
        "baseline_fp32_s_scaled": round(per_row["baseline_fp32"] * args.rows, 1),
        "baseline_fp16_s_scaled": round(per_row["baseline_fp16"] * args.rows, 1),
        "bf16_time_over_fp32": round(per_row["stage_bf16"] / per_row["stage"], 3),
        "bf16_min_cosine": round(float(bf16_cos.min()), 6),
        "bf16_mean_cosine": round(float(bf16_cos.mean()), 6),
        "torch_threads": 1,
    }
    print(json.dumps(summary), flush=True)
    exit_on_misses(summary, GRADS)

if __name__ == "__main__":
    main()
