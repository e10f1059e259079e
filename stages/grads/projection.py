"""Seeded random projections of per-sample weight gradients, one small factor set per weight.

Every trainable weight W (shape ``a x c``) gets its own random projection to ``proj_dim`` and the
per-weight results are summed. Independent per-weight projections keep inner products unbiased
(cross terms have zero mean), so the sum is a Johnson-Lindenstrauss projection of the whole
gradient, while memory stays proportional to the weights' dimensions, never to
(number of parameters x proj_dim). Two structures:

- ``kronecker`` (LoGra-style): ``vec(P_a^T G P_c) / sqrt(k)`` with ``P_a`` (a x k_a), ``P_c``
  (c x k_c), ``k_a * k_c = proj_dim``. Memory (a*k_a + c*k_c) per weight.
- ``sparse`` (a count sketch): every gradient entry is added, times a random sign or Gaussian, to
  one of ``proj_dim`` buckets. Same second moments as a dense projection; memory O(a*c) per weight.

Factors are drawn once, on CPU, from a ``torch.Generator`` seeded by sha256(seed, canonical
parameter name, role), so every process and machine draws the same numbers for the same torch.
"""

from __future__ import annotations

import hashlib
import math
import re

import torch

from store.errors import FlexfeedError

PROJ_TYPES = ("rademacher", "gaussian")
PROJ_STRUCTURES = ("kronecker", "sparse")

# Wrappers add these to parameter names; stripping them lets the offline stage (a PeftModel) and
# the trainer (a DeepSpeed-wrapped PeftModel) draw the same projection for the same weight.
_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")


def canonical_name(name: str) -> str:
    """A parameter's name without wrapper prefixes or the peft adapter name."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return re.sub(r"\.(lora_[AB]|lora_embedding_[AB])\.[^.]+\.", r".\1.", name)


def derive_seed(seed: int, name: str, role: str) -> int:
    """A 63-bit generator seed from (seed, canonical name, role) by sha256 (stable everywhere)."""
    digest = hashlib.sha256(f"{seed}\x00{canonical_name(name)}\x00{role}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def split_dim(proj_dim: int) -> tuple[int, int]:
    """Factor proj_dim = small * large with both factors as close to sqrt(proj_dim) as possible."""
    small = max(d for d in range(1, math.isqrt(proj_dim) + 1) if proj_dim % d == 0)
    if small * 4 < math.isqrt(proj_dim):
        raise FlexfeedError(
            f"proj_dim {proj_dim} has no factor pair close to its square root (best {small} x "
            f"{proj_dim // small}), which the kronecker projection needs",
            hint="use a power of two such as 4096 or 8192, or proj_structure: sparse",
        )
    return small, proj_dim // small


def _draw(shape: tuple[int, ...], seed: int, proj_type: str) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if proj_type == "rademacher":
        return torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
    return torch.randn(shape, generator=gen, dtype=torch.float32)


class Projector:
    """Projects per-sample gradients (batch, *weight shape) of named weights to (batch, proj_dim)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], proj_dim: int, *, proj_type: str = "rademacher",
                 seed: int = 0, structure: str = "kronecker", device: str | torch.device = "cpu"):
        if proj_type not in PROJ_TYPES:
            raise FlexfeedError(f"unknown proj_type {proj_type!r}", hint=f"use one of {', '.join(PROJ_TYPES)}")
        if structure not in PROJ_STRUCTURES:
            raise FlexfeedError(f"unknown proj_structure {structure!r}",
                                hint=f"use one of {', '.join(PROJ_STRUCTURES)}")
        if proj_dim < 1:
            raise FlexfeedError(f"proj_dim must be positive, got {proj_dim}", hint="e.g. proj_dim: 8192")
        self.proj_dim, self.proj_type, self.seed, self.structure = proj_dim, proj_type, seed, structure
        self.device = torch.device(device)
        self.scale = 1.0 / math.sqrt(proj_dim)
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, shape in shapes.items():
            self.factors[name] = self._make(name, tuple(shape))

    def _make(self, name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        a, c = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (1, shape[0])
        if self.structure == "sparse":
            numel = a * c
            gen = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, name, "bucket"))
            bucket = torch.randint(0, self.proj_dim, (numel,), generator=gen, dtype=torch.int64)
            value = _draw((numel,), derive_seed(self.seed, name, "value"), self.proj_type)
            return bucket.to(self.device), value.to(self.device)
        small, large = split_dim(self.proj_dim)
        # the larger factor goes to the larger side of the weight: it carries more of the mixing
        k_a, k_c = (small, large) if a <= c else (large, small)
        p_a = _draw((a, k_a), derive_seed(self.seed, name, "rows"), self.proj_type)
        p_c = _draw((c, k_c), derive_seed(self.seed, name, "cols"), self.proj_type)
        return p_a.to(self.device), p_c.to(self.device)

    def project(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """(batch, *shape) float gradients of weight ``name`` -> (batch, proj_dim) float32."""
        if name not in self.factors:
            raise KeyError(f"projector has no factors for parameter {name!r}")
        first, second = self.factors[name]
        b = grads.shape[0]
        g = grads.reshape(b, -1).float() if self.structure == "sparse" else grads.reshape(b, first.shape[0], -1)
        if self.structure == "sparse":
            out = torch.zeros(b, self.proj_dim, dtype=torch.float32, device=g.device)
            return out.index_add_(1, first, g * second).mul_(self.scale)
        g = g.float()
        (a, k_a), (c, k_c) = first.shape, second.shape
        # contraction order by flop count: thin LoRA factors make one order far cheaper
        if k_a * a * c + k_a * c * k_c <= a * c * k_c + k_a * a * k_c:
            z = torch.matmul(first.T, g) @ second
        else:
            z = first.T @ torch.matmul(g, second)
        return z.reshape(b, -1).mul_(self.scale)

    def describe(self) -> dict:
        """The projection's parameters as they enter a signal spec."""
        return {"proj_dim": self.proj_dim, "proj_type": self.proj_type, "seed": self.seed,
                "proj_structure": self.structure}
