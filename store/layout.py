"""Where things live inside a store directory, and name validation (no path escapes)."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import StoreError

FORMAT_NAME = "flexfeed-store"
FORMAT_VERSION = 2
# formats this flexfeed refuses, and why their signals cannot be reused
OLD_FORMATS = {1: "signal keys that held file paths"}
STORE_META = "store.json"
SIGNALS_DIR = "signals"
SIGNAL_META = "signal.json"
DATA_ARRAY = "data.zarr"
COMMITS_DIR = "commits"
LOCKS_DIR = "locks"
CLAIMS_DIR = "claims"
INDEX_DIR = "index"
INDEX_LOCK = "index.lock"
STAGE_LOG = "stage_log.jsonl"
QUARANTINE_DIR = "quarantine"
DTYPES = ("float16", "float32")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_KEY_RE = re.compile(r"^[0-9a-f]{8,64}$")


def check_name(name: str, what: str = "signal name") -> str:
    """Names become path parts: letters, digits, '_', '.', '-' only, no '..'."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise StoreError(
            f"invalid {what} {name!r}",
            "use 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return name


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise StoreError(f"invalid signal key {key!r}", "keys are lowercase hex digests")
    return key


def signal_dir(root: Path, key: str) -> Path:
    return root / SIGNALS_DIR / check_key(key)


def shard_file(shard: int) -> str:
    return f"{int(shard):06d}"
