"""fxmpq.quantize end to end: the budget holds, the export validates, work dirs resume, bad input fails early."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from models import UntraceableNet
from torch import nn

import fxmpq
import fxmpq.pipeline as pipeline

ROOT = Path(__file__).resolve().parents[1]


def random_batches(n: int, shape=(3, 32, 32), batch: int = 4, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


@pytest.fixture
def no_training(monkeypatch):
    """Make any indicator training or fine-tuning an error: the checks must fire before long work."""
    def boom(*a, **k):
        raise AssertionError("training started before the input was checked")
    monkeypatch.setattr(pipeline, "train_indicators", boom)
    monkeypatch.setattr(pipeline, "finetune", boom)


def test_quantize_resnet18_respects_budget_and_exports(tmp_path):
    model = torchvision.models.resnet18(num_classes=10)
    data = random_batches(2)
    x = torch.randn(1, 3, 32, 32)
    r = fxmpq.quantize(model, "w3a4", data, x, val_data=data, work_dir=tmp_path, progress=False)
    limit = fxmpq.Budget.uniform(3, 4).resolve(r.analysis)["bitops"]
    cost = r.analysis.cost(r.policy)  # recomputed here, not taken from the solver
    assert cost["bitops"] <= limit * (1 + 1e-9)
    assert r.search.optimal
    assert r.policy["conv1"] == (8, 8) and r.policy["fc"] == (8, 8)
    assert {b for n, (w, a) in r.policy.items() if n not in ("conv1", "fc") for b in (w, a)} <= {2, 3, 4, 5, 6}
    assert r.fp32_accuracy is not None and r.accuracy is not None
    for name in ("indicators.json", "policy.json", "search.json", "finetune.pt", "bits_per_layer.png",
                 "indicators.png", "pareto.png", "summary.json"):
        assert (tmp_path / name).is_file(), name
    assert fxmpq.Policy.from_json(tmp_path / "policy.json") == r.policy
    rep = r.export(inputs=torch.randn(64, 3, 32, 32))
    assert rep.passed and rep.fused_layers == rep.quantized_layers == 21
    assert "W" in r.report() and "bitops" in r.report()


def test_work_dir_with_indicators_skips_indicator_training(tmp_path, monkeypatch):
    data = random_batches(2)
    x = torch.randn(1, 3, 32, 32)
    first = fxmpq.quantize(tiny_cnn(), "w4a4", data, x, work_dir=tmp_path, finetune_epochs=0, progress=False)
    saved = (tmp_path / "indicators.json").read_text()

    def must_not_train(*a, **k):
        raise AssertionError("indicator training ran although the work dir holds indicators")
    monkeypatch.setattr(pipeline, "train_indicators", must_not_train)
    second = fxmpq.quantize(tiny_cnn(), "w4a4", data, x, work_dir=tmp_path, finetune_epochs=0, progress=False)
    assert second.indicators == first.indicators
    assert second.policy == first.policy
    assert (tmp_path / "indicators.json").read_text() == saved


class _Killed(Exception):
    pass


class _DiesAtFetch:
    """Re-iterable batches that raise _Killed at the n-th batch fetched (over every pass), like a kill there."""

    def __init__(self, batches, n: int | None):
        self.batches, self.n, self.fetched = batches, n, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            self.fetched += 1
            if self.fetched == self.n:
                raise _Killed
            yield b


def test_resume_in_first_fine_tuning_epoch_starts_from_the_joint_training_state(tmp_path):
    """Killed in fine-tuning's first epoch before its first checkpoint: the re-run skips indicator training
    (indicators.json exists) and must fine-tune from the weights, BatchNorm statistics and step sizes joint training
    left (indicators.ckpt), not from the FP32 model; it ends identical to the uninterrupted run."""
    data = random_batches(3, shape=(3, 8, 8))
    x = torch.randn(1, 3, 8, 8)
    kw = {"finetune_epochs": 1, "progress": False, "distill": False}
    whole = fxmpq.quantize(tiny_cnn(), "w4a4", data, x, work_dir=tmp_path / "whole", **kw)
    wd = tmp_path / "killed"
    with pytest.raises(_Killed):  # fetch 1: the data check; 2-4: indicator training; 5-7: fine-tuning
        fxmpq.quantize(tiny_cnn(), "w4a4", _DiesAtFetch(data, 6), x, work_dir=wd, **kw)
    assert (wd / "indicators.json").is_file() and not (wd / "finetune.pt").exists()
    again = fxmpq.quantize(tiny_cnn(), "w4a4", data, x, work_dir=wd, **kw)
    assert again.indicators == whole.indicators and again.policy == whole.policy
    ref, got = whole.model.state_dict(), again.model.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]) if isinstance(ref[k], torch.Tensor) else ref[k] == got[k], k


def test_budget_below_smallest_achievable_fails_before_training(no_training):
    with pytest.raises(fxmpq.InfeasibleBudget, match=r"bitops.*smallest achievable"):
        fxmpq.quantize(tiny_cnn(), "bitops<=1", random_batches(1), torch.randn(1, 3, 32, 32))


def test_wrong_data_shapes_fail_before_training(no_training):
    bad = random_batches(1, shape=(3, 16, 16))
    with pytest.raises(fxmpq.DataError, match=r"batch 0 has inputs of shape \(4, 3, 16, 16\), expected \[N, 3, 32, 32\]"):
        fxmpq.quantize(tiny_cnn(), "w4a4", bad, torch.randn(1, 3, 32, 32))
    labels_out_of_range = random_batches(1, classes=50)
    with pytest.raises(fxmpq.DataError, match="targets range over"):
        fxmpq.quantize(tiny_cnn(), "w4a4", labels_out_of_range, torch.randn(1, 3, 32, 32))
    with pytest.raises(fxmpq.DataError, match="yielded no batches"):
        fxmpq.quantize(tiny_cnn(), "w4a4", [], torch.randn(1, 3, 32, 32))


def test_untraceable_model_fails_before_training(no_training):
    with pytest.raises(fxmpq.TraceError, match="leaf_modules"):
        fxmpq.quantize(UntraceableNet(), "w4a4", random_batches(1, shape=(3, 8, 8)), torch.randn(1, 3, 8, 8))


def test_unknown_hardware_fails_before_training(no_training):
    with pytest.raises(fxmpq.HardwareSpecError, match=r"unknown hardware 'tpu9'.*shipped targets are"):
        fxmpq.quantize(tiny_cnn(), "w4a4", random_batches(1), torch.randn(1, 3, 32, 32), hardware="tpu9")


def test_bad_budget_string_fails_before_training(no_training):
    with pytest.raises(fxmpq.BudgetError, match="cannot read term 'w3x4'"):
        fxmpq.quantize(tiny_cnn(), "w3x4", random_batches(1), torch.randn(1, 3, 32, 32))


def test_demo_quick_smoke(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/demo.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ONNX parity PASS" in proc.stdout
    assert (out / "model.onnx").is_file() and (out / "policy.json").is_file()
