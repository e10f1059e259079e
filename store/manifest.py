"""Metadata records of a store: the store header, signal headers and shard commit records.

A shard's commit record is its manifest entry: it is replaced atomically and only after the
shard's data is fully written, so a reader sees a committed shard whole or not at all.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .atomic import atomic_write_json
from .errors import DamagedFile, StoreError
from .layout import DTYPES, FORMAT_NAME, FORMAT_VERSION, OLD_FORMATS, STORE_META


def repair_hint(root: Path) -> str:
    """What to do about a damaged signal header or commit record of the store at ``root``."""
    return f"set it aside with `flexfeed store repair {root}`; the next `flexfeed stage all` recomputes what it held"


def header_hint(root: Path) -> str:
    """What to do about a damaged store header: it is the store's identity, so repair cannot rebuild it."""
    return (f"restore {root / STORE_META} from a copy, or delete {root} and run `flexfeed stage all CONFIG` "
            "to rebuild the store")


def _read_json(path: Path, what: str, hint: str) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = json.loads(fh.read())
    except FileNotFoundError:
        raise
    except (OSError, ValueError, RecursionError) as exc:  # ValueError covers JSON and UTF-8 decoding errors
        raise DamagedFile(f"cannot read {what} {path}: {exc}", hint, path) from None
    if not isinstance(obj, dict):
        raise DamagedFile(f"{what} {path} is not a JSON object", hint, path)
    return obj


def _is_int(value, low: int | None = None) -> bool:
    return type(value) is int and (low is None or value >= low)


def _is_number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def field_problems(obj: dict, checks: dict, optional: tuple[str, ...] = ()) -> list[str]:
    """Each missing or ill-typed field of a record, as "lacks X" or "X is V, not <what>"."""
    missing = [k for k in checks if k not in obj and k not in optional]
    out = [f"lacks {', '.join(missing)}"] if missing else []
    for key, (ok, what) in checks.items():
        if key in obj and not ok(obj[key]):
            out.append(f"{key} is {obj[key]!r:.60}, not {what}")
    return out


_STORE_FIELDS = {
    "format_version": (_is_int, "an integer"),
    "dataset_fingerprint": (lambda v: isinstance(v, str) and bool(v), "a fingerprint string"),
    "num_rows": (lambda v: _is_int(v, 1), "a positive integer"),
    "shard_rows": (lambda v: _is_int(v, 1), "a positive integer"),
    "flexfeed_version": (lambda v: isinstance(v, str), "a version string"),
    "created_at": (_is_number, "a time"),
    "dataset_info": (lambda v: isinstance(v, dict), "a mapping"),
}
_STORE_OPTIONAL = ("flexfeed_version", "created_at", "dataset_info")

_SIGNAL_FIELDS = {
    "key": (lambda v: isinstance(v, str) and bool(v), "a key string"),
    "name": (lambda v: isinstance(v, str) and bool(v), "a name string"),
    "dtype": (lambda v: v in DTYPES, " or ".join(DTYPES)),
    "dim": (lambda v: v is None or _is_int(v, 1), "a positive integer or null"),
    "spec": (lambda v: isinstance(v, dict), "a mapping"),
    "created_at": (_is_number, "a time"),
}

_COMMIT_FIELDS = {
    "shard": (lambda v: _is_int(v, 0), "a shard id"),
    "slot": (lambda v: v in (0, 1) and type(v) is int, "0 or 1"),
    "rows": (lambda v: _is_int(v, 1), "a positive integer"),
    "version": (_is_int, "an integer"),
    "model": (lambda v: isinstance(v, str), "a string"),
    "checksum": (lambda v: isinstance(v, str) and bool(v), "a checksum string"),
    "committed_at": (_is_number, "a time"),
    "generation": (lambda v: _is_int(v, 0), "a non-negative integer"),
    "seconds": (_is_number, "a number of seconds"),
    "fast_checksum": (lambda v: isinstance(v, str), "a checksum string"),
}


