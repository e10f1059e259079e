"""Seeded random projections of per-sample weight gradients, one small factor set per weight.

Every trainable weight W (shape ``a x c``) gets its own random map to ``proj_dim`` and the
per-weight results are summed. Independent per-weight maps keep inner products unbiased (cross
terms have zero mean), so the sum is a Johnson-Lindenstrauss projection of the whole gradient,
while memory stays proportional to the weights' dimensions, never to (number of parameters x
proj_dim). Two structures:

- ``kronecker``: ``vec(P_a^T G P_c)``, one factor per side of W. A LoRA factor is thin (r x in,
  out x r): a random ``P_a`` of 64 columns on its 8-wide side would carry only 8 dimensions of
  the 64 and leave the other side 8192/64 = 128, an effective sketch of ~1024. So a side no wider
  than sqrt(proj_dim) keeps all its coordinates (a signed permutation, exact) and the other side
  gets the rest of the budget, ``proj_dim // narrow``: a signed balanced hash, injective (exact
  too) when that side fits, a count sketch of it otherwise. A weight that fits in proj_dim is then
  kept exactly (its own inner products have no error) and scattered at random, so its cross terms
  with other weights have a dense projection's variance. Memory: one index and one sign per row
  and column. Weights wide on both sides (full linear layers) get LoGra's balanced dense factors,
  ``k_a * k_c = proj_dim``, ``a*k_a + c*k_c`` floats.
- ``sparse`` (a count sketch): every gradient entry is added, times a random sign or Gaussian, to
  one of ``proj_dim`` buckets. Same second moments as a dense projection; memory O(a*c) per weight.

Factors are drawn once, on CPU, from a ``torch.Generator`` seeded by sha256(seed, canonical
parameter name, role), so every process and machine draws the same numbers for the same torch.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch

from store.errors import FlexfeedError

PROJ_TYPES = ("rademacher", "gaussian")
PROJ_STRUCTURES = ("kronecker", "sparse")
PROJ_VERSIONS = {"kronecker": "kronecker-2", "sparse": "sparse-1"}
"""Bumped when a structure draws other numbers for the same settings; it enters the signal key."""

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


def projection_spec(proj_dim: int, proj_type: str, seed: int, structure: str) -> dict:
    """The projection's identity as it enters a signal key (settings and the structure's version)."""
    return {"proj_dim": proj_dim, "proj_type": proj_type, "seed": seed, "proj_structure": structure,
            "proj_version": PROJ_VERSIONS[structure]}


def split_dim(proj_dim: int) -> tuple[int, int]:
    """Factor proj_dim = small * large with both factors as close to sqrt(proj_dim) as possible."""
    small = max(d for d in range(1, math.isqrt(proj_dim) + 1) if proj_dim % d == 0)
    if small * 4 < math.isqrt(proj_dim):
        raise FlexfeedError(
            f"proj_dim {proj_dim} has no factor pair close to its square root (best {small} x "
            f"{proj_dim // small}), which the kronecker projection of a weight wide on both sides needs",
            hint="use a power of two such as 4096 or 8192, or proj_structure: sparse",
        )
    return small, proj_dim // small


def _draw(shape: tuple[int, ...], seed: int, proj_type: str) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if proj_type == "rademacher":
        return torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
    return torch.randn(shape, generator=gen, dtype=torch.float32)


@dataclass(frozen=True)
class Side:
    """One side of a weight's Kronecker factor: its ``n`` coordinates mapped to ``width`` columns.

    Either a dense random ``matrix`` (n x width, scaled by 1/sqrt(width) when applied) or a signed
    hash: coordinate i goes to column ``bucket[i]`` times ``value[i]``. Buckets are balanced (a
    random permutation modulo width), so a side with n <= width is injective with +-1 values:
    its Gram matrix is the identity and it keeps inner products exactly.
    """

    width: int
    matrix: torch.Tensor | None = None
    bucket: torch.Tensor | None = None
    value: torch.Tensor | None = None

    @property
    def exact(self) -> bool:
        """True when this side keeps inner products exactly (an injective signed hash)."""
        return self.matrix is None and self.size <= self.width

    @property
    def size(self) -> int:
        """n: the coordinates of the weight's side this maps."""
        return len(self.bucket) if self.matrix is None else self.matrix.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.matrix is None else 1.0 / math.sqrt(self.width)

    def to(self, device: torch.device) -> Side:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Side(self.width, move(self.matrix), move(self.bucket), move(self.value))

    def dense(self) -> torch.Tensor:
        """The (n, width) matrix this side multiplies by, scale included (explicit, for checks)."""
        if self.matrix is not None:
            return self.matrix.cpu() * self.scale
        out = torch.zeros(self.size, self.width)
        out[torch.arange(self.size), self.bucket.cpu()] = self.value.cpu()
        return out

    def cost(self, other: int) -> int:
        """Multiply-adds to apply this side to a (other x n) slab: drives the contraction order."""
        return other * self.size * (self.width if self.matrix is not None else 1)

    def apply(self, g: torch.Tensor, dim: int) -> torch.Tensor:
        """Map dimension ``dim`` (1: rows, 2: columns) of a (b, rows, cols) tensor to ``width``."""
        if self.matrix is not None:
            return torch.matmul(g, self.matrix) if dim == 2 else torch.matmul(self.matrix.T, g)
        shape = list(g.shape)
        shape[dim] = self.width
        weighted = g * (self.value if dim == 2 else self.value[:, None])
        return g.new_zeros(shape).index_add_(dim, self.bucket, weighted)


