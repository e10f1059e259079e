"""The training sampler: replays the scheduler's window plans as one stream of row ids."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Sampler

from .scheduler import Scheduler


class PlanSampler(Sampler[int]):
    """Yields the global sample order; accelerate shards it across ranks batch by batch.

    Plans are pulled lazily, so a window's decision happens when training reaches it, and a resumed
    run that skips batches replays stored plans instead of deciding again.
    """

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def __len__(self) -> int:
        w = self.scheduler.windows
        return w.max_steps * w.global_batch

    def __iter__(self) -> Iterator[int]:
        for w in range(self.scheduler.windows.num_windows()):
            yield from self.scheduler.plan(w).tolist()

    def set_epoch(self, epoch: int) -> None:
        """One 'epoch' is the whole run; nothing changes between epochs."""
