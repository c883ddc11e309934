"""fxmpq.train.restore: a fine-tuning checkpoint rebuilds the same QuantModel; indicator-training ones are refused."""

from __future__ import annotations

import re

import pytest
import torch
from models import PlainCNN

import fxmpq
from fxmpq.core.options import TrainOptions
from fxmpq.errors import CheckpointError
from fxmpq.train.restore import find_checkpoint, load_quantized

BITS = (2, 3, 4)


def _data() -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,)))


def test_finetune_checkpoint_rebuilds_the_same_model(tmp_path):
    q = fxmpq.prepare(PlainCNN().eval(), torch.randn(4, 3, 16, 16), bits=BITS)
    fxmpq.apply_policy(q, {n: (3, 4) for n in q.searchable_names}, torch.randn(8, 3, 16, 16))
    fxmpq.finetune(
        q,
        _data(),
        TrainOptions(finetune_epochs=1, progress=False, batch_size=8, model_factory="models:PlainCNN"),
        checkpoint=tmp_path / "finetune.pt",
    )
    restored, example, factory = load_quantized(tmp_path)  # a work directory: finetune.pt is found
    assert isinstance(restored, fxmpq.QuantModel) and not restored.training
    assert restored.policy == q.policy and tuple(example.shape) == (4, 3, 16, 16)
    assert isinstance(factory(), PlainCNN)
    x = torch.randn(5, 3, 16, 16)
    q.eval()
    with torch.no_grad():
        assert torch.equal(restored(x), q(x))


def test_indicator_training_checkpoint_is_refused_naming_the_finetune_one(tmp_path):
    q = fxmpq.prepare(PlainCNN().eval(), torch.randn(4, 3, 16, 16), bits=BITS)
    ckpt = tmp_path / "indicators.ckpt"
    fxmpq.train_indicators(
        q,
        _data(),
        TrainOptions(indicator_epochs=1, progress=False, batch_size=8, model_factory="models:PlainCNN"),
        checkpoint=ckpt,
    )
    with pytest.raises(CheckpointError, match=r"indicators\.ckpt: an indicator-training checkpoint .*"
                                              r"lower the fine-tuning checkpoint instead \(.*finetune\.pt once"):
        load_quantized(ckpt)
    with pytest.raises(CheckpointError, match=r"holds only the indicator-training checkpoint indicators\.ckpt"):
        find_checkpoint(tmp_path)
    (tmp_path / "finetune.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(f"lower the fine-tuning checkpoint {tmp_path / 'finetune.pt'} instead")):
        load_quantized(ckpt)