def _hash_side(n: int, width: int, seed: int, proj_type: str) -> Side:
    """A signed balanced hash of n coordinates into width columns (injective, +-1, when n <= width)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bucket = torch.randperm(max(n, width), generator=gen)[:n] % width
    # an injective side keeps +-1 whatever proj_type, so it stays exact; a colliding one is a count sketch
    value = _draw((n,), seed ^ 1, "rademacher" if n <= width else proj_type)
    return Side(width, bucket=bucket, value=value)


def kronecker_widths(a: int, c: int, proj_dim: int) -> tuple[int, int, bool]:
    """(k_a, k_c, hashed) for an ``a x c`` weight: the narrow side whole, or LoGra's balanced split."""
    narrow = min(a, c)
    if narrow * narrow <= proj_dim:
        # the narrow side kept whole (exact); all the rest of the budget to the wide side
        k_wide = proj_dim // narrow
        return (narrow, k_wide, True) if a <= c else (k_wide, narrow, True)
    small, large = split_dim(proj_dim)
    # the larger factor goes to the larger side of the weight: it carries more of the mixing
    return (small, large, False) if a <= c else (large, small, False)


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
        self.factors: dict[str, tuple] = {}
        for name, shape in shapes.items():
            self.factors[name] = self._make(name, tuple(shape))

    def _make(self, name: str, shape: tuple[int, ...]) -> tuple:
        a, c = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (1, shape[0])
        if self.structure == "sparse":
            numel = a * c
            gen = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, name, "bucket"))
            bucket = torch.randint(0, self.proj_dim, (numel,), generator=gen, dtype=torch.int64)
            value = _draw((numel,), derive_seed(self.seed, name, "value"), self.proj_type)
            return bucket.to(self.device), value.to(self.device)
        k_a, k_c, hashed = kronecker_widths(a, c, self.proj_dim)
        if hashed:
            side_a = _hash_side(a, k_a, derive_seed(self.seed, name, "rows-hash"), self.proj_type)
            side_c = _hash_side(c, k_c, derive_seed(self.seed, name, "cols-hash"), self.proj_type)
        else:
            side_a = Side(k_a, matrix=_draw((a, k_a), derive_seed(self.seed, name, "rows"), self.proj_type))
            side_c = Side(k_c, matrix=_draw((c, k_c), derive_seed(self.seed, name, "cols"), self.proj_type))
        return side_a.to(self.device), side_c.to(self.device)

    def project(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """(batch, *shape) float gradients of weight ``name`` -> (batch, proj_dim) float32."""
        if name not in self.factors:
            raise KeyError(f"projector has no factors for parameter {name!r}")
        first, second = self.factors[name]
        b = grads.shape[0]
        if self.structure == "sparse":
            g = grads.reshape(b, -1).float()
            out = torch.zeros(b, self.proj_dim, dtype=torch.float32, device=g.device)
            return out.index_add_(1, first, g * second).mul_(1.0 / math.sqrt(self.proj_dim))
        if first.matrix is None and second.matrix is None:
            # both sides hashed: one scatter of the flat gradient, row i*c+j to column bucket_a[i]*k_c + bucket_c[j]
            # (the kron layout); the index is rebuilt per call, O(weight), so memory stays O(rows + columns)
            index = (first.bucket[:, None] * second.width + second.bucket[None, :]).reshape(-1)
            value = (first.value[:, None] * second.value[None, :]).reshape(-1)
            out = torch.zeros(b, self.proj_dim, dtype=torch.float32, device=grads.device)
            return out.index_add_(1, index, grads.reshape(b, -1).float() * value)
        g = grads.reshape(b, first.size, -1).float()
        rows, cols = g.shape[1], g.shape[2]
        # contraction order by cost: shrink first, so the second side works on the smaller slab
        if first.cost(cols) + second.cost(first.width) <= second.cost(rows) + first.cost(second.width):
            z = second.apply(first.apply(g, 1), 2)
        else:
            z = first.apply(second.apply(g, 2), 1)
        z = z.reshape(b, -1).mul_(first.scale * second.scale)
        # a narrow side that does not divide proj_dim leaves the last few columns to other weights
        return torch.nn.functional.pad(z, (0, self.proj_dim - z.shape[1]))

    def describe(self) -> dict:
        """The projection's parameters as they enter a signal spec."""
        return projection_spec(self.proj_dim, self.proj_type, self.seed, self.structure)
