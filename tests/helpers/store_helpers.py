"""Shared helpers of the store tests: small stores, directory snapshots, the writer child."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from store.store import Store

FINGERPRINT = "0123456789abcdef0123"
WRITER = Path(__file__).with_name("store_writer.py")
REPO = Path(__file__).resolve().parents[2]


def make_store(path, num_rows: int = 10, shard_rows: int = 4) -> Store:
    """A fresh store of ``num_rows`` rows (the last shard partial with the defaults)."""
    return Store.create(path, dataset_fingerprint=FINGERPRINT, num_rows=num_rows, shard_rows=shard_rows)


def fill(sig, seed: int = 0, version: int = 0) -> np.ndarray:
    """Commit every shard of ``sig`` with random values; return the whole array written."""
    rng = np.random.default_rng(seed)
    full = rng.standard_normal((sig.num_rows, *sig.meta.row_shape)).astype(sig.dtype)
    for shard in range(sig.num_shards):
        start, stop = sig.shard_range(shard)
        sig.write_shard(shard, full[start:stop], version=version, model="m")
    return full


def snapshot(root) -> dict[str, str]:
    """Every file under ``root`` with a hash of its bytes (and every directory), to compare later."""
    root = Path(root)
    out = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def start_writer(store_path, *args: str, **env: str) -> subprocess.Popen:
    """Start the writer child (see store_writer.py) with its stdout piped, one line per commit."""
    return subprocess.Popen([sys.executable, str(WRITER), str(store_path), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(**env), cwd=REPO)


class RowIdData:
    """A stand-in for tokenized data: each shard's rows as their own ids (`rows(start, stop)` -> {"row": ids})."""

    fingerprint = FINGERPRINT

    def rows(self, start, stop):
        return {"row": list(range(start, stop))}
