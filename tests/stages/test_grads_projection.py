"""The seeded projection: explicit-matrix equality, inner products (JL), determinism across processes."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.batching import pad_batch
from stages.grads import Projector, build_projector, compute_features
from stages.grads.hooks import per_sample_grads
from stages.grads.projection import canonical_name, split_dim
from store.errors import FlexfeedError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("shape", [(3, 7), (9, 2)])
@pytest.mark.parametrize("proj_type", ["rademacher", "gaussian"])
def test_kronecker_equals_explicit_matrix(shape, proj_type):
    proj = Projector({"w": shape}, 24, proj_type=proj_type, seed=5)
    p_a, p_c = proj.factors["w"]
    dense = torch.kron(p_a, p_c) / math.sqrt(24)  # row i*c+j, column p*k_c+q = P_a[i,p] * P_c[j,q]
    grads = torch.randn(4, *shape)
    torch.testing.assert_close(proj.project("w", grads), grads.reshape(4, -1) @ dense, rtol=1e-5, atol=1e-6)
    if proj_type == "rademacher":
        assert set(p_a.unique().tolist()) == {-1.0, 1.0}


def test_sparse_equals_explicit_matrix():
    proj = Projector({"w": (6, 5)}, 16, structure="sparse", seed=2)
    bucket, value = proj.factors["w"]
    dense = torch.zeros(30, 16)
    dense[torch.arange(30), bucket] = value
    grads = torch.randn(3, 6, 5)
    torch.testing.assert_close(proj.project("w", grads), grads.reshape(3, -1) @ dense / 4.0, rtol=1e-5, atol=1e-6)


def test_seeds_follow_canonical_names_not_wrappers():
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert canonical_name("module." + name) == "model.layers.0.self_attn.q_proj.lora_A.weight"
    a = Projector({name: (4, 8)}, 64, seed=1).factors[name]
    b = Projector({"module." + name: (4, 8)}, 64, seed=1).factors["module." + name]
    c = Projector({name: (4, 8)}, 64, seed=2).factors[name]
    other = name.replace("q_proj", "v_proj")
    d = Projector({other: (4, 8)}, 64, seed=1).factors[other]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])


def test_bad_settings_are_refused():
    assert split_dim(8192) == (64, 128) and split_dim(4096) == (64, 64)
    with pytest.raises(FlexfeedError, match="factor pair"):
        Projector({"w": (4, 4)}, 8191)
    with pytest.raises(FlexfeedError, match="proj_type"):
        Projector({"w": (4, 4)}, 64, proj_type="sign")


@pytest.fixture(scope="module")
def jl_grads():
    """Exact per-sample gradients (flattened) of 24 rows on a model with >= 100k LoRA parameters."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    config._attn_implementation = "eager"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=16, target_modules=targets, init_lora_weights=False))
    model.eval()
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 256, (int(n),), generator=gen).tolist() for n in torch.randint(8, 24, (12,), generator=gen)]
    # near-duplicates give pairs with large cosines, not only near-orthogonal ones
    rows += [r[:-2] + torch.randint(0, 256, (2,), generator=gen).tolist() for r in rows]
    grads = per_sample_grads(model, pad_batch(rows))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([grads[n].reshape(len(rows), -1) for n in names], dim=1)
    assert flat.shape[1] >= 100_000
    return {n: grads[n] for n in names}, flat


def _cosines(x: torch.Tensor) -> torch.Tensor:
    x = x / x.norm(dim=1, keepdim=True)
    iu = torch.triu_indices(len(x), len(x), 1)
    return (x @ x.T)[iu[0], iu[1]]


@pytest.mark.parametrize("structure", ["kronecker", "sparse"])
def test_projection_preserves_inner_products(jl_grads, structure):
    grads, flat = jl_grads
    exact = _cosines(flat)
    assert exact.abs().max() > 0.3  # the set has strongly aligned pairs too
    errors = {}
    for dim in (512, 4096):
        proj = Projector({n: tuple(g.shape[1:]) for n, g in grads.items()}, dim, seed=3, structure=structure)
        projected = sum(proj.project(n, g) for n, g in grads.items())
        errors[dim] = float((_cosines(projected) - exact).abs().mean())
        assert errors[dim] <= 2 / math.sqrt(dim), (dim, errors[dim])
    assert errors[4096] < errors[512]


CHILD = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from peft import PeftModel
from transformers import AutoModelForCausalLM
from stages.batching import pad_batch
from stages.grads import build_projector, compute_features
base, adapter, out = sys.argv[1:4]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager"), adapter,
                                  is_trainable=True)
rows = [[5, 9, 17, 33, 8, 2], [44, 3, 12], [7, 7, 100, 21, 60, 61, 62, 90]]
proj = build_projector(model, 512, seed=11)
np.save(out, compute_features(model, pad_batch(rows), proj).numpy())
"""


def test_features_identical_across_processes(tiny_checkpoint, tmp_path):
    from test_grads_hooks import ATTN, lora_model

    model = lora_model(tiny_checkpoint, ATTN, seed=4)
    model.save_pretrained(tmp_path / "adapter")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, str(script), str(tiny_checkpoint), str(tmp_path / "adapter"),
                    str(tmp_path / "child.npy")], check=True, env=env, cwd=REPO, capture_output=True)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # loaded exactly as the child loads it: same files, same attention kernel, one thread
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation="eager"),
                                      tmp_path / "adapter", is_trainable=True)
    rows = [[5, 9, 17, 33, 8, 2], [44, 3, 12], [7, 7, 100, 21, 60, 61, 62, 90]]
    here = compute_features(model, pad_batch(rows), build_projector(model, 512, seed=11)).numpy()
    there = np.load(tmp_path / "child.npy")
    assert np.array_equal(here, there)
    other_seed = compute_features(model, pad_batch(rows), build_projector(model, 512, seed=12)).numpy()
    assert not np.allclose(here, other_seed)
