"""One signal: a float array (N,) or (N, d) on a zarr v3 array, written and committed per shard.

Data layout: a zarr array of shape (num_shards, 2, shard_rows[, d]) chunked (1, 1, shard_rows[, d]),
so one chunk is one shard in one of two *slots*. A writer fills the slot that is not committed,
then atomically replaces the shard's commit record to point at it, then deletes the superseded
slot. A crash at any moment leaves the committed slot untouched; a half-written slot is debris
that `gc` removes. A chunk file holds the shard's rows only: a short last shard (a 500-row target
set) is not padded to ``shard_rows`` (stores written before held it padded; both read alike).
"""

from __future__ import annotations

import mmap
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BytesCodec

from . import integrity
from .atomic import fsync_dir
from .errors import CorruptShard, DamagedFile, StoreError
from .hashing import checksum_array, fast_checksum, stable_hash
from .integrity import file_identity
from .layout import COMMITS_DIR, DATA_ARRAY, LOCKS_DIR, shard_file
from .locks import FileLock
from .manifest import CommitRecord, SignalMeta, StoreMeta


@dataclass(frozen=True)
class ShardState:
    """A shard as the staleness rule sees it."""

    shard: int
    rows: int
    committed: bool
    version: int | None
    model: str | None
    stale: bool


