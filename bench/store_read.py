"""Read throughput of the signal store against a raw numpy.memmap of the same bytes, side by side.

Writes a (200000, 512) float16 signal with 4096-row shards into a temporary store and the same
bytes into a flat file, then times, best of several interleaved repetitions, with warm page caches
for both:

* streaming: ``Signal.iter_shards`` against copying the memmap one shard-sized block at a time;
* whole: ``Signal.read_all`` against copying the whole memmap into one array.

Both paths materialise every byte in process memory (the store hands out arrays; the memmap side
copies its pages into an array) and then reduce a strided sample of it, so they do the same work.
Peak RSS while streaming is measured in a fresh subprocess: it must stay below the baseline of that
process after imports and opening the store, plus two shards, plus a fixed 16 MiB allowance for
allocator slack. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import exit_on_misses, reset_peak_rss, status_mb  # noqa: E402
from _targets import STORE_READ  # noqa: E402

from store.store import Store  # noqa: E402

RSS_ALLOWANCE_MB = 16.0
FINGERPRINT = "bench0000000000000000"


def _touch(values: np.ndarray) -> float:
    # a strided reduction proves the bytes are there without timing float16 arithmetic
    return float(values.reshape(-1)[::4099].astype(np.float32).sum())


def write_inputs(root: Path, num_rows: int, dim: int, shard_rows: int) -> tuple[Path, str]:
    """The signal in a store and the same bytes in a raw file; returns (raw file, signal key)."""
    st = Store.create(root / "store", dataset_fingerprint=FINGERPRINT, num_rows=num_rows, shard_rows=shard_rows)
    sig = st.signal("bench", {"bench": "store_read"}, dtype="float16", dim=dim)
    raw = root / "raw.f16"
    rng = np.random.default_rng(0)
    with open(raw, "wb") as fh:
        for shard in range(sig.num_shards):
            start, stop = sig.shard_range(shard)
            values = rng.standard_normal((stop - start, dim), dtype=np.float32).astype(np.float16)
            sig.write_shard(shard, values)
            fh.write(values.tobytes())
    return raw, sig.key


def best_seconds(fns: dict, reps: int) -> dict[str, float]:
    """Best time of each function; repetitions interleaved so load from other processes hits all alike."""
    for fn in fns.values():
        fn()  # warm the page cache and the code paths
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}


def measure(root: Path, raw: Path, key: str, reps: int) -> dict:
    sig = Store.open(root / "store").get(key)
    shape = (sig.num_rows, sig.dim)
    nbytes = sig.num_rows * sig.dim * 2

    def store_stream():
        return sum(_touch(values) for _, _, values in sig.iter_shards())

    def raw_stream():
        mm = np.memmap(raw, dtype=np.float16, mode="r", shape=shape)
        total = 0.0
        for start in range(0, shape[0], sig.shard_rows):
            total += _touch(np.array(mm[start : start + sig.shard_rows]))
        return total

    def store_whole():
        return _touch(sig.read_all())

    def raw_whole():
        return _touch(np.array(np.memmap(raw, dtype=np.float16, mode="r", shape=shape)))

    assert np.isclose(store_stream(), raw_stream()), "the store and the raw file disagree"
    t = best_seconds({"store_stream": store_stream, "raw_stream": raw_stream,
                      "store_whole": store_whole, "raw_whole": raw_whole}, reps)
    return {name: nbytes / sec / 1e6 for name, sec in t.items()}


def rss_child(root: str, key: str) -> None:
    """Run in a fresh process: stream the whole signal and print baseline and peak RSS in MiB."""
    sig = Store.open(root).get(key)
    sig.record(0)
    base = status_mb("VmRSS")
    hwm_reset = reset_peak_rss()  # restart the kernel's high-water mark here, so the import peak does not count
    for _, _, values in sig.iter_shards():
        _touch(values)
    # VmHWM belongs to this process image (ru_maxrss would carry the parent's peak across exec)
    peak = status_mb("VmHWM")
    print(json.dumps({"baseline_mb": base, "peak_mb": peak, "hwm_reset": hwm_reset}))


def measure_rss(root: Path, key: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(root / "store"), key],
                         capture_output=True, text=True, check=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--shard-rows", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--dir", default=None, help="where to put the temporary store (default: system temp)")
    parser.add_argument("--rss-child", nargs=2, metavar=("STORE", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    import zarr

    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} "
          f"zarr async.concurrency={zarr.config.get('async.concurrency')} "
          f"zarr threading.max_workers={zarr.config.get('threading.max_workers')} cpus={os.cpu_count()}")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="flexfeed-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        raw, key = write_inputs(root, args.rows, args.dim, args.shard_rows)
        mb = args.rows * args.dim * 2 / 1e6
        print(f"wrote {mb:.1f} MB as {-(-args.rows // args.shard_rows)} shards in {time.perf_counter() - t0:.2f} s")
        speed = measure(root, raw, key, args.reps)
        rss = measure_rss(root, key)
    print(f"{'path':<10}{'store MB/s':>12}{'raw MB/s':>12}{'ratio':>8}")
    for kind in ("stream", "whole"):
        s, r = speed[f"store_{kind}"], speed[f"raw_{kind}"]
        print(f"{kind:<10}{s:>12.0f}{r:>12.0f}{s / r:>8.2f}")
    shard_mb = args.shard_rows * args.dim * 2 / 2**20
    limit = rss["baseline_mb"] + 2 * shard_mb + RSS_ALLOWANCE_MB
    grow = rss["peak_mb"] - rss["baseline_mb"]
    print(f"streaming RSS: baseline {rss['baseline_mb']:.1f} MiB, peak {rss['peak_mb']:.1f} MiB "
          f"(+{grow:.1f}); limit baseline + 2 x {shard_mb:.1f} MiB shard + {RSS_ALLOWANCE_MB:.0f} MiB = {limit:.1f}")
    # the ratio that counts is the worse of the two access patterns
    kind = min(("stream", "whole"), key=lambda k: speed[f"store_{k}"] / speed[f"raw_{k}"])
    summary = {
        "bench": "store_read", "ratio": round(speed[f"store_{kind}"] / speed[f"raw_{kind}"], 3),
        "ratio_stream": round(speed["store_stream"] / speed["raw_stream"], 3),
        "ratio_whole": round(speed["store_whole"] / speed["raw_whole"], 3),
        "store_mb_s": round(speed[f"store_{kind}"], 1), "raw_mb_s": round(speed[f"raw_{kind}"], 1),
        "peak_rss_mb": round(rss["peak_mb"], 1), "baseline_rss_mb": round(rss["baseline_mb"], 1),
        "shard_mb": round(shard_mb, 2), "rss_limit_mb": round(limit, 1), "rss_ok": rss["peak_mb"] <= limit,
    }
    print(json.dumps(summary), flush=True)
    exit_on_misses(summary, STORE_READ)


if __name__ == "__main__":
    main()
