"""Two `flexfeed stage all` on one store at once: each shard is computed once, by one of them (it claims the
shard; the other skips it and waits at the end), both exit 0 and the store verifies clean."""

from __future__ import annotations

import re
import subprocess
import sys

from store.maintenance import verify
from store.store import Store
from tests.helpers.run_fixtures import make_run_dir
from tests.helpers.store_helpers import REPO, child_env

SOAK_STAGE = REPO / "tests" / "helpers" / "soak_stage.py"


def test_two_concurrent_stage_all_compute_every_shard_once(tiny_checkpoint, tmp_path):
    cfg = make_run_dir(tmp_path, tiny_checkpoint)
    store = tmp_path / "store"
    # a pause per shard (soak_stage.py: the CLI exactly, plus a sleep) so the two jobs overlap throughout
    jobs = [subprocess.Popen([sys.executable, str(SOAK_STAGE), "0.15", "stage", "all", str(cfg), "shard_rows=4",
                              f"store={store}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=child_env(), cwd=REPO) for _ in range(2)]
    outs = [job.communicate(timeout=600) for job in jobs]
    for job, (_, err) in zip(jobs, outs):
        assert job.returncode == 0, err
    computed = [int(re.search(r"^recomputed_shards=(\d+)$", out, re.M).group(1)) for out, _ in outs]
    stores = [Store.open(p) for p in sorted(store.iterdir()) if p.is_dir()]
    shards = sum(sig.num_shards for st in stores for sig in st.signals())
    indexes = sum(1 for st in stores for sig in st.signals() if (sig.dir / "index").is_dir())
    assert sum(computed) == shards + indexes, outs  # one index build counts as one; nothing done twice
    assert all(computed), outs  # both jobs took part
    assert "computed by another job meanwhile" in outs[0][0] + outs[1][0]
    for st in stores:
        assert verify(st).ok
        assert not list(st.root.glob("signals/*/claims/*.json"))  # every claim released