class Signal:
    """Read and write access to one committed-per-shard signal."""

    def __init__(self, root: Path, store_meta: StoreMeta, meta: SignalMeta):
        self.dir = root
        self.store_meta = store_meta
        self.meta = meta
        self._array: zarr.Array | None = None
        self._direct = False
        self._chunk_paths: dict[tuple[int, int], Path] = {}
        self._record_paths: dict[int, Path] = {}
        self._loaded: dict[int, tuple[tuple, CommitRecord]] = {}
        """shard -> (identity of its commit record file before it was read, the record read from it)."""

    # -- identity -------------------------------------------------------------
    @property
    def key(self) -> str:
        return self.meta.key

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta.dtype)

    @property
    def dim(self) -> int | None:
        return self.meta.dim

    @property
    def num_rows(self) -> int:
        return self.store_meta.num_rows

    @property
    def num_shards(self) -> int:
        return self.store_meta.num_shards

    @property
    def shard_rows(self) -> int:
        return self.store_meta.shard_rows

    def __repr__(self) -> str:
        return f"Signal({self.name!r}, key={self.key}, dtype={self.meta.dtype}, dim={self.dim})"

    # -- array ----------------------------------------------------------------
    @staticmethod
    def create_array(path: Path, store_meta: StoreMeta, dtype: str, dim: int | None) -> None:
        tail = () if dim is None else (dim,)
        zarr.create_array(
            store=str(path),
            shape=(store_meta.num_shards, 2, store_meta.shard_rows, *tail),
            chunks=(1, 1, store_meta.shard_rows, *tail),
            dtype=dtype,
            # per-sample signals (embeddings, projected gradients) do not compress; skipping the
            # codec keeps reads at memory-copy speed
            compressors=None,
            fill_value=0,
            overwrite=True,
        )

    def _open_array(self) -> zarr.Array:
        # r+ writes nothing on open (zarr's mkdir of the existing folder is a no-op, even on a read-only mount)
        array = zarr.open_array(str(self.dir / DATA_ARRAY), mode="r+")
        # every committed slot gets a file, even an all-zero one, so a missing chunk file is damage
        return array.with_config({"write_empty_chunks": True})

    @property
    def array(self) -> zarr.Array:
        if self._array is None:
            self._array = self._open_array()
            self._direct = _plain_chunks(self._array)
        return self._array

    def _read_slot(self, shard: int, slot: int, rows: int, out: np.ndarray | None = None) -> tuple[np.ndarray, tuple]:
        """The first ``rows`` rows of one slot, into ``out`` (C-contiguous) when given, and the data file's identity."""
        if out is None:
            out = np.empty((rows, *self.meta.row_shape), dtype=self.dtype)
        array = self.array
        path = self.chunk_path(shard, slot)
        if not self._direct:
            st = os.stat(path)
            out[...] = array[shard, slot, :rows]
            return out, file_identity(path, st)
        # An uncompressed little-endian chunk is the rows' bytes in C order: one copy from a mapping of
        # the file into the caller's buffer, instead of zarr's read-decode-copy. A user-space copy from
        # the page cache runs at memcpy speed, 1.5x a read() into the same buffer. Mapping is safe: a
        # writer never changes a committed file in place (a commit writes a new file; gc unlinks).
        buf = out.reshape(-1).view(np.uint8)
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if st.st_size < buf.size:
                raise ValueError(f"chunk file {path} ends after {st.st_size} of {buf.size} bytes")
            with mmap.mmap(fd, buf.size, access=mmap.ACCESS_READ) as mapped:
                buf[:] = np.frombuffer(mapped, dtype=np.uint8)
        finally:
            os.close(fd)
        return out, file_identity(path, st)

    def chunk_path(self, shard: int, slot: int) -> Path:
        path = self._chunk_paths.get((shard, slot))
        if path is None:  # zarr's key encoding and pathlib cost more than a small shard's copy: once per slot
            tail = (0,) * (0 if self.dim is None else 1)
            path = self.dir / DATA_ARRAY / self.array.metadata.encode_chunk_key((shard, slot, 0, *tail))
            self._chunk_paths[(shard, slot)] = path
        return path

    # -- commit records -------------------------------------------------------
    def _record_path(self, shard: int) -> Path:
        path = self._record_paths.get(shard)
        if path is None:
            path = self._record_paths[shard] = self.dir / COMMITS_DIR / f"{shard_file(shard)}.json"
        return path

    def lock_path(self, shard: int) -> Path:
        return self.dir / LOCKS_DIR / f"{shard_file(shard)}.lock"

    def _load_record(self, path: Path, shard: int) -> CommitRecord:
        # the file's identity is taken before it is read: if it is the same later, so is what was read,
        # and a listing of every record (each stream over a signal starts with one) parses only new files
        identity = _stat_identity(os.stat(path))
        seen = self._loaded.get(shard)
        if seen is not None and seen[0] == identity:
            return seen[1]
        record = CommitRecord.load(path, shard=shard, rows=self.store_meta.rows_in_shard(shard))
        self._loaded[shard] = (identity, record)
        return record

    def _still_committed(self, record: CommitRecord) -> bool:
        """True when the shard's commit record file is the one ``record`` was read from (one stat, no parse).

        A commit replaces the file by renaming a new one over it (a new inode), so the same identity is the
        same record, to the file system's timestamp grain (as for data files, see store.integrity).
        """
        seen = self._loaded.get(record.shard)
        if seen is None or seen[1] is not record:
            return False
        try:
            return _stat_identity(os.stat(self._record_path(record.shard))) == seen[0]
        except FileNotFoundError:
            return False

    def record(self, shard: int) -> CommitRecord | None:
        """The commit record of a shard, or None while it is not committed (a damaged one is a DamagedFile)."""
        self._check_shard(shard)
        try:
            return self._load_record(self._record_path(shard), shard)
        except FileNotFoundError:
            return None

    def record_files(self) -> dict[int, Path]:
        """The commit record file of every shard that has one (not read)."""
        try:
            entries = list(os.scandir(self.dir / COMMITS_DIR))
        except FileNotFoundError:
            return {}
        out = {}
        for entry in entries:
            stem, dot, ext = entry.name.partition(".")
            if ext == "json" and stem.isdigit() and int(stem) < self.num_shards:
                out[int(stem)] = Path(entry.path)
        return out

    def scan_records(self) -> tuple[dict[int, CommitRecord], dict[int, DamagedFile]]:
        """Every readable commit record, and the damage of each unreadable one (what verify reports)."""
        good, bad = {}, {}
        for shard, path in sorted(self.record_files().items()):
            try:
                good[shard] = self._load_record(path, shard)
            except FileNotFoundError:
                continue  # listed, then removed (a signal dropped by gc)
            except DamagedFile as exc:
                bad[shard] = exc
        return good, bad

    def records(self) -> dict[int, CommitRecord]:
        """Every commit record; a damaged one is an error naming its file and the repair command."""
        good, bad = self.scan_records()
        if bad:
            raise next(iter(bad.values()))
        return good

    def committed_shards(self) -> list[int]:
        return sorted(self.records())

    def is_complete(self) -> bool:
        return len(self.records()) == self.num_shards

    def _check_shard(self, shard: int) -> None:
        if not isinstance(shard, (int, np.integer)) or not 0 <= shard < self.num_shards:
            raise StoreError(
                f"shard {shard} is out of range for signal {self.name!r} ({self.num_shards} shards)",
                f"use a shard id in 0..{self.num_shards - 1}",
            )

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_rows
        return start, start + self.store_meta.rows_in_shard(shard)

    # -- writing --------------------------------------------------------------
    def _coerce(self, shard: int, values) -> np.ndarray:
        if hasattr(values, "detach"):
            values = values.detach().cpu().float().numpy()
        try:
            arr = np.asarray(values)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"shard {shard} of signal {self.name!r}: values are not an array ({exc})",
                             "pass a numpy array or tensor of the shard's rows") from None
        rows = self.store_meta.rows_in_shard(shard)
        want = (rows, *self.meta.row_shape)
        if arr.dtype.kind != "f":
            raise StoreError(
                f"signal {self.name!r} takes floating-point values, got dtype {arr.dtype}",
                f"convert the values to {self.meta.dtype}",
            )
        if arr.shape != want:
            raise StoreError(
                f"shard {shard} of signal {self.name!r} needs shape {want}, got {arr.shape}",
                "the dimension or row count is wrong: pass exactly the rows of that shard",
            )
        with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
            out = arr.astype(self.dtype, copy=False)
        if not np.isfinite(out).all():
            bad = int(np.flatnonzero(~np.isfinite(out).reshape(rows, -1).all(axis=1))[0])
            raise StoreError(
                f"shard {shard} of signal {self.name!r} has a non-finite value at row {shard * self.shard_rows + bad}"
                f" (or overflows {self.meta.dtype})",
                "fix the producer; non-finite values are never stored",
            )
        return np.ascontiguousarray(out)

    def write_shard(
        self, shard: int, values, *, version: int = 0, model: str = "", lock_timeout_s: float = 0.0,
        seconds: float = 0.0,
    ) -> CommitRecord:
        """Write a whole shard and commit it (data first, then the commit record, atomically)."""
        self._check_shard(shard)
        arr = self._coerce(shard, values)
        with FileLock(self.lock_path(shard), timeout_s=lock_timeout_s, what=f"shard {shard} of {self.name!r}"):
            old = self.record(shard)
            slot = 0 if old is None else 1 - old.slot
            chunk = self.chunk_path(shard, slot)
            if self._direct:
                # a plain chunk file is the rows' bytes: a short last shard (a 500-row target set) takes
                # only its own rows on disk, not a whole shard of zeros; reads take the first `rows` rows
                # either way, so a padded chunk of an older store reads the same
                _write_file(chunk, arr)
            else:
                full = np.zeros((self.shard_rows, *self.meta.row_shape), dtype=self.dtype)
                full[: arr.shape[0]] = arr
                self.array[shard, slot] = full
                _fsync_file(chunk)  # data (and zarr's rename of it into place) durable before the record
            fsync_dir(chunk.parent)
            record = CommitRecord(
                shard=int(shard), slot=slot, rows=int(arr.shape[0]), version=int(version), model=str(model),
                checksum=checksum_array(arr), committed_at=time.time(),
                generation=0 if old is None else old.generation + 1, seconds=float(seconds),
                fast_checksum=fast_checksum(arr),
            )
            record.save(self._record_path(shard))
            # this process wrote these bytes: its own reads of them need no hash
            integrity.remember(file_identity(chunk, os.stat(chunk)), record)
            if old is not None:
                # the superseded slot is no longer referenced; a reader still on it re-reads the
                # record, sees the new generation and moves to the new slot
                self.chunk_path(shard, old.slot).unlink(missing_ok=True)
        return record

    # -- reading --------------------------------------------------------------
    def _read_committed(self, record: CommitRecord, out: np.ndarray | None = None, *, check: bool = True
                        ) -> np.ndarray:
        """The record's values; with ``check``, its bytes are hashed at the first read of that file in a process
        and a mismatch is a CorruptShard (verify reads with ``check=False`` and recomputes every hash itself)."""
        # A writer (or gc) may replace the shard while we read it: re-check the commit record
        # afterwards and read again if it moved, so a reader never returns a torn or dropped slot.
        for _ in range(100):
            try:
                values, identity = self._read_slot(record.shard, record.slot, record.rows, out)
                error = None
            except Exception as exc:  # a slot replaced or removed under us reads as garbage
                values, identity, error = None, None, exc
            now = record if self._still_committed(record) else self.record(record.shard)
            if now is None or now.generation == record.generation:
                if error is not None:
                    raise integrity.corrupt(self, record.shard, f"unreadable ({type(error).__name__}: {error})",
                                            self.chunk_path(record.shard, record.slot))
                if check:  # the record is unchanged, so these bytes are the committed ones, or damage
                    integrity.check(self, record, values, identity)
                return values
            if now.rows != record.rows and out is not None:
                raise StoreError(f"shard {record.shard} of signal {self.name!r} changed its row count",
                                 "the store is damaged: run `flexfeed store verify`")
            record = now
        raise StoreError(f"shard {record.shard} of signal {self.name!r} keeps changing while read",
                         "pause the writers of this signal and retry")

    def read_shard(self, shard: int) -> np.ndarray:
        """The committed values of one shard; an error if it is not committed."""
        record = self.record(shard)
        if record is None:
            raise StoreError(
                f"shard {shard} of signal {self.name!r} is not committed",
                "run the stage that produces this signal (it computes only missing shards)",
            )
        return self._read_committed(record)

    def iter_shards(self, shards: Sequence[int] | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """Stream (shard, first_row, values) over committed shards; memory bounded by one shard."""
        records = self.records()
        for shard in (sorted(records) if shards is None else shards):
            self._check_shard(shard)
            record = records.get(shard)
            if record is None:
                raise StoreError(f"shard {shard} of signal {self.name!r} is not committed", "run its stage first")
            yield shard, shard * self.shard_rows, self._read_committed(record)

    def damaged_shards(self, shards: Sequence[int] | None = None) -> dict[int, str]:
        """Committed shards (of ``shards``, default all) whose data fails the read check, with why.

        A file already checked in this process costs one stat; any other is read and hashed once.
        """
        records = self.records()
        out = {}
        for shard in sorted(records if shards is None else set(shards) & set(records)):
            rec = records[shard]
            path = self.chunk_path(shard, rec.slot)
            try:
                if integrity.is_verified(file_identity(path, os.stat(path)), rec):
                    continue
            except OSError:
                pass  # missing: the read below says so
            try:
                self._read_committed(rec)
            except CorruptShard as exc:
                if self.record(shard) == rec:  # not recommitted meanwhile
                    out[shard] = exc.message
        return out

    def read_all(self) -> np.ndarray:
        """The whole signal as one array; every shard must be committed."""
        missing = sorted(set(range(self.num_shards)) - set(self.records()))
        if missing:
            raise StoreError(
                f"signal {self.name!r} lacks {len(missing)} of {self.num_shards} shards (first: {missing[0]})",
                "run the stage that produces it; committed shards are kept",
            )
        out = np.empty((self.num_rows, *self.meta.row_shape), dtype=self.dtype)
        for shard, record in sorted(self.records().items()):
            start, stop = self.shard_range(shard)
            self._read_committed(record, out[start:stop])  # straight into place, no second copy
        return out

    def read_rows(self, rows) -> np.ndarray:
        """Values of the given row ids (any order, repeats allowed), reading each shard once."""
        try:
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"row ids for signal {self.name!r} are not integers ({exc})",
                             "pass a list or array of row ids") from None
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            bad = int(rows[(rows < 0) | (rows >= self.num_rows)][0])
            raise StoreError(
                f"row {bad} is out of range for signal {self.name!r} ({self.num_rows} rows)",
                f"use row ids in 0..{self.num_rows - 1}",
            )
        out = np.empty((rows.size, *self.meta.row_shape), dtype=self.dtype)
        shard_of = rows // self.shard_rows
        for shard in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == shard)
            out[sel] = self.read_shard(int(shard))[rows[sel] - shard * self.shard_rows]
        return out

    # -- staleness ------------------------------------------------------------
    def shard_states(self, current_version: int | None = None, max_staleness: int | None = None) -> list[ShardState]:
        """Every shard with its version; stale = missing, or older than ``max_staleness`` steps.

        A version newer than ``current_version`` is stale as well: it was computed by a model this
        run has not reached (e.g. before a resume from an earlier checkpoint).
        """
        records = self.records()
        out = []
        for shard in range(self.num_shards):
            r = records.get(shard)
            stale = r is None or (
                current_version is not None and max_staleness is not None
                and not 0 <= current_version - r.version <= max_staleness
            )
            out.append(ShardState(shard, self.store_meta.rows_in_shard(shard), r is not None,
                                  None if r is None else r.version, None if r is None else r.model, stale))
        return out

    def stale_shards(self, current_version: int | None = None, max_staleness: int | None = None) -> list[int]:
        return [s.shard for s in self.shard_states(current_version, max_staleness) if s.stale]

    def state_hash(self) -> str:
        """Changes whenever any shard is (re)committed: what indexes are checked against."""
        return stable_hash(sorted((s, r.checksum, r.generation) for s, r in self.records().items()))


def _plain_chunks(array: zarr.Array) -> bool:
    """True when every chunk file holds raw native-order bytes (no compressor, no filter)."""
    codecs = getattr(array.metadata, "codecs", ())
    return (
        len(codecs) == 1 and isinstance(codecs[0], BytesCodec)
        and (codecs[0].endian is None or codecs[0].endian.value == sys.byteorder)
        and np.dtype(array.dtype).isnative
        and tuple(array.chunks) == (1, 1, *array.shape[2:])
    )


def _stat_identity(st: os.stat_result) -> tuple:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _write_file(path: Path, values: np.ndarray) -> None:
    """Replace ``path`` with the C-order bytes of ``values``: temp file, fsync, rename (gc removes a torn temp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb", buffering=0) as fh:
            view = memoryview(np.ascontiguousarray(values).reshape(-1).view(np.uint8))
            while view:
                view = view[fh.write(view):]
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
