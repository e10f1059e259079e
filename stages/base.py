"""The contract between a stage and the runner.

A stage is a picklable object that describes its signal and turns a batch of rows into an array.
The runner ships it to Dask workers, calls :meth:`Stage.setup` once per worker process (models are
loaded there, not once per shard), and commits what :meth:`Stage.compute` returns shard by shard.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SignalDesc:
    """What the store needs to find or create the signal: name, content spec, dtype, dim, and unkeyed sources."""

    name: str
    spec: dict
    dtype: str = "float32"
    dim: int | None = None
    #: where the inputs were read from (model, adapter, checkpoint folders): shown by `store info`,
    #: never part of the key, so a store and its models can move to another folder
    sources: dict = field(default_factory=dict)


class Stage:
    """Base class: subclasses set ``code_version`` and implement the three methods."""

    #: bump when the producer's numerics change: part of every signal key it writes
    code_version: str = "1"
    #: computes with autograd (gradient features): a refresh enables gradients for it
    needs_grad: bool = False

    def signal(self) -> SignalDesc:
        """The signal this stage writes (spec = the content that determines the values, never a path)."""
        raise NotImplementedError

    def setup(self) -> None:
        """Load models etc. Called once per worker process before the first compute."""

    def compute(self, rows: dict[str, list]) -> np.ndarray:
        """Rows (columns `input_ids`, `labels`, `text`, `domain`) -> array of shape (len, [dim])."""
        raise NotImplementedError

    def live_state_keys(self) -> tuple[str, ...]:
        """Live training state a refresh must bind (e.g. `adam_state`); none by default."""
        return ()

    def model_version(self) -> tuple[int, str]:
        """(step, model id) recorded with each committed shard."""
        return 0, ""


def bind_live_model(stage: Stage, model, tokenizer, **state) -> Stage:
    """A copy of `stage` that computes with an already-loaded (e.g. training) model: no setup, no load.

    ``state`` is more of the live training state a stage's definition reads (e.g. ``adam_state``, the
    optimizer's moments, for Adam-preconditioned gradients); it goes to the stage's ``bind_model``.
    """
    live = copy.copy(stage)
    live._model = model
    live._tokenizer = tokenizer
    if hasattr(live, "bind_model"):
        live.bind_model(model, tokenizer, **state)
    elif state:
        raise TypeError(f"{type(stage).__name__} takes no live state, got {sorted(state)}")
    return live
