"""The torch Dataset and collator the trainer uses: rows keep their id and domain through batching."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from stages.batching import pad_batch


class RowsDataset(Dataset):
    """Items {input_ids, labels, row_id, domain} of a TokenizedData."""

    def __init__(self, data):
        self.data = data
        self._ids = data.dataset["input_ids"]
        self._labels = data.dataset["labels"]
        self._domains = data.domain_ids()

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self._ids[i], "labels": self._labels[i], "row_id": int(i), "domain": int(self._domains[i])}


class RowCollator:
    """Right-pads a batch; keeps `row_id` and `domain` as tensors unless `with_ids=False`."""

    def __init__(self, pad_id: int, with_ids: bool = True):
        self.pad_id = pad_id
        self.with_ids = with_ids

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_batch([f["input_ids"] for f in features], [f["labels"] for f in features], pad_id=self.pad_id)
        if self.with_ids:
            batch["row_id"] = torch.tensor([f["row_id"] for f in features], dtype=torch.long)
            batch["domain"] = torch.tensor([f["domain"] for f in features], dtype=torch.long)
        return batch
