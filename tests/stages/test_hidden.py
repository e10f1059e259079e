"""The `hidden` stage: its layer choice, its feature formula on hand-made states, and the tiny model's rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from stages.args import ModelArgs
from stages.hidden import HiddenArgs, HiddenStage, layer_features, resolve_layers
from stages.models import load_tokenizer
from store.errors import FlexfeedError


def test_layers_are_evenly_spaced_blocks_or_the_given_indices():
    # linspace(1, 12, 5) = 1, 3.75, 6.5, 9.25, 12 -> rounded (half to even) 1, 4, 6, 9, 12
    assert resolve_layers(None, 5, 12) == [1, 4, 6, 9, 12]
    assert resolve_layers(None, 5, 2) == [1, 2]  # fewer blocks than layers asked: each block once
    assert resolve_layers([-1, 0, 2, 2], 5, 4) == [0, 2, 4]
    with pytest.raises(FlexfeedError, match="out of range"):
        resolve_layers([5], 5, 4)


def test_features_are_tanh_mean_pooled_per_layer_unit_then_unit_overall():
    h0 = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])  # the last token is padding
    h1 = torch.tensor([[[2.0, 2.0], [2.0, 2.0], [-9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # layer 0: mean(tanh) = (tanh 1 / 2, tanh 1 / 2) -> unit (r, r); layer 1: (tanh 2, tanh 2) -> (r, r); then / sqrt(2)
    r = 1 / np.sqrt(2)
    out = layer_features((h0, h1), mask, [0, 1], "mean", "tanh").numpy()
    np.testing.assert_allclose(out, [[r / np.sqrt(2)] * 4], rtol=1e-6)
    # last real token, no activation: layer 0 (0, 1), layer 1 (r, r)
    out = layer_features((h0, h1), mask, [0, 1], "last", "none").numpy()
    np.testing.assert_allclose(out, [[0.0, r, 0.5, 0.5]], rtol=1e-6, atol=1e-7)


def test_the_stage_matches_each_row_computed_alone(tiny_checkpoint):
    margs = ModelArgs(model_name_or_path=str(tiny_checkpoint), finetuning_type="full")
    tok = load_tokenizer(margs)
    texts = ["one two three four five", "six", "seven eight nine"]
    ids = [tok(t)["input_ids"] for t in texts]
    for side in ("right", "left"):
        stage = HiddenStage(margs, HiddenArgs(num_layers=2, batch_size=3), padding_side=side)
        got = stage.compute({"input_ids": ids})
        assert got.shape == (3, stage.signal().dim) and stage.layers == [1, 2]
        model = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint)).eval()
        for row, r in zip(got, ids):
            with torch.no_grad():
                hs = model(input_ids=torch.tensor([r]), output_hidden_states=True).hidden_states
            blocks = [np.tanh(hs[layer][0].numpy()).mean(0) for layer in (1, 2)]
            want = np.concatenate([b / np.linalg.norm(b) for b in blocks]) / np.sqrt(2)
            np.testing.assert_allclose(row, want, atol=2e-5)
