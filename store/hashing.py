"""Content hashing: canonical JSON keys, dataset and model fingerprints."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

try:  # installed with `datasets`; reads fall back to blake2b without it
    import xxhash
except ImportError:  # pragma: no cover
    xxhash = None

HASH_HEX_CHARS = 20  # 80 bits: collisions are not a practical concern for signal keys


def _normalise(obj):
    if isinstance(obj, Mapping):
        return {str(k): _normalise(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_normalise(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        if not math.isfinite(value):
            raise ValueError(f"cannot hash non-finite float {value!r}")
        # repr round-trips exactly and is identical on every platform
        return value
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    raise TypeError(f"cannot put {type(obj).__name__} into a content key: {obj!r}")


def canonical_json(obj) -> str:
    """Sorted-key, whitespace-free JSON: equal descriptions give equal bytes."""
    return json.dumps(_normalise(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def stable_hash(obj, chars: int = HASH_HEX_CHARS) -> str:
    """sha256 of the canonical JSON of ``obj`` (hex prefix)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:chars]


def fingerprint_records(records: Iterable, settings: Mapping | None = None) -> str:
    """Fingerprint a dataset by the content of its rows (order matters) and its settings."""
    h = hashlib.sha256()
    h.update(canonical_json(settings or {}).encode())
    count = 0
    for record in records:
        line = canonical_json(record).encode()
        h.update(len(line).to_bytes(8, "little"))
        h.update(line)
        count += 1
    h.update(count.to_bytes(8, "little"))
    return h.hexdigest()[:HASH_HEX_CHARS]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt")
# a Trainer's bookkeeping beside the weights: not the model, and some of it records folders
# (training_args.bin holds output_dir, trainer_state.json the best checkpoint's path)
TRAINER_FILES = frozenset({"optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "training_args.bin",
                           "trainer_state.json", "flexfeed_state.json", "flexfeed_run.json"})
TRAINER_DIRS = re.compile(r"^(checkpoint-\d+|global_step\d+|runs)$")


def model_files(root: Path, suffixes: tuple[str, ...] = WEIGHT_SUFFIXES) -> list[Path]:
    """The files that make a model folder's content: weights, configs, tokenizer; not a Trainer's state."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).parts
        if not p.is_file() or not p.name.endswith(suffixes) or p.name in TRAINER_FILES:
            continue
        if p.name.startswith("rng_state") or any(TRAINER_DIRS.match(part) for part in rel[:-1]):
            continue
        out.append(p)
    return out

# resolved path -> (stat signature, digest): a file is read once per process while it is unchanged
_FILE_DIGESTS: dict[str, tuple[tuple[int, ...], str]] = {}


def _stat_signature(path: Path) -> tuple[int, ...]:
    st = path.stat()
    # ctime as well: a rewrite that restores the mtime (cp -p, rsync -t) still moves it
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, read once per process while its size, times and inode stay."""
    resolved = Path(path).resolve()
    signature = _stat_signature(resolved)
    cached = _FILE_DIGESTS.get(str(resolved))
    if cached is not None and cached[0] == signature:
        return cached[1]
    digest = _sha256_file(resolved)
    if _stat_signature(resolved) == signature:  # not rewritten while we read it
        _FILE_DIGESTS[str(resolved)] = (signature, digest)
    return digest


def fingerprint_directory(path: str | os.PathLike, suffixes: tuple[str, ...] = WEIGHT_SUFFIXES) -> str:
    """Hash every weight/config file under ``path`` by name relative to it and bytes (not its folder, not mtimes,
    not a Trainer's optimizer, scheduler, RNG or arguments files, nor checkpoint folders inside it)."""
    root = Path(path)
    if root.is_file():
        files = [root]
        root = root.parent
    else:
        files = model_files(root, suffixes)
    if not files:
        raise FileNotFoundError(f"no model files under {path}")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0{file_digest(f)}\n".encode())
    return h.hexdigest()[:HASH_HEX_CHARS]


def fingerprint_tensors(named: Iterable[tuple[str, object]]) -> str:
    """Hash named tensors/arrays by name, dtype, shape and bytes (e.g. a LoRA adapter in memory)."""
    h = hashlib.sha256()
    for name, value in sorted(named, key=lambda kv: kv[0]):
        arr = value.detach().cpu().contiguous() if hasattr(value, "detach") else value
        if hasattr(arr, "view") and hasattr(arr, "dtype") and "bfloat16" in str(arr.dtype):
            arr = arr.float()
        arr = np.ascontiguousarray(arr.numpy() if hasattr(arr, "numpy") else np.asarray(arr))
        h.update(name.encode())
        h.update(str(arr.dtype).encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:HASH_HEX_CHARS]


def _little_endian(arr: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(arr)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder == "big"):
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


def checksum_array(arr: np.ndarray) -> str:
    """Checksum of an array's little-endian bytes (what verify recomputes)."""
    return hashlib.blake2b(_little_endian(arr).reshape(-1).view(np.uint8), digest_size=16).hexdigest()


def fast_checksum(arr: np.ndarray) -> str:
    """xxh3-128 of an array's little-endian bytes: what a read checks (about 3x memcpy speed, blake2b 1/10);
    "" when the xxhash package (a dependency of `datasets`) is missing, and then reads check `checksum_array`."""
    if xxhash is None:
        return ""
    return xxhash.xxh3_128_hexdigest(_little_endian(arr).reshape(-1).view(np.uint8))
