"""What the stages that run one frozen model over rows share (loss, hidden, gate_load): the model's content in
the key, its version, and one load per worker."""

from __future__ import annotations

from stages.args import ModelArgs
from stages.base import Stage
from stages.models import load_model, load_tokenizer, model_identity, resolve_model_args


class FrozenModelStage(Stage):
    """A stage computing with one model in eval mode, never trained by it."""

    def __init__(self, model_args: ModelArgs):
        self.model_args = resolve_model_args(model_args)  # a hub id's snapshot, once: every worker loads it
        self._identity: dict | None = None
        self._model = None
        self._tokenizer = None

    def identity(self) -> dict:
        """The model in the key: its weights' and adapter's content (or hub revision), never a path."""
        if self._identity is None:
            self._identity = model_identity(self.model_args)
        return self._identity

    def model_version(self) -> tuple[int, str]:
        ident = self.identity()
        return 0, str(ident.get("adapter") or ident.get("weights") or "")

    def setup(self) -> None:
        self._tokenizer = load_tokenizer(self.model_args)
        self._model = load_model(self.model_args, trainable=False)
        self._model.eval()

    def ready(self) -> None:
        """Load the model unless a worker's setup (or a live binding) already did."""
        if self._model is None:
            self.setup()

    @property
    def pad_id(self) -> int:
        """The tokenizer's padding id (0 when it has none)."""
        pad = self._tokenizer.pad_token_id
        return pad if pad is not None else 0
