"""Decisions at scale: seconds and peak memory of `less` and `near` on the trainer's own read path.

Synthetic unit-norm float16 features stand in for a stage's output (no model): each case writes them
into a fresh store (train rows in 4096-row shards, 500 target rows) under the keys of a stand-in stage,
with the `index` stage's FAISS index for `near`, and then a fresh process decides as the trainer does:
one `StoreSignals` per decision over the run's routes (a cache kept across decisions) and the registered
selector choosing 5 % of the rows. Later decisions of an unchanged store reuse what the run caches
(per-row results by the signals' state hashes, `near`'s loaded index), as in training. Cases (the default):

* `less`, 8192 dims, 2 checkpoints, N = 25k, 100k, 400k; 4 checkpoints at 100k;
* `near`, 384 dims (clustered, as embeddings are), N = 100k (exact index) and 1M (IVF).

Each case reports the first decision's seconds, the median of the later ones, the deciding process's
peak RSS (imports included) and the signals' bytes on disk (with `near`'s index). Judged (bench/_targets.py DECISION_SCALE):
peak RSS at 400k x 8192 x 2 checkpoints; its growth from 25k, less an allowance for the O(N) per-row
arrays; the spread of first-decision seconds per on-disk GB over the `less` cases (linear in bytes);
`near`'s later decisions at 1M. A case whose store would not fit the free disk (or memory, for the
index build) is skipped with the reason printed, and its figures count as missed. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import exit_on_misses, status_mb  # first: pins the thread count before numpy and torch load
from _targets import DECISION_SCALE

TARGET_ROWS = 500
SHARD_ROWS = 4096
SELECT_FRACTION = 0.05
LATER_DECISIONS = 3
O_N_BYTES_PER_ROW = 64
"""Allowance for the per-row arrays a decision keeps (scores, ranks, selection masks: 8 float64/int64 a row)."""

DEFAULT_CASES = [
    {"selector": "less", "rows": 25_000, "dim": 8192, "checkpoints": 2},
    {"selector": "less", "rows": 100_000, "dim": 8192, "checkpoints": 2},
    {"selector": "less", "rows": 400_000, "dim": 8192, "checkpoints": 2},
    {"selector": "less", "rows": 100_000, "dim": 8192, "checkpoints": 4},
    {"selector": "near", "rows": 100_000, "dim": 384, "checkpoints": 1},
    {"selector": "near", "rows": 1_000_000, "dim": 384, "checkpoints": 1},
]


class SyntheticFeatures:
    """The stage whose signal a case's features are stored under (never computed: every shard is written first)."""

    code_version = "bench-synthetic-1"

    def __init__(self, name: str, dim: int, checkpoint: int, lr: float):
        self.name, self.dim, self.checkpoint, self.lr = name, dim, checkpoint, lr

    def signal(self):
        from stages.base import SignalDesc

        spec = {"bench": "decision_scale", "checkpoint": {"step": self.checkpoint, "lr": self.lr}, "lr": self.lr}
        return SignalDesc(self.name, spec, dtype="float16", dim=self.dim)


class SyntheticRows:
    """A split's data as a decision sees it when every signal is committed: its size, fingerprint and domain."""

    domain_names = ["synthetic"]

    def __init__(self, fingerprint: str, num_rows: int):
        self.fingerprint, self.num_rows = fingerprint, num_rows

    def __len__(self) -> int:
        return self.num_rows

    def domain_ids(self) -> np.ndarray:
        return np.zeros(self.num_rows, dtype=np.int64)


def signal_plan(case: dict) -> dict[tuple[str, str], list[SyntheticFeatures]]:
    """The stand-in stages of each (signal, split) the case's selector reads, one per checkpoint."""
    dim, ckpts = case["dim"], case["checkpoints"]
    if case["selector"] == "near":
        return {(name, split): [SyntheticFeatures("embed", dim, 0, 1.0)]
                for name, split in (("embed", "train"), ("embed", "target"))}
    lrs = [2e-5 * (1 - i / (2 * ckpts)) for i in range(ckpts)]  # a decaying schedule: distinct weights
    return {("grads", "train"): [SyntheticFeatures("grads", dim, i + 1, lrs[i]) for i in range(ckpts)],
            ("grads_sgd", "target"): [SyntheticFeatures("grads_sgd", dim, i + 1, lrs[i]) for i in range(ckpts)]}


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)


