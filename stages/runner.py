"""Fan a stage's missing or stale shards out as Dask tasks; each task commits its own shard.

Resume is the store's: committed shards are skipped, so a rerun after a crash computes only what is
left and a rerun after success starts no cluster at all. Retries are Dask's. Each worker process
sets a stage up once (loads its model) and reuses it for every shard it gets.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from stages.args import RunnerArgs
from stages.base import Stage
from store.claims import ClaimedShards, ShardClaims
from store.errors import DamagedFile, FlexfeedError, StoreError
from store.hashing import stable_hash
from store.store import Store

INLINE = "inline"  # scheduler value: run in this process, no Dask (refresh during training, tiny jobs)

# Per-process cache of set-up stages: the model is loaded once per worker, not once per shard.
_READY: dict[str, Stage] = {}


def stage_token(stage: Stage) -> str:
    desc = stage.signal()
    return stable_hash({"cls": type(stage).__qualname__, "name": desc.name, "spec": desc.spec})


def _ready_stage(stage: Stage, threads: int) -> Stage:
    token = stage_token(stage)
    ready = _READY.get(token)
    if ready is None:
        import torch  # deferred: only a worker setting a stage up needs torch, not the driver module

        torch.set_num_threads(max(1, threads))
        stage.setup()
        _READY[token] = ready = stage
    return ready


def compute_and_commit(stage: Stage, store_root: str, key: str, shard: int, rows: dict, version: int,
                       model: str, threads: int = 1) -> tuple[int, int, float]:
    """One task: compute a shard's values and commit them. Returns (shard, rows, seconds)."""
    t0 = time.perf_counter()
    ready = _ready_stage(stage, threads)
    values = ready.compute(rows)
    seconds = time.perf_counter() - t0
    sig = Store.open(store_root).get(key)
    sig.write_shard(shard, values, version=version, model=model, lock_timeout_s=600, seconds=seconds)
    return shard, len(values), seconds


@dataclass
class RunResult:
    """What a stage run did: the signal, shards computed and skipped, rows, seconds."""

    signal: str
    key: str
    computed: list[int] = field(default_factory=list)
    skipped: int = 0
    rows: int = 0
    seconds: float = 0.0
    note: str = ""
    """What was done, when it is not shards of rows (an index built or reused)."""
    damaged: list[int] = field(default_factory=list)
    """Committed shards whose data failed its checksum: recomputed, never counted as reused."""
    elsewhere: list[int] = field(default_factory=list)
    """Shards this run had to compute that another job on the same store computed meanwhile (it claimed them)."""

    def summary(self) -> str:
        if self.note:
            return f"{self.signal}: {self.note}"
        if not self.computed and not self.elsewhere:
            return f"{self.signal}: all {self.skipped} shards reused from the store, nothing recomputed"
        damaged = (f" ({len(self.damaged)} of them committed but damaged: {_ids(self.damaged)})"
                   if self.damaged else "")
        elsewhere = f", {len(self.elsewhere)} computed by another job meanwhile" if self.elsewhere else ""
        return (f"{self.signal}: computed {len(self.computed)} shards ({self.rows} rows) in {self.seconds:.1f} s"
                f"{damaged}{elsewhere}, reused {self.skipped}")


def _ids(shards: list[int]) -> str:
    return ", ".join(map(str, shards[:8])) + (", ..." if len(shards) > 8 else "")


