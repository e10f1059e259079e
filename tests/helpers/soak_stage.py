"""`flexfeed stage ...` with a slowed stage, for the kill soak: the CLI exactly, plus a sleep per shard.

usage: soak_stage.py SLEEP_S flexfeed-arguments...   e.g. soak_stage.py 0.2 stage loss CONFIG shard_rows=4

The sleep runs before each shard's computation, so a kill at a random moment lands between, before
or during commits rather than only in the start-up time.
"""

from __future__ import annotations

import json
import sys
import time

from stages.base import Stage
from stages.loss import LossStage


class SlowLoss(LossStage):
    """The loss stage with a pause before each shard; same signal key and values as LossStage."""

    sleep_s = 0.0

    def compute(self, rows):
        time.sleep(self.sleep_s)
        return super().compute(rows)


def slow_loss_run(margs, data, store_path, shard_rows: int, sleep_s: float, out) -> None:
    """One inline run of the (slowed) loss stage into ``store_path``; prints what it computed."""
    from stages.args import LossArgs, RunnerArgs
    from stages.runner import run_stage
    from store.store import Store

    stage = SlowLoss(margs, LossArgs(batch_size=shard_rows))
    stage.sleep_s = sleep_s
    store = Store.open_or_create(store_path, dataset_fingerprint=data.fingerprint, num_rows=len(data),
                                 shard_rows=shard_rows)
    result = run_stage(stage, data, store, RunnerArgs(scheduler="inline"), progress=False)
    out.write(json.dumps({"computed": result.computed, "key": result.key}) + "\n")


def slow_down(sleep_s: float) -> None:
    """Make every stage's compute take at least ``sleep_s`` more seconds (values unchanged)."""
    for cls in _all_subclasses(Stage):
        if "compute" in vars(cls):
            original = vars(cls)["compute"]

            def compute(self, rows, _original=original):
                time.sleep(sleep_s)
                return _original(self, rows)

            cls.compute = compute


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


if __name__ == "__main__":
    import stages.embed  # noqa: F401 - load the stage classes before patching them
    from pipeline.cli import main

    slow_down(float(sys.argv[1]))
    main(sys.argv[2:], prog_name="flexfeed")