def features(case: dict, split: str, variant: int, start: int, stop: int, centres: np.ndarray | None) -> np.ndarray:
    """Rows start..stop of one signal: seeded by position, so a shard's values never depend on the others."""
    rng = np.random.default_rng([variant, 0 if split == "train" else 1, start])
    if centres is None:  # uniform draws: a third of normal ones' time, and scores cost the same on any values
        return _unit(rng.random((stop - start, case["dim"]), dtype=np.float32) - np.float32(0.5))
    pick = centres[rng.integers(0, len(centres), stop - start)]
    return _unit(pick + 0.5 * rng.standard_normal(pick.shape, dtype=np.float32))


def stores(root: Path, rows: int):
    from store.store import Store

    train = Store.open_or_create(root / "train", dataset_fingerprint=f"synthetic-train-{rows}", num_rows=rows,
                                 shard_rows=SHARD_ROWS)
    target = Store.open_or_create(root / "target", dataset_fingerprint="synthetic-target", num_rows=TARGET_ROWS,
                                  shard_rows=SHARD_ROWS)
    return train, target


def write_case(case: dict, root: Path) -> None:
    """Write every signal of the case (and `near`'s index, as `flexfeed stage index` builds it)."""
    from stages.runner import stage_signal
    from store.faiss_index import build_index

    train, target = stores(root, case["rows"])
    centres = None
    if case["selector"] == "near":
        centres = np.random.default_rng(7).standard_normal((256, case["dim"])).astype(np.float32)
    for (_, split), variants in signal_plan(case).items():
        store = train if split == "train" else target
        for i, stage in enumerate(variants):
            sig = stage_signal(stage, store)
            for shard in range(sig.num_shards):
                start, stop = sig.shard_range(shard)
                sig.write_shard(shard, features(case, split, i, start, stop, centres), model="synthetic")
    if case["selector"] == "near":
        t0 = time.perf_counter()
        index = build_index(stage_signal(signal_plan(case)[("embed", "train")][0], train))
        print(f"  built {index.describe()} in {time.perf_counter() - t0:.1f} s; writer's peak RSS "
              f"{status_mb('VmHWM'):.0f} MB", flush=True)


def decide_case(case: dict, root: Path) -> dict:
    """In a fresh process: one first and LATER_DECISIONS later decisions, timed, and the peak RSS."""
    from pipeline.config import RunConfig
    from pipeline.config.groups import FlexArgs, RefreshArgs
    from pipeline.plan import rng_for
    from pipeline.prepared import Prepared
    from pipeline.refresh import SignalRoute, StoreSignals, ValueCache
    from pipeline.shard_scoring import ShardScorer
    from pipeline.strategies import DecisionContext
    from pipeline.strategies.registry import SELECTORS
    from stages.args import (
        DataArgs,
        EmbedArgs,
        GradsArgs,
        IndexArgs,
        LossArgs,
        ModelArgs,
        RunnerArgs,
        StoreArgs,
    )

    cfg = RunConfig(model=ModelArgs(), data=DataArgs(), store=StoreArgs(), runner=RunnerArgs(), embed=EmbedArgs(),
                    loss=LossArgs(), grads=GradsArgs(), index=IndexArgs(), training={}, flex=FlexArgs(),
                    refresh=RefreshArgs())
    train, target = stores(root, case["rows"])
    rows = case["rows"]
    p = Prepared(tokenizer=None, train=SyntheticRows(train.meta.dataset_fingerprint, rows),
                 target=SyntheticRows(target.meta.dataset_fingerprint, TARGET_ROWS), train_store=train,
                 target_store=target)
    routes = {key: SignalRoute(key[0], key[1], live=False, stages=stages) for key, stages in signal_plan(case).items()}
    selector = SELECTORS.build(case["selector"], {})
    cache, scorer = ValueCache(), ShardScorer()  # the run's, as DecisionContexts keeps them across decisions
    times = []
    for decision in range(1 + LATER_DECISIONS):
        t0 = time.perf_counter()
        source = StoreSignals(cfg, p, decision, routes, cache=cache, scorer=scorer)
        ctx = DecisionContext(step=decision, num_rows=rows, domain_ids=p.train.domain_ids(),
                              domain_names=p.train.domain_names, rng=rng_for(0, 99, decision), signals=source,
                              target_domain_ids=p.target.domain_ids(), log=source.log)
        selection = selector.select(ctx, int(rows * SELECT_FRACTION))
        times.append(time.perf_counter() - t0)
        assert len(selection.indices) == int(rows * SELECT_FRACTION)
    return {"first_s": round(times[0], 3), "later_s": round(statistics.median(times[1:]), 3),
            "peak_rss_mb": round(status_mb("VmHWM"), 1)}


