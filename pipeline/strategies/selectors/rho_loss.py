"""`rho_loss`: RHO-LOSS (Mindermann et al. 2022), the rows with the largest reducible holdout loss.

reducible(x) = L(x; live model) - L(x; reference model): the live training loss (signal `loss`, recomputed at
every decision) minus the loss of a reference model trained on held-out data (signal `ref_loss`, computed once
offline by the loss stage, as DoReMi's reference losses are). A row with a high training loss that the
reference model does fit is learnable, worth learning and not yet learnt; a row both models find hard
(noise, ambiguity) or both find easy scores low. The paper takes the top rows of each large candidate
batch; here each decision takes the top rows among all rows (`allow_repeats: false` restricts it to the rows
not yet served in the pass).
"""

from __future__ import annotations

import numpy as np

from store.errors import FlexfeedError

from ..base import Selection, Selector, SignalNeed
from ..registry import SELECTORS
from .reading import train_signal
from .sampling import check_count, ranking, take_ranked
from .summary import score_stats, selection_info


def reducible_loss(loss: np.ndarray, ref_loss: np.ndarray) -> np.ndarray:
    """Training loss minus irreducible (reference) loss, per row."""
    return np.asarray(loss, dtype=np.float64) - np.asarray(ref_loss, dtype=np.float64)


def reference_model(cfg) -> tuple[str, str | None] | None:
    """(model, adapter) the loss stage scores `ref_loss` with, None when the config names no reference model
    (`loss.signal: ref_loss` with `loss.model_name_or_path` or `loss.adapter_name_or_path`)."""
    loss, model = cfg.loss, cfg.model
    if loss.signal != "ref_loss" or not (loss.model_name_or_path or loss.adapter_name_or_path):
        return None
    if loss.model_name_or_path:  # the loss stage drops the training adapter for another model
        return loss.model_name_or_path, loss.adapter_name_or_path
    return model.model_name_or_path, loss.adapter_name_or_path


@SELECTORS.register("rho_loss", "rho")
class RhoLossSelector(Selector):
    """Selects the rows whose live loss most exceeds a reference model's loss."""

    paper = ("Mindermann, Brauner, Razzak, Sharma, Kirsch, Xu, Holtgen, Gomez, Morisot, Farquhar, Gal, "
             "Prioritized Training on Points that are Learnable, Worth Learning, and Not Yet Learnt, ICML 2022")
    rule = "top rows by reducible holdout loss: the live training loss minus the reference model's ref_loss"
    # the live loss falls on rows already learnt, so the score itself keeps them out (the paper's "not yet learnt");
    # consuming the pool would also drop the learnable rows that are still worth another pass
    consume_once = False

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse a run whose ref_loss would be scored by no reference model, or by the training model itself
        (every reducible loss would start at 0)."""
        ref = reference_model(cfg)
        fix = ("name the reference model, trained on held-out rows: `loss: {adapter_name_or_path: REF_RUN, "
               "signal: ref_loss}` (or loss.model_name_or_path), see docs/selectors.md")
        if ref is None:
            raise FlexfeedError("component 'rho_loss' reads ref_loss, a reference model's loss, but the config "
                                "names no reference model (loss.signal ref_loss with loss.model_name_or_path or "
                                "loss.adapter_name_or_path)", fix)
        if ref == (cfg.model.model_name_or_path, cfg.model.adapter_name_or_path):
            raise FlexfeedError("component 'rho_loss': the reference model in `loss:` is the model being trained, "
                                "so every row's reducible loss would start at 0", fix)

    def needs(self) -> list[SignalNeed]:
        """The live model's per-row loss at every decision, and the stored reference loss (never refreshed)."""
        return [SignalNeed("loss", "train", live=True), SignalNeed("ref_loss", "train", refresh=False)]

    def select(self, ctx, num_samples: int) -> Selection:
        """The `num_samples` rows of highest reducible loss (ties by row id; the ranking repeats beyond the pool)."""
        k = check_count(num_samples, ctx.num_rows)
        loss = train_signal(ctx, "loss", 1)
        ref = train_signal(ctx, "ref_loss", 1)
        scores = reducible_loss(loss, ref)
        indices = take_ranked(ranking(scores), k)
        extra = {**score_stats(np.asarray(loss, dtype=np.float64)[indices], "loss"),
                 **score_stats(np.asarray(ref, dtype=np.float64)[indices], "ref_loss")}
        return Selection(indices=indices, scores=scores, info=selection_info(ctx, indices, scores, **extra))
