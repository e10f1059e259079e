"""A mixer's own evaluation rows (`mixer_eval_dataset`): which training dataset each of them measures.

DataFlex's rule: a mixer-evaluation dataset named `<dataset>_eval` measures that training dataset; a training
dataset with none keeps the mixer's default (dynamic_moe holds some of its rows out of training). Any other name
is refused before training (DataFlex would also take a training dataset's own name, whose rows are trained on).
"""

from __future__ import annotations

import numpy as np

from stages.data import TokenizedData
from store.errors import FlexfeedError

EVAL_SUFFIX = "_eval"


def measured_dataset(name: str, train_names: list[str]) -> int:
    """Index in `dataset` of the training dataset a mixer-evaluation dataset measures."""
    base = name[: -len(EVAL_SUFFIX)] if name.endswith(EVAL_SUFFIX) else None
    if base not in train_names:
        raise FlexfeedError(f"mixer_eval_dataset {name!r} measures no training dataset (training: "
                            f"{', '.join(train_names)})",
                            f"name each mixer evaluation dataset <dataset>{EVAL_SUFFIX} after the training dataset "
                            "it measures")
    return train_names.index(base)


def mixer_eval_domains(train: TokenizedData, mixer_eval: TokenizedData) -> np.ndarray:
    """(rows of mixer_eval,) the training-domain index each mixer-evaluation row measures."""
    mapping = np.array([measured_dataset(n, train.domain_names) for n in mixer_eval.domain_names], dtype=np.int64)
    return mapping[mixer_eval.domain_ids()]
