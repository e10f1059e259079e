"""A loss stage that records each set-up (one line per model load) for the runner tests."""

import os

from stages.loss import LossStage


class CountingLossStage(LossStage):
    def __init__(self, *args, log_path: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_path = log_path

    def setup(self) -> None:
        with open(self.log_path, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        super().setup()
