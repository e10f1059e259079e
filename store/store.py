"""A store directory: one dataset fingerprint, fixed shards, many content-keyed signals."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .errors import StoreError
from .hashing import canonical_json, stable_hash
from .layout import (
    CLAIMS_DIR,
    DATA_ARRAY,
    DTYPES,
    LOCKS_DIR,
    SIGNAL_META,
    SIGNALS_DIR,
    STAGE_LOG,
    STORE_META,
    check_name,
    signal_dir,
)
from .locks import FileLock, is_locked
from .manifest import SignalMeta, StoreMeta
from .signal import Signal

DEFAULT_SHARD_ROWS = 4096


def _local_path(path) -> Path:
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        raise StoreError(
            f"store {text!r} is not a local path",
            "commit records need an atomic rename: use a local or network-mounted directory",
        )
    return Path(text.removeprefix("file://"))


def is_read_only(path) -> bool:
    """True when nothing can be written at ``path`` (or its nearest existing parent): a read-only mount, or
    no write permission."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return True
    except OSError:
        pass
    return not os.access(path, os.W_OK)


def _create_header(root: Path, meta: StoreMeta) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / LOCKS_DIR / "store.lock", timeout_s=60, what=f"store {root}"):
        if not (root / STORE_META).exists():
            meta.save(root / STORE_META)


def _plain_sources(name: str, sources) -> dict:
    """A signal's sources as plain JSON values (an error names the signal when they are not)."""
    if sources is None:
        return {}
    if not isinstance(sources, dict):
        raise StoreError(f"the sources of signal {name!r} must be a dict, got {type(sources).__name__}",
                         "pass e.g. {'model': '/path/to/model'}")
    try:
        return json.loads(canonical_json(sources))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"the sources of signal {name!r} are not plain values: {exc}",
                         "use only strings, numbers, bools, None, lists and dicts") from None


