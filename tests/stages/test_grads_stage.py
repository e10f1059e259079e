"""GradsStage: signal description, per-checkpoint keys and learning rates, compute() over a shard."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from stages.args import GradsArgs, ModelArgs
from stages.batching import pad_batch
from stages.grads import AdamPreconditioner, GradsStage, build_projector, compute_features, load_adam_state
from stages.grads.stage import grads_stages
from store.errors import FlexfeedError
from tests.helpers.checkpoints import trainer_checkpoints


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory):
    """Two Trainer-style LoRA checkpoints (adapter, optimizer.pt, trainer_state.json) of one short run."""
    margs = ModelArgs(model_name_or_path=str(tiny_checkpoint), lora_rank=4, lora_target="q_proj,v_proj,down_proj")
    out = [str(c) for c in trainer_checkpoints(margs, lambda step: tmp_path_factory.mktemp(f"checkpoint-{step}"),
                                               data_seed=2)]
    return margs, out


ROWS = {"input_ids": [[5, 9, 17, 33, 8, 2, 40], [44, 3, 12], [7, 7, 100, 21, 60, 61, 62, 90, 11], [6, 30]],
        "labels": [[-100, -100, 17, 33, 8, 2, 40], [44, 3, 12], [7, 7, 100, 21, 60, 61, 62, 90, 11], [6, 30]]}


def test_one_signal_per_checkpoint_with_its_lr(checkpoints):
    margs, ckpts = checkpoints
    stages = grads_stages(margs, GradsArgs(proj_dim=64, checkpoints=ckpts))
    descs = [s.signal() for s in stages]
    assert [d.name for d in descs] == ["grads", "grads"] and all(d.dim == 64 for d in descs)
    assert [d.spec["lr"] for d in descs] == [1e-3, 5e-4]
    assert descs[0].spec["checkpoint"]["hash"] != descs[1].spec["checkpoint"]["hash"]
    assert descs[0].spec["model"]["adapter"] is not None  # the checkpoint's adapter is the model
    assert {"grad_type", "proj_dim", "proj_type", "seed", "normalize", "code_version"} <= set(descs[0].spec)
    assert [s.model_version()[0] for s in stages] == [1, 2]
    sgd = GradsStage(margs, GradsArgs(proj_dim=64, grad_type="sgd"), ckpts[0]).signal()
    assert sgd.name == "grads_sgd" and sgd.spec["checkpoint"]["hash"] != descs[0].spec["checkpoint"]["hash"]


def test_compute_matches_features_of_the_loaded_checkpoint(checkpoints):
    from stages.models import load_model

    margs, ckpts = checkpoints
    stage = GradsStage(margs, GradsArgs(proj_dim=64, batch_size=3, seed=7), ckpts[1])
    stage = pickle.loads(pickle.dumps(stage))  # as the runner ships it to a worker
    got = stage.compute(ROWS)
    assert got.shape == (4, 64) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # independent path: load the checkpoint, one padded batch of all rows, same projection
    model = load_model(ModelArgs(**{**margs.__dict__, "adapter_name_or_path": ckpts[1]}), trainable=True)
    params = [(n, p.shape) for n, p in model.named_parameters() if p.requires_grad]
    pre = AdamPreconditioner(load_adam_state(ckpts[1], params))
    want = compute_features(model, pad_batch(ROWS["input_ids"], ROWS["labels"]), build_projector(model, 64, seed=7),
                            pre).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert pickle.loads(pickle.dumps(stage))._model is None  # a set-up stage pickles without its model


def test_sgd_without_checkpoint_and_batch_size_invariance(checkpoints):
    margs, _ = checkpoints
    small = GradsStage(margs, GradsArgs(proj_dim=64, grad_type="sgd", batch_size=1, normalize=False))
    large = GradsStage(margs, GradsArgs(proj_dim=64, grad_type="sgd", batch_size=4, normalize=False))
    a, b = small.compute(ROWS), large.compute(ROWS)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert small.signal().spec["checkpoint"] is None and small.signal().name == "grads_sgd"


def test_bad_settings_are_clear_errors(checkpoints, tmp_path):
    margs, ckpts = checkpoints
    with pytest.raises(FlexfeedError, match="needs a checkpoint"):
        GradsStage(margs, GradsArgs(grad_type="adam"))
    with pytest.raises(FlexfeedError, match="grad_type"):
        GradsStage(margs, GradsArgs(grad_type="sign"), ckpts[0])
    with pytest.raises(FlexfeedError, match="proj_structure"):
        GradsStage(margs, GradsArgs(proj_structure="dense"), ckpts[0])
    stage = GradsStage(margs, GradsArgs(proj_dim=64, grad_type="sgd"))
    with pytest.raises(FlexfeedError, match="row 1 of the shard has no tokens"):
        stage.compute({"input_ids": [[5, 6], []], "labels": [[5, 6], []]})


def test_bfloat16_compute_is_close_to_float32_and_keyed_apart(checkpoints):
    """compute_dtype bfloat16: the forward/backward under bf16 autocast, everything after it float32.

    bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 2e-3 per operation), so unit-norm features
    agree to a cosine well above 0.99 but not bit for bit; the key differs (other numbers), the float32
    key is the one it always was."""
    margs, _ = checkpoints
    fp32 = GradsStage(margs, GradsArgs(proj_dim=64, grad_type="sgd"))
    bf16 = GradsStage(margs, GradsArgs(proj_dim=64, grad_type="sgd", compute_dtype="bfloat16"))
    a, b = fp32.compute(ROWS), bf16.compute(ROWS)
    cosines = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosines.min() > 0.99 and not np.array_equal(a, b)
    assert "compute_dtype" not in fp32.signal().spec and bf16.signal().spec["compute_dtype"] == "bfloat16"
    assert fp32.signal().spec != bf16.signal().spec