@dataclass(frozen=True, kw_only=True)
class StoreMeta:
    dataset_fingerprint: str
    num_rows: int
    shard_rows: int
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    flexfeed_version: str = __version__
    created_at: float = field(default_factory=time.time)
    dataset_info: dict = field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_rows)

    def rows_in_shard(self, shard: int) -> int:
        return min(self.shard_rows, self.num_rows - shard * self.shard_rows)

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))

    @classmethod
    def problems(cls, path: Path) -> list[str]:
        """What is wrong with the header at ``path`` (empty when it loads); a foreign store is refused."""
        try:
            obj = _read_json(path, "store header", header_hint(path.parent))
        except DamagedFile as exc:
            return [exc.message]
        if "format" in obj and obj["format"] != FORMAT_NAME:
            raise StoreError(f"{path} is not a flexfeed store header", "point --store at a flexfeed store directory")
        version = obj.get("format_version")
        if type(version) is int and version in OLD_FORMATS:
            raise StoreError(
                f"store {path.parent} has format version {version} ({OLD_FORMATS[version]}); "
                f"this flexfeed reads format {FORMAT_VERSION}",
                f"rebuild it: delete {path.parent}, or point `store:` at a new folder, "
                "and run `flexfeed stage all CONFIG`",
            )
        if type(version) is int and version != FORMAT_VERSION:
            raise StoreError(
                f"store {path.parent} has format version {version}, written by flexfeed "
                f"{obj.get('flexfeed_version', '?')}; this flexfeed ({__version__}) reads format {FORMAT_VERSION}",
                "use the flexfeed version that wrote it, or a new store directory",
            )
        checks = {"format": (lambda v: v == FORMAT_NAME, FORMAT_NAME), **_STORE_FIELDS}
        return [f"store header {path} {p}" for p in field_problems(obj, checks, _STORE_OPTIONAL)]

    @classmethod
    def load(cls, path: Path) -> StoreMeta:
        problems = cls.problems(path)
        if problems:
            # one message naming every missing or bad field, never a guess at a version mismatch
            text = "; ".join(problems[:1] + [p.removeprefix(f"store header {path} ") for p in problems[1:]])
            raise DamagedFile(text, header_hint(path.parent), path)
        obj = _read_json(path, "store header", header_hint(path.parent))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in obj.items() if k in known})


@dataclass(frozen=True, kw_only=True)
class SignalMeta:
    key: str
    name: str
    dtype: str
    dim: int | None
    spec: dict
    created_at: float = field(default_factory=time.time)
    #: where the producer's inputs were read from when the signal was created (not in the key)
    sources: dict = field(default_factory=dict)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return () if self.dim is None else (self.dim,)

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> SignalMeta:
        hint = repair_hint(path.parents[2])
        obj = _read_json(path, "signal header", hint)
        problems = field_problems(obj, _SIGNAL_FIELDS)
        if problems:
            raise DamagedFile(f"signal header {path} {'; '.join(problems)}", hint, path)
        # headers written before sources existed have none; sources are metadata, never worth refusing a signal
        sources = obj.get("sources")
        return cls(**{k: obj[k] for k in _SIGNAL_FIELDS}, sources=sources if isinstance(sources, dict) else {})


@dataclass(frozen=True, kw_only=True)
class CommitRecord:
    shard: int
    slot: int
    rows: int
    version: int
    model: str
    checksum: str
    committed_at: float
    generation: int
    seconds: float = 0.0
    fast_checksum: str = ""
    """xxh3-128 of the same bytes, what a read checks cheaply; "" in records written before it existed."""

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path, *, shard: int | None = None, rows: int | None = None) -> CommitRecord:
        """The record at ``path``; with ``shard`` and ``rows``, one that names another shard or size is damaged."""
        hint = repair_hint(path.parents[3])
        obj = _read_json(path, "commit record", hint)
        problems = field_problems(obj, _COMMIT_FIELDS, optional=("seconds", "fast_checksum"))
        if not problems and shard is not None and obj["shard"] != shard:
            problems.append(f"names shard {obj['shard']}, not {shard}")
        if not problems and rows is not None and obj["rows"] != rows:
            problems.append(f"holds {obj['rows']} rows, the shard {rows}")
        if problems:
            raise DamagedFile(f"commit record {path} {'; '.join(problems)}", hint, path)
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__ if k in obj})