def default_workers(args: RunnerArgs) -> int:
    """runner.n_workers (RunnerArgs checks its range), else cores // threads_per_worker, at least 1."""
    if args.n_workers is not None:
        return args.n_workers
    return max(1, (os.cpu_count() or 1) // args.threads_per_worker)


def stage_signal(stage: Stage, store: Store):
    """The store signal a stage writes (created empty if new, with the stage's sources as metadata)."""
    desc = stage.signal()
    return store.signal(desc.name, desc.spec, dtype=desc.dtype, dim=desc.dim, sources=desc.sources)


def existing_signal(stage: Stage, store: Store):
    """The store signal a stage writes, or None when the store has none yet (a reader creates nothing)."""
    desc = stage.signal()
    try:
        return store.get(store.signal_key(desc.name, desc.spec, desc.dtype, desc.dim))
    except StoreError as exc:
        if isinstance(exc, DamagedFile):
            raise
        return None


def plan_shards(stage: Stage, store: Store, *, version: int | None = None, max_staleness: int | None = None,
                shards: list[int] | None = None):
    """The signal, the shards a run must compute (missing, stale under the policy, or damaged), and the damaged.

    A committed shard is reused only once its data passed the read check (its checksum; one hash per
    shard and process, see store.integrity), so a shard overwritten on disk is recomputed, not reused.
    """
    sig = stage_signal(stage, store)
    todo = set(sig.stale_shards(version, max_staleness))
    wanted = set(range(sig.num_shards)) if shards is None else set(shards)
    damaged = sorted(sig.damaged_shards(sorted(wanted - todo)))
    return sig, sorted((todo | set(damaged)) & wanted), damaged


def run_stage(stage: Stage, data, store: Store, runner: RunnerArgs | None = None, *, version: int | None = None,
              max_staleness: int | None = None, shards: list[int] | None = None, progress: bool = True,
              ) -> RunResult:
    """Compute and commit every missing (or stale) shard of the stage's signal for `data`."""
    runner = runner or RunnerArgs()
    store.check_dataset(data.fingerprint)
    sig, todo, damaged = plan_shards(stage, store, version=version, max_staleness=max_staleness, shards=shards)
    total = sig.num_shards if shards is None else len(shards)
    result = RunResult(signal=sig.name, key=sig.key, skipped=total - len(todo), damaged=damaged)
    if not todo:
        if not store.read_only:  # a reader of a read-only store writes nothing, not even its log line
            store.log_stage(stage=sig.name, key=sig.key, computed=0, skipped=result.skipped, rows=0, seconds=0.0)
        return result
    step, model = stage.model_version()
    step = step if version is None else version
    t0 = time.perf_counter()
    bar = _progress(len(todo), sig.name, progress)
    try:
        try:
            _compute(stage, data, store, sig, todo, step, model, runner, result, bar)
        except BaseException:
            store.drop_if_empty(sig)  # a run that failed before its first commit leaves no empty signal behind
            raise
    finally:
        bar.close()
    result.seconds = time.perf_counter() - t0
    result.computed.sort()
    store.log_stage(stage=sig.name, key=sig.key, computed=len(result.computed), skipped=result.skipped,
                    rows=result.rows, seconds=round(result.seconds, 3))
    return result


def _compute(stage, data, store, sig, todo, step, model, runner, result, bar) -> None:
    """Compute and commit the shards of ``todo``, in this process or as Dask tasks, counting into ``result``.

    Each shard is claimed before it is computed (store.claims): a shard another job on the same store is
    computing is skipped, then waited for at the end (or taken over if that job died), never computed twice.
    """
    claims = ShardClaims(sig)
    queue = ClaimedShards(sig, todo, claims)
    try:
        if runner.scheduler == INLINE:
            while (shard := queue.take()) is not None:
                start, stop = sig.shard_range(shard)
                _, n, _ = compute_and_commit(stage, str(store.root), sig.key, shard, data.rows(start, stop), step,
                                             model, runner.threads_per_worker)
                queue.finish(shard)
                _count(result, bar, shard, n)
        else:
            _run_dask(stage, data, store, sig, queue, step, model, runner, result, bar)
    finally:
        claims.close()
        result.elsewhere = sorted(queue.elsewhere)


def _count(result: RunResult, bar, shard: int, rows: int) -> None:
    result.computed.append(shard)
    result.rows += rows
    bar.update(1)
    bar.set_postfix(rows=result.rows)


def _progress(total: int, name: str, enabled: bool):
    return tqdm(total=total, unit="shard", desc=f"stage {name}", disable=not enabled, leave=False)


def open_client(runner: RunnerArgs):
    """A Dask client: the given scheduler, or a LocalCluster on loopback sized to the cores."""
    from distributed import Client, LocalCluster

    if runner.scheduler:
        try:
            return Client(runner.scheduler, timeout="20s"), None
        except OSError as exc:
            raise FlexfeedError(f"cannot reach the Dask scheduler at {runner.scheduler}: {exc}",
                                "start it with `dask scheduler`, or drop runner.scheduler to use this machine") from None
    threads = max(1, runner.threads_per_worker)
    # Workers inherit the environment: pin BLAS/torch threads so workers x threads fits the cores.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    cluster = LocalCluster(n_workers=default_workers(runner), threads_per_worker=1, processes=True,
                           host="127.0.0.1", dashboard_address=None, worker_dashboard_address=None,
                           silence_logs=50)
    return Client(cluster), cluster


def _run_dask(stage, data, store, sig, queue, step, model, runner, result, bar) -> None:
    from distributed import as_completed

    client, cluster = open_client(runner)
    try:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})) or default_workers(runner))
        in_flight = runner.max_in_flight or 2 * n_workers
        futures = as_completed()
        running = 0

        def top_up(block: bool) -> None:
            # bounded submission keeps the driver's memory flat whatever the dataset size; shards other jobs
            # hold are waited for (block) only once nothing of ours is left in flight
            nonlocal running
            while running < in_flight:
                shard = queue.take(block=block and running == 0)
                if shard is None:
                    return
                start, stop = sig.shard_range(shard)
                futures.add(client.submit(
                    compute_and_commit, stage, str(store.root), sig.key, shard, data.rows(start, stop), step, model,
                    runner.threads_per_worker, retries=runner.retries, pure=False,
                    key=f"{sig.name}-{sig.key}-{shard}-{time.time_ns()}"))
                running += 1

        top_up(block=False)
        while True:
            for fut in futures:
                shard, n, _ = fut.result()
                running -= 1
                queue.finish(shard)
                _count(result, bar, shard, n)
                fut.release()
                top_up(block=False)
            top_up(block=True)
            if running == 0:
                break
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
