"""What reads pay for checking their bytes (store/integrity.py), side by side in one run.

The same (rows, dim) float16 signal as bench/store_read.py, read whole (`read_all`) and streamed
(`iter_shards`), best of several interleaved repetitions with warm page caches:

* unchecked: the read path with the check switched off (the store before reads verified);
* first read: every shard hashed (xxh3-128), as at the first read of a store in a process;
* later reads: the shards already checked in this process (one fstat each, no hash);
* first read, blake2b: records written before the fast checksum existed;
* raw: the same bytes copied out of a numpy.memmap.

Throughput in MB/s and each read's ratio to the unchecked read. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from store_read import best_seconds, write_inputs  # noqa: E402  (the same store and raw file, timed alike)

from store import integrity  # noqa: E402
from store.store import Store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--shard-rows", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flexfeed-bench-") as tmp:
        raw, key = write_inputs(Path(tmp), args.rows, args.dim, args.shard_rows)
        sig = Store.open(Path(tmp) / "store").get(key)
        shape = (sig.num_rows, sig.dim)
        check, fast = integrity.check, integrity.fast_checksum

        def read(kind, mode):
            def run():
                integrity.check = (lambda *a: None) if mode == "unchecked" else check
                integrity.fast_checksum = (lambda a: "") if mode == "blake2b" else fast
                if mode in ("first", "blake2b"):
                    integrity.forget_all()
                try:
                    if kind == "whole":
                        return sig.read_all()
                    return sum(len(v) for _, _, v in sig.iter_shards())
                finally:
                    integrity.check, integrity.fast_checksum = check, fast
            return run

        def raw_whole():
            return np.array(np.memmap(raw, dtype=np.float16, mode="r", shape=shape))

        fns = {f"{kind}_{mode}": read(kind, mode) for kind in ("whole", "stream")
               for mode in ("unchecked", "first", "later", "blake2b")}
        fns["whole_raw"] = raw_whole
        seconds = best_seconds(fns, args.reps)
    mb = args.rows * args.dim * 2 / 1e6
    speed = {name: mb / s for name, s in seconds.items()}
    print(f"{mb:.0f} MB, {-(-args.rows // args.shard_rows)} shards; MB/s (ratio to unchecked)")
    for kind in ("whole", "stream"):
        base = speed[f"{kind}_unchecked"]
        print(f"{kind:<7}" + "".join(f"{mode:>10} {speed[f'{kind}_{mode}']:>6.0f} ({speed[f'{kind}_{mode}'] / base:.2f})"
                                     for mode in ("unchecked", "first", "later", "blake2b")))
    print(f"raw memmap copy {speed['whole_raw']:.0f} MB/s")
    print(json.dumps({"bench": "store_verify", **{k: round(v, 1) for k, v in speed.items()},
                      **{f"ratio_{k}": round(speed[k] / speed[k.split('_')[0] + '_unchecked'], 3)
                         for k in speed if k.split("_")[1] in ("first", "later", "blake2b")}}))


if __name__ == "__main__":
    main()