def disk_mb(root: Path) -> float:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 1e6


def expected_disk_mb(case: dict) -> float:
    """float16 train and target rows of every checkpoint (a short last shard holds only its rows)."""
    return 2 * case["checkpoints"] * (case["rows"] + TARGET_ROWS) * case["dim"] / 1e6


def skip_reason(case: dict, where: Path) -> str | None:
    """Why a case cannot run here (None when it can): its store must fit the free disk with room to spare."""
    need = expected_disk_mb(case) * (1.6 if case["selector"] == "near" else 1.0)  # + the index file
    free = shutil.disk_usage(where).free / 1e6
    if need > 0.8 * free:
        return f"needs {need / 1e3:.1f} GB of disk, {free / 1e3:.1f} GB free at {where}"
    return None


def rss_cap_mb() -> float:
    """The most a deciding process may hold: 60 % of the memory available now (the machine is shared)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return 0.6 * int(line.split()[1]) / 1024
    return float("inf")


def run_child(mode: str, case: dict, root: Path) -> dict:
    """Run one step of a case in a fresh process; stopped (an error naming the cap) when its RSS passes the cap."""
    cap = rss_cap_mb()
    child = subprocess.Popen([sys.executable, __file__, f"--{mode}", json.dumps(case), str(root)], text=True,
                             stdout=subprocess.PIPE, env=dict(os.environ))
    status = Path(f"/proc/{child.pid}/status")
    while child.poll() is None:
        try:
            rss = next(int(x.split()[1]) / 1024 for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
        except (OSError, StopIteration):
            rss = 0.0
        if rss > cap:
            child.kill()
            child.wait()
            raise MemoryError(f"{mode} of {case} passed {cap:.0f} MB resident and was stopped")
        time.sleep(0.2)
    lines = child.stdout.read().strip().splitlines()
    if child.returncode != 0:
        raise subprocess.CalledProcessError(child.returncode, f"{mode} {case}")
    for line in lines[:-1]:
        print(line, flush=True)
    return json.loads(lines[-1])


def run_case(case: dict, base: Path) -> dict:
    root = Path(tempfile.mkdtemp(dir=base, prefix=f"{case['selector']}-{case['rows']}-"))
    try:
        t0 = time.perf_counter()
        run_child("write", case, root)
        written = time.perf_counter() - t0
        signals_mb = sum(disk_mb(d / "signals") for d in (root / "train", root / "target"))
        result = run_child("decide", case, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = {**case, **result, "disk_mb": round(signals_mb, 1)}
    print(f"{case['selector']:<5}{case['rows']:>9}{case['dim']:>6}{case['checkpoints']:>4}"
          f"{out['first_s']:>9.2f}{out['later_s']:>9.2f}{out['peak_rss_mb']:>10.0f}{out['disk_mb']:>10.0f}"
          f"   (written in {written:.0f} s)", flush=True)
    return out


def figures(cases: list[dict]) -> dict:
    """The judged figures and the slopes they come from (absent when a case they need did not run)."""
    def find(sel, rows, ckpts=None):
        return next((c for c in cases if c["selector"] == sel and c["rows"] == rows
                     and (ckpts is None or c["checkpoints"] == ckpts)), None)

    out: dict = {"slopes": {}}
    less = [c for c in cases if c["selector"] == "less"]
    per_gb = {f"{c['rows']}x{c['checkpoints']}": round(c["first_s"] / (c["disk_mb"] / 1e3), 3) for c in less}
    out["slopes"]["less_first_s_per_gb"] = per_gb
    if len(per_gb) >= 2:
        out["slopes"]["less_s_per_gb_spread"] = round(max(per_gb.values()) / min(per_gb.values()), 3)
    small, big = find("less", 25_000, 2), find("less", 400_000, 2)
    if big is not None:
        out["less_400k_peak_rss_mb"] = big["peak_rss_mb"]
    if small is not None and big is not None:
        allowance = O_N_BYTES_PER_ROW * (big["rows"] - small["rows"]) / 2**20
        out["slopes"]["rss_growth_25k_to_400k"] = round((big["peak_rss_mb"] - allowance) / small["peak_rss_mb"], 3)
        out["slopes"]["rss_mb_per_100k_rows"] = round(
            (big["peak_rss_mb"] - small["peak_rss_mb"]) / ((big["rows"] - small["rows"]) / 1e5), 1)
    near = find("near", 1_000_000)
    if near is not None:
        out["near_1m_later_s"] = near["later_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-scale", type=float, default=1.0,
                        help="multiply every case's rows (a quick look: 0.05); the targets judge only 1.0")
    parser.add_argument("--only", default="", help="comma-separated selectors to run (default: all)")
    parser.add_argument("--dir", default=None, help="where the temporary stores go (default: system temp)")
    parser.add_argument("--write", nargs=2, metavar=("CASE", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--decide", nargs=2, metavar=("CASE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        write_case(json.loads(args.write[0]), Path(args.write[1]))
        print(json.dumps({"written": True}))
        return
    if args.decide:
        print(json.dumps(decide_case(json.loads(args.decide[0]), Path(args.decide[1]))))
        return
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} cpus={os.cpu_count()}; "
          f"load {os.getloadavg()[0]:.2f}; each case decides in a fresh process", flush=True)
    wanted = set(filter(None, args.only.split(",")))
    base = Path(tempfile.mkdtemp(dir=args.dir, prefix="flexfeed-decision-scale-"))
    cases, skipped = [], []
    print(f"{'case':<5}{'rows':>9}{'dim':>6}{'ckp':>4}{'first s':>9}{'later s':>9}{'peak MB':>10}{'disk MB':>10}")
    try:
        for case in DEFAULT_CASES:
            case = {**case, "rows": max(SHARD_ROWS, int(case["rows"] * args.rows_scale))}
            if wanted and case["selector"] not in wanted:
                skipped.append({**case, "why": "not in --only"})
                continue
            why = skip_reason(case, base)
            if why is not None:
                skipped.append({**case, "why": why})
                continue
            try:
                cases.append(run_case(case, base))
            except MemoryError as exc:
                skipped.append({**case, "why": str(exc)})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for s in skipped:
        print(f"skipped {s['selector']} {s['rows']} x {s['dim']} x {s['checkpoints']}: {s['why']}", flush=True)
    summary = {"bench": "decision_scale", "cases": cases, "rows_scale": args.rows_scale, **figures(cases),
               "skipped": [f"{s['selector']} {s['rows']}: {s['why']}" for s in skipped]}
    judged = {**summary, **summary["slopes"]}
    print(json.dumps(summary), flush=True)
    if args.rows_scale == 1.0:
        exit_on_misses(judged, DECISION_SCALE)


if __name__ == "__main__":
    main()
