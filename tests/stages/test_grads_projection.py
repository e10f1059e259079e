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


def _explicit(proj: Projector, name: str) -> torch.Tensor:
    """The (weight size, proj_dim) matrix of one weight's kronecker projection, built from its sides' matrices."""
    side_a, side_c = proj.factors[name]
    dense = torch.kron(side_a.dense(), side_c.dense())  # row i*c+j, column p*k_c+q = P_a[i,p] * P_c[j,q]
    return torch.nn.functional.pad(dense, (0, proj.proj_dim - dense.shape[1]))


# (3, 7), (9, 2): both sides fit (exact); (5, 40): the wide side is hashed 40 -> 4 and 24 is not a
# multiple of 5; (12, 20), (20, 12): wide on both sides, LoGra's balanced dense factors 4 x 6
@pytest.mark.parametrize("shape", [(3, 7), (9, 2), (5, 40), (12, 20), (20, 12), (6,)])
@pytest.mark.parametrize("proj_type", ["rademacher", "gaussian"])
def test_kronecker_equals_explicit_matrix(shape, proj_type):
    proj = Projector({"w": shape}, 24, proj_type=proj_type, seed=5)
    grads = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    want = grads.reshape(4, -1) @ _explicit(proj, "w")  # entries O(1): float32 round-off of 240 terms ~1e-6
    torch.testing.assert_close(proj.project("w", grads), want, rtol=1e-5, atol=1e-5)
    side_a, side_c = proj.factors["w"]
    if shape in [(12, 20), (20, 12)]:
        assert {side_a.width, side_c.width} == {4, 6} and side_a.matrix is not None
        if proj_type == "rademacher":
            assert set(side_a.matrix.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("shape", [(3, 7), (9, 2), (8, 120), (120, 8), (6,)])
def test_a_weight_that_fits_keeps_its_inner_products_exactly(shape):
    """Narrow side whole, wide side injective: the weight's map is an isometry (Gram = identity)."""
    proj = Projector({"w": shape}, 1024, proj_type="gaussian", seed=9)
    assert all(side.exact for side in proj.factors["w"])
    matrix = _explicit(proj, "w")
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(matrix.shape[0]))
    grads = torch.randn(5, *shape)
    flat, projected = grads.reshape(5, -1), proj.project("w", grads)
    torch.testing.assert_close(projected @ projected.T, flat @ flat.T, rtol=1e-5, atol=1e-4)


def test_the_narrow_side_stays_exact_when_the_wide_side_is_sketched():
    """A LoRA factor 8 x 512 at proj_dim 1024: all 8 rows kept, the 512 columns hashed to 128, 4 per column."""
    proj = Projector({"w": (8, 512)}, 1024, seed=1)
    rows, cols = proj.factors["w"]
    assert (rows.size, rows.width, rows.exact) == (8, 8, True)
    assert (cols.size, cols.width, cols.exact) == (512, 128, False)
    assert torch.equal(torch.bincount(cols.bucket, minlength=128), torch.full((128,), 4))
    torch.testing.assert_close(rows.dense() @ rows.dense().T, torch.eye(8))


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
    other = name.replace("q_proj", "v_proj")
    for shape in [(4, 8), (16, 16)]:  # hashed sides; dense balanced factors
        a = _explicit(Projector({name: shape}, 64, seed=1), name)
        b = _explicit(Projector({"module." + name: shape}, 64, seed=1), "module." + name)
        c = _explicit(Projector({name: shape}, 64, seed=2), name)
        d = _explicit(Projector({other: shape}, 64, seed=1), other)
        assert torch.equal(a, b)
        assert not torch.equal(a, c) and not torch.equal(a, d)


def test_cross_terms_between_weights_have_a_dense_projections_variance():
    """Two weights that fit: the only error left is the cross term, mean 0, variance |g1|^2 |g2|^2 / proj_dim.

    That is what a dense Gaussian projection gives the same cross term (E[(g1^T G^T G g2)^2] with g1, g2
    on disjoint coordinates); here each weight's map M has E[M M^T] = I / proj_dim per unit norm, so
    E[<M1 g1, M2 g2>^2] = |g1|^2 |M2 g2|^2 / proj_dim = |g1|^2 |g2|^2 / proj_dim exactly.
    """
    gen = torch.Generator().manual_seed(0)
    g1, g2 = torch.randn(1, 8, 16, generator=gen), torch.randn(1, 16, 8, generator=gen)
    samples = []
    for seed in range(400):
        proj = Projector({"a": (8, 16), "b": (16, 8)}, 256, seed=seed)
        samples.append(float(proj.project("a", g1) @ proj.project("b", g2).T))
    samples = torch.tensor(samples, dtype=torch.float64)
    variance = float(g1.norm() ** 2 * g2.norm() ** 2 / 256)
    # 400 draws: the sample mean's sd is sqrt(variance / 400), the sample variance's about 7% of it
    assert abs(float(samples.mean())) < 4 * math.sqrt(variance / 400)
    assert 0.7 < float((samples**2).mean()) / variance < 1.3


