"""`flexfeed train` that records the row ids of every training batch, for the kill-and-resume soak.

usage: soak_train.py ROWS_FILE SLEEP_S CONFIG [key=value ...]

Each training batch appends one JSON line (its row ids) to ROWS_FILE before its loss is computed,
and then sleeps SLEEP_S so a kill can land between checkpoints. Training itself is the CLI's.
"""

from __future__ import annotations

import json
import sys
import time


def record_batches(rows_file: str, sleep_s: float = 0.0) -> None:
    """Patch FlexfeedTrainer.compute_loss to log row ids (and pause) on every training batch."""
    from pipeline.trainer import FlexfeedTrainer

    original = FlexfeedTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        if model.training and "row_id" in inputs:
            with open(rows_file, "a") as fh:
                fh.write(json.dumps(inputs["row_id"].tolist()) + "\n")
            time.sleep(sleep_s)
        return original(self, model, inputs, *args, **kwargs)

    FlexfeedTrainer.compute_loss = recording


if __name__ == "__main__":
    from pipeline.cli import main

    record_batches(sys.argv[1], float(sys.argv[2]))
    main(["train", *sys.argv[3:]], prog_name="flexfeed")
