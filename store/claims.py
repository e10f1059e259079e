"""Claims: a shard being computed is claimed, so a second job on the same store leaves it to the first.

The shard lock covers a commit (milliseconds); a claim covers the computation (seconds to minutes, on
any machine of a Dask cluster). A claim is a small file, `signals/<key>/claims/NNNNNN.json`, naming its
owner (host, pid, a random token per job) and a heartbeat time the owner rewrites every `heartbeat_s`.
Another job skips a claimed shard and comes back to it at the end: by then it is committed (nothing to
do), or its claim is stale and is taken over. A claim is stale when its heartbeat is older than
`stale_s`, or at once when its owner is a process of this host that no longer exists (a killed job's
rerun does not wait). Reading, taking and renewing a claim happen under a short flock of
`locks/claim-NNNNNN.lock`, so two jobs never both take one over.

A job that ends normally or by an exception removes its claims; a killed one leaves them for the
next job (or `store gc`) to find stale.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections import deque
from pathlib import Path

from .atomic import atomic_write_json
from .layout import CLAIMS_DIR, LOCKS_DIR, shard_file
from .locks import FileLock

HEARTBEAT_S = 5.0
STALE_S = 60.0
POLL_S = 0.2
_HOST = socket.gethostname()


def claim_path(sig, shard: int) -> Path:
    return sig.dir / CLAIMS_DIR / f"{shard_file(shard)}.json"


def claim_lock_path(sig, shard: int) -> Path:
    return sig.dir / LOCKS_DIR / f"claim-{shard_file(shard)}.lock"


def read_claim(path: Path) -> dict | None:
    """The claim at ``path``; None when there is none. A torn or garbled claim reads as a stale one."""
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"token": "", "heartbeat_at": 0.0}
    return obj if isinstance(obj, dict) else {"token": "", "heartbeat_at": 0.0}


def _process_gone(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by another user
        return False
    try:  # a killed job its parent has not reaped yet is a zombie: gone all the same
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[-1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def is_stale(claim: dict, stale_s: float = STALE_S, now: float | None = None) -> bool:
    """Whether a claim no longer protects its shard: no heartbeat for ``stale_s``, or a dead owner on this host."""
    beat = claim.get("heartbeat_at")
    if not isinstance(beat, (int, float)) or (now or time.time()) - beat > stale_s:
        return True
    return claim.get("host") == _HOST and _process_gone(claim.get("pid"))


class ShardClaims:
    """One job's claims on the shards of one signal, kept alive by a heartbeat thread until ``close``."""

    def __init__(self, sig, *, stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S):
        self.sig = sig
        self.stale_s = stale_s
        self.heartbeat_s = heartbeat_s
        self.token = uuid.uuid4().hex
        self.held: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _mutex(self, shard: int) -> FileLock:
        return FileLock(claim_lock_path(self.sig, shard), timeout_s=30, what=f"claim of shard {shard}", note_pid=False)

    def _write(self, shard: int, claimed_at: float) -> None:
        atomic_write_json(claim_path(self.sig, shard), {
            "host": _HOST, "pid": os.getpid(), "token": self.token, "signal": self.sig.name,
            "claimed_at": claimed_at, "heartbeat_at": time.time()})

    def try_claim(self, shard: int) -> bool:
        """Claim a shard unless another job holds a live claim on it."""
        with self._mutex(shard):
            current = read_claim(claim_path(self.sig, shard))
            if current is not None and current.get("token") != self.token and not is_stale(current, self.stale_s):
                return False
            self._write(shard, time.time())
        with self._lock:
            self.held.add(shard)
        self._start()
        return True

    def holder(self, shard: int) -> dict | None:
        """The live claim another job holds on a shard (None: free, stale or ours)."""
        current = read_claim(claim_path(self.sig, shard))
        if current is None or current.get("token") == self.token or is_stale(current, self.stale_s):
            return None
        return current

    def release(self, shard: int) -> None:
        """Drop our claim (the shard is committed, or this job gives up on it)."""
        with self._lock:
            self.held.discard(shard)
        try:
            with self._mutex(shard):
                path = claim_path(self.sig, shard)
                current = read_claim(path)
                if current is not None and current.get("token") == self.token:
                    path.unlink(missing_ok=True)
        except OSError:
            pass  # a claim left behind goes stale; releasing must not hide the error that ends a job

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                shards = sorted(self.held)
            for shard in shards:
                try:
                    with self._mutex(shard):
                        current = read_claim(claim_path(self.sig, shard))
                        if current is not None and current.get("token") == self.token:
                            self._write(shard, current.get("claimed_at", time.time()))
                except Exception:  # noqa: BLE001 - a missed beat only ages the claim; the job goes on
                    continue

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="flexfeed-claims", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the heartbeat and drop every claim still held."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for shard in sorted(self.held):
            self.release(shard)


class ClaimedShards:
    """The shards a job must compute, handed out one at a time as it claims them.

    `take` returns an unclaimed shard (claimed now), skipping those another job holds; once none is left
    it waits (``block``) for the skipped ones: each is either committed by its holder (then it is counted
    in ``elsewhere``) or taken over when its claim goes stale. A shard counts as done by another job when
    its commit generation moved since this job planned it.
    """

    def __init__(self, sig, todo: list[int], claims: ShardClaims, poll_s: float = POLL_S):
        self.sig = sig
        self.claims = claims
        self.poll_s = poll_s
        self.planned = {s: self._generation(s) for s in todo}
        self.pending = deque(todo)
        self.waiting: list[int] = []
        self.elsewhere: list[int] = []

    def _generation(self, shard: int) -> int | None:
        rec = self.sig.record(shard)
        return None if rec is None else rec.generation

    def _done(self, shard: int) -> bool:
        if self._generation(shard) != self.planned[shard]:
            self.elsewhere.append(shard)
            return True
        return False

    def _claim(self, shard: int) -> bool:
        """Claim a shard not yet done; False if another job holds it or has just committed it."""
        if not self.claims.try_claim(shard):
            return False
        if self._done(shard):  # committed by another job between our plan (or last look) and our claim
            self.claims.release(shard)
            return False
        return True

    def take(self, block: bool = True) -> int | None:
        """The next shard this job computes (claimed), or None when every shard is done or, unless ``block``,
        held by another job."""
        while self.pending:
            shard = self.pending.popleft()
            if self._done(shard):
                continue
            if self._claim(shard):
                return shard
            if not self.elsewhere or self.elsewhere[-1] != shard:
                self.waiting.append(shard)
        while block and self.waiting:
            for shard in list(self.waiting):
                if self._done(shard):
                    self.waiting.remove(shard)
                elif self._claim(shard):
                    self.waiting.remove(shard)
                    return shard
                elif self.elsewhere and self.elsewhere[-1] == shard:
                    self.waiting.remove(shard)
            time.sleep(self.poll_s)
        return None

    def finish(self, shard: int) -> None:
        """This job committed the shard: drop its claim."""
        self.claims.release(shard)