def test_the_projection_version_enters_the_signal_key(tiny_checkpoint):
    """Features of the balanced kronecker-1 split are another signal: the structure's version is keyed."""
    from stages.args import GradsArgs, ModelArgs
    from stages.grads import GradsStage

    margs = ModelArgs(model_name_or_path=str(tiny_checkpoint), lora_rank=4, lora_target="q_proj,v_proj")
    spec = GradsStage(margs, GradsArgs(proj_dim=64, grad_type="sgd")).signal().spec
    assert spec["proj_version"] == "kronecker-2" and spec["proj_structure"] == "kronecker"
    assert Projector({"w": (4, 4)}, 64).describe().items() <= spec.items()
    sparse = GradsStage(margs, GradsArgs(proj_dim=64, grad_type="sgd", proj_structure="sparse")).signal().spec
    assert sparse["proj_version"] == "sparse-1"


def test_bad_settings_are_refused():
    assert split_dim(8192) == (64, 128) and split_dim(4096) == (64, 64)
    Projector({"w": (4, 4)}, 8191)  # a thin weight needs no factor pair
    with pytest.raises(FlexfeedError, match="factor pair"):
        Projector({"w": (100, 100)}, 8191)
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


def _dense_gaussian_error(exact: torch.Tensor, dim: int) -> torch.Tensor:
    """Expected |projected cosine - exact| under a dense Gaussian projection to ``dim``, per pair.

    For unit u, v with cosine c and G (dim x n) of N(0, 1/dim) entries, the projected cosine is
    c + (1 - c^2) Z / sqrt(dim) + O(1/dim) with Z ~ N(0, 1) (delta method), so E|error| =
    sqrt(2/pi) (1 - c^2) / sqrt(dim); it is the JL bound's constant made exact in expectation.
    """
    return math.sqrt(2 / math.pi) * (1 - exact**2) / math.sqrt(dim)


def test_the_dense_gaussian_reference_is_what_a_dense_gaussian_does(jl_grads):
    """The formula above against a sampled dense Gaussian matrix (so it can serve as the reference)."""
    _, flat = jl_grads
    exact, dim = _cosines(flat), 512
    gen = torch.Generator().manual_seed(0)
    errors = [float((_cosines(flat @ torch.randn(flat.shape[1], dim, generator=gen)) - exact).abs().mean())
              for _ in range(2)]
    expected = float(_dense_gaussian_error(exact, dim).mean())
    assert 0.85 < sum(errors) / len(errors) / expected < 1.15, (errors, expected)


@pytest.mark.parametrize("structure", ["kronecker", "sparse"])
def test_projection_is_as_accurate_as_a_dense_gaussian(jl_grads, structure):
    """Mean |cosine error| within 1.2x a dense Gaussian projection's at the same proj_dim (3 seeds).

    The kronecker projection before kronecker-2 (a random 64-column factor on a LoRA factor's
    16-wide side) measured about 1.5x here at 4096: its effective sketch was 16 x 64, not 4096.
    """
    grads, flat = jl_grads
    exact = _cosines(flat)
    assert exact.abs().max() > 0.3  # the set has strongly aligned pairs too
    shapes = {n: tuple(g.shape[1:]) for n, g in grads.items()}
    for dim in (512, 4096):
        errors = []
        for seed in (3, 4, 5):
            proj = Projector(shapes, dim, seed=seed, structure=structure)
            projected = sum(proj.project(n, g) for n, g in grads.items())
            errors.append(float((_cosines(projected) - exact).abs().mean()))
        ratio = sum(errors) / len(errors) / float(_dense_gaussian_error(exact, dim).mean())
        assert ratio <= 1.2, (dim, ratio, errors)


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
