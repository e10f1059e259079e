"""GPU path check: vllm vs hf embeddings, CUDA vs CPU gradient features (and speed vs the LESS-style
baseline), faiss-gpu vs faiss-cpu, and a few DeepSpeed ZeRO-2 `select` steps on the GPU.

Every part that needs what this machine lacks (CUDA, vllm, faiss-gpu) is skipped with the reason;
the CPU halves of each comparison run everywhere. The last line is one JSON object.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RESULT: dict = {"bench": "gpu_check", "cuda": torch.cuda.is_available(),
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def say(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


def tiny_run_dir(tmp: Path) -> Path:
    from demo.tiny import SAMPLE_TEXTS, make_tiny_checkpoint
    from tests.helpers.run_fixtures import make_run_dir

    ckpt = make_tiny_checkpoint(tmp / "ckpt", SAMPLE_TEXTS, vocab_size=300)
    return make_run_dir(tmp / "run", ckpt)


def check_embeddings(cfg_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.prepared import prepare
    from stages.args import EmbedArgs
    from stages.embed import EmbedStage

    cfg = load_config(cfg_path, training=False)
    p = prepare(cfg, need_target=False)
    rows = p.train.rows(0, min(32, len(p.train)))
    hf = EmbedStage(cfg.model, EmbedArgs(backend="hf", batch_size=16)).compute(rows)
    RESULT["embed_hf_rows"] = len(hf)
    if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
        RESULT["embed_vllm"] = "skipped: needs CUDA and vllm"
        say(RESULT["embed_vllm"])
        return
    vl = EmbedStage(cfg.model, EmbedArgs(backend="vllm", batch_size=16)).compute(rows)
    cos = np.sum(hf * vl, axis=1)
    RESULT["embed_cosine_min"] = float(cos.min())
    RESULT["embed_agree"] = bool(cos.min() >= 0.99)
    say(f"vllm vs hf embeddings: min cosine {cos.min():.5f} over {len(cos)} rows")


def check_grads() -> None:
    import grads as gbench

    from stages.batching import length_sorted_batches, pad_batch
    from stages.grads import build_projector, compute_features
    from stages.grads.hooks import per_sample_grads

    rows = gbench.make_rows(256 if torch.cuda.is_available() else 16)
    model = gbench.build_model()
    batch = pad_batch(rows[:8])
    ref = per_sample_grads(model, batch)
    if not torch.cuda.is_available():
        RESULT["grads_cuda"] = "skipped: needs CUDA"
        say(f"grads on CPU: {len(ref)} LoRA weights per sample; CUDA comparison skipped")
        return
    gpu_model = gbench.build_model().cuda()
    got = per_sample_grads(gpu_model, {k: v.cuda() for k, v in batch.items()})
    err = max(float((got[n].cpu() - ref[n]).abs().max() / ref[n].abs().max().clamp(min=1e-30)) for n in ref)
    RESULT["grads_max_rel_err"] = err
    say(f"grads CUDA vs CPU: max relative error {err:.2e} (float32)")
    # throughput: this stage on the GPU against the LESS-style loop on the GPU, 256 rows, proj_dim 8192
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    projector = build_projector(gpu_model, 8192)
    for index in length_sorted_batches([len(r) for r in rows], 16):
        b = pad_batch([rows[i] for i in index])
        compute_features(gpu_model, {k: v.cuda() for k, v in b.items()}, projector)
    torch.cuda.synchronize()
    stage_s = time.perf_counter() - t0
    params = [p for p in gpu_model.parameters() if p.requires_grad]
    dense = gbench.BlockDenseProjector(sum(p.numel() for p in params), 8192)
    dense.matrix = dense.matrix.cuda()
    dense.generator = torch.Generator(device="cuda")
    sub = rows[:32]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pending = []
    for r in sub:
        ids = torch.tensor([r], device="cuda")
        gpu_model(input_ids=ids, labels=ids).loss.backward()
        pending.append(torch.cat([p.grad.reshape(-1) for p in params]))
        gpu_model.zero_grad(set_to_none=True)
        if len(pending) == 16:
            _project_cuda(dense, torch.stack(pending))
            pending = []
    torch.cuda.synchronize()
    base_s = (time.perf_counter() - t0) * len(rows) / len(sub)
    RESULT.update({"grads_stage_rows_per_s": len(rows) / stage_s, "grads_baseline_rows_per_s": len(rows) / base_s,
                   "grads_speedup": base_s / stage_s})
    say(f"grads on GPU: {len(rows) / stage_s:.0f} rows/s vs baseline {len(rows) / base_s:.0f} rows/s "
        f"(speedup {base_s / stage_s:.1f}x; baseline timed on {len(sub)} rows)")


def _project_cuda(dense, grads):
    out = torch.zeros(grads.shape[0], dense.proj_dim, dtype=dense.dtype, device=grads.device)
    grads = grads.to(dense.dtype)
    for b in range(-(-dense.proj_dim // dense.block)):
        dense.generator.manual_seed(dense.seed + 1000 * b)
        dense.matrix.bernoulli_(0.5, generator=dense.generator).mul_(2).sub_(1)
        lo, hi = b * dense.block, min((b + 1) * dense.block, dense.proj_dim)
        out[:, lo:hi] = grads @ dense.matrix[:, : hi - lo]
    return out


def check_faiss() -> None:
    import faiss

    rng = np.random.default_rng(0)
    base = rng.standard_normal((20000, 128)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    q = base[:100] + 0.01 * rng.standard_normal((100, 128)).astype(np.float32)
    cpu = faiss.IndexFlatIP(128)
    cpu.add(base)
    _, ids_cpu = cpu.search(q, 10)
    if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        RESULT["faiss_gpu"] = "skipped: faiss has no GPU support here"
        say(RESULT["faiss_gpu"])
        return
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    _, ids_gpu = gpu.search(q, 10)
    RESULT["faiss_identical"] = bool((ids_cpu == ids_gpu).all())
    say(f"faiss-gpu vs faiss-cpu flat: identical neighbours {RESULT['faiss_identical']}")


def check_deepspeed(cfg_path: Path, tmp: Path) -> None:
    from pipeline.config import load_config
    from pipeline.stage_job import run_stage_job

    run_stage_job(load_config(cfg_path, training=False), "all", progress=False)
    out = tmp / "ds"
    cmd = [sys.executable, "-m", "pipeline.cli", "train", str(cfg_path),
           f"deepspeed={ROOT / 'configs/deepspeed/ds_z2.json'}", f"output_dir={out}", "train_type=select",
           "component=loss", "warmup_step=4", "update_step=4", "refresh.max_staleness=2", "max_steps=8"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    RESULT["deepspeed_z2_ok"] = proc.returncode == 0
    RESULT["deepspeed_device"] = "cuda" if torch.cuda.is_available() else "cpu (gloo)"
    if proc.returncode != 0:
        say("deepspeed run failed:\n" + proc.stderr[-2000:])
        return
    run = json.loads((out / "flexfeed_run.json").read_text())
    say(f"DeepSpeed ZeRO-2 select on {RESULT['deepspeed_device']}: {run['steps']} steps in "
        f"{time.perf_counter() - t0:.0f} s, train loss {run['train_loss']:.3f}")


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    say(f"device: {RESULT['device']}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = tiny_run_dir(tmp)
        for name, fn in (("embeddings", lambda: check_embeddings(cfg)), ("grads", check_grads),
                         ("faiss", check_faiss), ("deepspeed", lambda: check_deepspeed(cfg, tmp))):
            t0 = time.perf_counter()
            fn()
            RESULT[f"{name}_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(RESULT))


if __name__ == "__main__":
    main()
