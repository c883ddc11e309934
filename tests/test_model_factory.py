"""Model specs shared by the tools: torchvision and fxmpq.models names, package.module:function, JSON kwargs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fxmpq import ModelSpecError
from fxmpq.models import SmallResNet, build_model, parse_model_kwargs, resolve_factory

ROOT = Path(__file__).resolve().parents[1]


def test_names_and_factories_build():
    assert isinstance(build_model("small_resnet", {"in_channels": 3}), SmallResNet)
    r18 = build_model("resnet18", {"num_classes": 7})
    assert r18.fc.out_features == 7
    assert build_model("torch.nn:Identity").__class__ is nn.Identity
    assert resolve_factory("fxmpq.models:small_mobilenet").__name__ == "small_mobilenet"


@pytest.mark.parametrize(("spec", "kwargs", "message"), [
    ("resnet1", None, r"unknown model 'resnet1'.*did you mean resnet1\d+"),
    ("nosuchpkg.x:f", None, "cannot import 'nosuchpkg.x'"),
    ("torch.nn:NoSuchLayer", None, "torch.nn has no callable 'NoSuchLayer'"),
    (":f", None, "expected package.module:function"),
    ("resnet18", {"num_clases": 3}, "the factory raised TypeError"),
    ("torch:zeros", {"size": (2,)}, "returned Tensor, not an nn.Module"),
])
def test_bad_specs_name_the_spec(spec, kwargs, message):
    with pytest.raises(ModelSpecError, match=message):
        build_model(spec, kwargs)


def test_parse_model_kwargs():
    assert parse_model_kwargs('{"num_classes": 10}') == {"num_classes": 10}
    assert parse_model_kwargs("") == {}
    with pytest.raises(ModelSpecError, match="not valid JSON"):
        parse_model_kwargs("{num_classes: 10}")
    with pytest.raises(ModelSpecError, match="expected a JSON object"):
        parse_model_kwargs("[10]")


sys.path.insert(0, str(ROOT / "tools"))
import train_indicators as tool  # noqa: E402


@pytest.mark.parametrize(("args", "message"), [
    (["small_resnet", "--weights", "missing.pt"], "--weights missing.pt: not a loadable state_dict"),
    (["small_resnet", "--weights", "foreign.pt"], "--weights foreign.pt: does not fit model small_resnet"),
    (["small_resnet", "--dataset", "torch.utils.data:TensorDataset"], "give the per-sample shape with --input"),
    (["small_resnet", "--dataset", "nosuch.mod:fn"], "--dataset: dataset 'nosuch.mod:fn': cannot import"),
    (["small_resnet", "--bits", "2,x"], "--bits '2,x': expected comma-separated integers"),
    (["small_resnet", "--model-kwargs", "{bad"], "not valid JSON"),
    (["resnet1"], "unknown model 'resnet1'"),
])
def test_train_indicators_cli_one_line_errors(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "foreign.pt")
    dataset = [] if "--dataset" in args else ["--dataset", "digits"]  # no Fashion-MNIST read for a quick test
    assert tool.main([*args, *dataset, "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_indicators.py: error: ") and message in err, err
    assert err.count("\n") == 1
