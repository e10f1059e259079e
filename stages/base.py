"""The contract between a stage and the runner.

A stage is a picklable object that describes its signal and turns a batch of rows into an array.
The runner ships it to Dask workers, calls :meth:`Stage.setup` once per worker process (models are
loaded there, not once per shard), and commits what :meth:`Stage.compute` returns shard by shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SignalDesc:
    """What the store needs to find or create the signal: name, content spec, dtype, dim."""

    name: str
    spec: dict
    dtype: str = "float32"
    dim: int | None = None


class Stage:
    """Base class: subclasses set ``code_version`` and implement the three methods."""

    #: bump when the producer's numerics change: part of every signal key it writes
    code_version: str = "1"

    def signal(self) -> SignalDesc:
        """The signal this stage writes (spec = everything that determines the values)."""
        raise NotImplementedError

    def setup(self) -> None:
        """Load models etc. Called once per worker process before the first compute."""

    def compute(self, rows: dict[str, list]) -> np.ndarray:
        """Rows (columns `input_ids`, `labels`, `text`, `domain`) -> array of shape (len, [dim])."""
        raise NotImplementedError

    def model_version(self) -> tuple[int, str]:
        """(step, model id) recorded with each committed shard."""
        return 0, ""


def bind_live_model(stage: Stage, model, tokenizer) -> Stage:
    """A copy of `stage` that computes with an already-loaded (e.g. training) model: no setup, no load."""
    import copy

    live = copy.copy(stage)
    live._model = model
    live._tokenizer = tokenizer
    if hasattr(live, "bind_model"):
        live.bind_model(model, tokenizer)
    return live
