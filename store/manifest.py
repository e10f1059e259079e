"""Metadata records of a store: the store header, signal headers and shard commit records.

A shard's commit record is its manifest entry: it is replaced atomically and only after the
shard's data is fully written, so a reader sees a committed shard whole or not at all.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .atomic import atomic_write_json
from .errors import StoreError
from .layout import FORMAT_NAME, FORMAT_VERSION, OLD_FORMATS


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"cannot read {what} {path}: {exc}", "the file is damaged; run `flexfeed store verify`") from None
    if not isinstance(obj, dict):
        raise StoreError(f"{what} {path} is not a JSON object", "the file is damaged; run `flexfeed store verify`")
    return obj


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
    def load(cls, path: Path) -> StoreMeta:
        obj = _read_json(path, "store header")
        if obj.get("format") != FORMAT_NAME:
            raise StoreError(f"{path} is not a flexfeed store header", "point --store at a flexfeed store directory")
        version = obj.get("format_version")
        if type(version) is int and version in OLD_FORMATS:
            raise StoreError(
                f"store {path.parent} has format version {version} ({OLD_FORMATS[version]}); "
                f"this flexfeed reads format {FORMAT_VERSION}",
                f"rebuild it: delete {path.parent}, or point `store:` at a new folder, "
                "and run `flexfeed stage all CONFIG`",
            )
        if version != FORMAT_VERSION:
            raise StoreError(
                f"store {path.parent} has format version {version}, written by flexfeed "
                f"{obj.get('flexfeed_version', '?')}; this flexfeed ({__version__}) reads format {FORMAT_VERSION}",
                "use the flexfeed version that wrote it, or a new store directory",
            )
        known = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in obj.items() if k in known})
        except TypeError as exc:
            raise StoreError(f"store header {path} is incomplete: {exc}", "use a new store directory") from None


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
        obj = _read_json(path, "signal header")
        try:
            fields = {k: obj[k] for k in ("key", "name", "dtype", "dim", "spec", "created_at")}
        except KeyError as exc:
            raise StoreError(f"signal header {path} lacks {exc}", "run `flexfeed store gc` to drop it") from None
        # headers written before sources existed have none; sources are metadata, never worth refusing a signal
        sources = obj.get("sources")
        return cls(**fields, sources=sources if isinstance(sources, dict) else {})


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

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> CommitRecord:
        obj = _read_json(path, "commit record")
        try:
            return cls(**{k: obj[k] for k in cls.__dataclass_fields__ if k in obj})
        except TypeError as exc:
            raise StoreError(f"commit record {path} is incomplete: {exc}", "run `flexfeed store verify`") from None