class Store:
    """Open with :meth:`open`, :meth:`create` or :meth:`open_or_create`."""

    def __init__(self, root: Path, meta: StoreMeta):
        self.root = root
        self.meta = meta

    # -- lifecycle ------------------------------------------------------------
    @classmethod
    def open(cls, path, *, dataset_fingerprint: str | None = None) -> Store:
        """Open an existing store; with ``dataset_fingerprint``, refuse a store of another dataset."""
        root = _local_path(path)
        header = root / STORE_META
        if not header.is_file():
            raise StoreError(
                f"no flexfeed store at {root}",
                "check the path, or run a stage to create the store",
            )
        meta = StoreMeta.load(header)
        store = cls(root, meta)
        if dataset_fingerprint is not None:
            store.check_dataset(dataset_fingerprint)
        return store

    @classmethod
    def create(
        cls, path, *, dataset_fingerprint: str, num_rows: int, shard_rows: int = DEFAULT_SHARD_ROWS,
        dataset_info: dict | None = None,
    ) -> Store:
        """Create a new store; an error if one exists already."""
        root = _local_path(path)
        if (root / STORE_META).exists():
            raise StoreError(f"a store exists already at {root}", "open it, or choose another directory")
        return cls.open_or_create(root, dataset_fingerprint=dataset_fingerprint, num_rows=num_rows,
                                  shard_rows=shard_rows, dataset_info=dataset_info)

    @classmethod
    def open_or_create(
        cls, path, *, dataset_fingerprint: str, num_rows: int, shard_rows: int = DEFAULT_SHARD_ROWS,
        dataset_info: dict | None = None,
    ) -> Store:
        """Open the store at ``path``, creating it for this dataset when absent."""
        root = _local_path(path)
        if not isinstance(dataset_fingerprint, str) or not dataset_fingerprint:
            raise StoreError(f"a store needs a dataset fingerprint string, got {dataset_fingerprint!r}",
                             "compute it with store.hashing.fingerprint_records")
        if not isinstance(num_rows, int) or num_rows <= 0:
            raise StoreError(f"a store needs a positive row count, got {num_rows!r}", "check the dataset is not empty")
        if not isinstance(shard_rows, int) or shard_rows <= 0:
            raise StoreError(f"shard_rows must be a positive integer, got {shard_rows!r}", "e.g. 4096")
        if root.exists() and not root.is_dir():
            raise StoreError(f"store path {root} is a file", "choose a directory")
        if not (root / STORE_META).exists():
            _create_header(root, StoreMeta(dataset_fingerprint=dataset_fingerprint, num_rows=num_rows,
                                           shard_rows=shard_rows, dataset_info=dataset_info or {}))
        # an existing store (of another format or dataset) is refused here, before anything is written to it
        store = cls.open(root, dataset_fingerprint=dataset_fingerprint)
        if store.meta.num_rows != num_rows:
            raise StoreError(f"store {root} has {store.meta.num_rows} rows, the dataset {num_rows}",
                             "the store belongs to another dataset: use another directory")
        return store

    @property
    def read_only(self) -> bool:
        """Whether this store can be written (a complete store on a read-only mount still serves every reader)."""
        return is_read_only(self.root)

    def check_dataset(self, dataset_fingerprint: str) -> None:
        if dataset_fingerprint != self.meta.dataset_fingerprint:
            raise StoreError(
                f"store {self.root} holds dataset {self.meta.dataset_fingerprint}, not {dataset_fingerprint}",
                "the data or tokenization changed: use a new store directory for this dataset",
            )

    # -- signals --------------------------------------------------------------
    def signal_key(self, name: str, spec: dict, dtype: str, dim: int | None) -> str:
        """Content key: everything that produced the values, with this store's dataset."""
        return stable_hash({"dataset": self.meta.dataset_fingerprint, "name": name, "spec": spec,
                            "dtype": dtype, "dim": dim})

    def signal(self, name: str, spec: dict, *, dtype: str = "float32", dim: int | None = None,
               sources: dict | None = None) -> Signal:
        """Get the signal produced by ``spec``, creating it (empty) if new.

        ``sources`` (e.g. the model's folder) is metadata kept in the header of a new signal and shown
        by `store info`; it is not part of the key, so it never decides reuse.
        """
        check_name(name)
        if dtype not in DTYPES:
            raise StoreError(f"signal dtype {dtype!r} is not supported", f"use one of {', '.join(DTYPES)}")
        if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0):
            raise StoreError(f"signal dimension must be a positive integer or None, got {dim!r}", "e.g. dim=512")
        if not isinstance(spec, dict):
            raise StoreError(f"the spec of signal {name!r} must be a dict, got {type(spec).__name__}",
                             "describe what produced the signal as a dict of plain values")
        try:
            key = self.signal_key(name, spec, dtype, dim)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"the spec of signal {name!r} cannot be hashed: {exc}",
                             "use only strings, numbers, bools, None, lists and dicts in a spec") from None
        sources = _plain_sources(name, sources)
        sdir = signal_dir(self.root, key)
        if not (sdir / SIGNAL_META).exists():
            with FileLock(self.root / LOCKS_DIR / f"create-{key}.lock", timeout_s=60, what=f"signal {name!r}"):
                if not (sdir / SIGNAL_META).exists():
                    sdir.mkdir(parents=True, exist_ok=True)
                    Signal.create_array(sdir / DATA_ARRAY, self.meta, dtype, dim)
                    # the header last: a signal directory without it is creation debris
                    SignalMeta(key=key, name=name, dtype=dtype, dim=dim, spec=json.loads(canonical_json(spec)),
                               sources=sources).save(sdir / SIGNAL_META)
        return self.get(key)

    def drop_if_empty(self, sig: Signal) -> bool:
        """Remove a signal no shard was ever committed to (its creator failed first): True if it was removed.

        It is kept when it has a commit record, a writer holds one of its shards, or the disk refuses (this
        runs while another error is on its way out, which it must not hide).
        """
        try:
            with FileLock(self.root / LOCKS_DIR / f"create-{sig.key}.lock", timeout_s=0, note_pid=False):
                if (sig.record_files() or any((sig.dir / CLAIMS_DIR).glob("*.json"))  # another job computes it
                        or any(is_locked(sig.lock_path(s)) for s in range(sig.num_shards))):
                    return False
                (sig.dir / SIGNAL_META).unlink()  # invisible first: a signal folder without a header is debris
                shutil.rmtree(sig.dir, ignore_errors=True)
                return True
        except (OSError, StoreError):
            return False

    def get(self, key: str) -> Signal:
        sdir = signal_dir(self.root, key)
        if not (sdir / SIGNAL_META).is_file():
            raise StoreError(f"store {self.root} has no signal {key}", "run `flexfeed store info` to list signals")
        return Signal(sdir, self.meta, SignalMeta.load(sdir / SIGNAL_META))

    def find(self, name: str) -> list[Signal]:
        """Signals of a given name (several when produced with different settings)."""
        return [s for s in self.signals() if s.name == name]

    def signals(self) -> list[Signal]:
        base = self.root / SIGNALS_DIR
        if not base.is_dir():
            return []
        out = []
        for sdir in sorted(base.iterdir()):
            if (sdir / SIGNAL_META).is_file():
                out.append(Signal(sdir, self.meta, SignalMeta.load(sdir / SIGNAL_META)))
        return sorted(out, key=lambda s: (s.name, s.key))

    # -- stage bookkeeping ----------------------------------------------------
    def log_stage(self, **fields) -> None:
        """Append one line about a stage run (what the report's time-per-stage reads)."""
        fields.setdefault("time", time.time())
        with FileLock(self.root / LOCKS_DIR / "stage_log.lock", timeout_s=30, what="stage log"):
            with open(self.root / STAGE_LOG, "a+b") as fh:
                # a crash mid-append leaves a torn last line: end it so this entry stays whole
                torn = fh.seek(0, os.SEEK_END) > 0 and fh.seek(-1, os.SEEK_END) >= 0 and fh.read(1) != b"\n"
                fh.write((("\n" if torn else "") + json.dumps(fields, sort_keys=True) + "\n").encode())
                fh.flush()
                os.fsync(fh.fileno())

    def stage_log(self) -> list[dict]:
        path = self.root / STAGE_LOG
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from a crash is ignored
        return out
