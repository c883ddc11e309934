"""InsertFakeQuantPass and prepare(): golden graph, switchable BN, signedness, exactness when off, gradients."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torchvision
from _quant_models import FunctionalNet, TinyNet

import fxmpq
from fxmpq.capture.graph import trace
from fxmpq.core.options import TrainOptions
from fxmpq.errors import PassError, PolicyError
from fxmpq.passes import InsertFakeQuantPass, run_passes
from fxmpq.quant.lsq import LSQQuantizer, QuantConv2d, SwitchableBatchNorm2d

GOLDEN = Path(__file__).parent / "golden"


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("FXMPQ_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"graph differs from {path} (FXMPQ_UPDATE_GOLDEN=1 rewrites it)"


@pytest.fixture
def tiny() -> tuple[TinyNet, torch.Tensor]:
    torch.manual_seed(0)
    return TinyNet().eval(), torch.randn(2, 3, 8, 8)


def test_golden_graph_on_tiny_model(tiny) -> None:
    model, x = tiny
    q = fxmpq.prepare(model, x)
    _golden("insert_fake_quant_tiny_before.txt", trace(model, x).code.strip() + "\n")
    modules = [f"{n}: {type(m).__name__}({m.extra_repr()})" for n, m in q.graph_module.named_modules()
               if n and n != "fxmpq_quant"]
    _golden("insert_fake_quant_tiny_after.txt", q.graph_module.code.strip() + "\n\n" + "\n".join(modules) + "\n")
    assert q.layer_names == ["conv1", "conv2", "conv3", "fc"]
    assert q.searchable_names == ["conv2", "conv3"]


def test_quantizers_signedness_and_pins(tiny) -> None:
    model, x = tiny
    q = fxmpq.prepare(model, x, bits=(2, 4))
    assert q.act_quantizer("conv1").signed  # the image
    assert not q.act_quantizer("conv2").signed  # after relu
    assert q.act_quantizer("conv3").signed  # relu output + BN output
    assert not q.act_quantizer("fc").signed  # flatten(pool(relu))
    assert q.weight_quantizer("conv1").bits == (8,) and q.act_quantizer("fc").bits == (8,)  # pinned
    assert q.weight_quantizer("conv2").bits == (2, 4) and q.act_quantizer("conv3").bits == (2, 4)
    assert isinstance(q.graph_module.get_submodule("conv2"), QuantConv2d)


def test_switchable_bn_follows_searchable_convs_only(tiny) -> None:
    model, x = tiny
    q = fxmpq.prepare(model, x, bits=(2, 4))
    gm = q.graph_module
    assert type(gm.get_submodule("bn1")) is torch.nn.BatchNorm2d  # conv1 is pinned
    assert isinstance(gm.get_submodule("bn2"), SwitchableBatchNorm2d)
    assert isinstance(gm.get_submodule("bn3"), SwitchableBatchNorm2d)
    assert q.batchnorm("conv2") is gm.get_submodule("bn2") and q.batchnorm("fc") is None
    q.set_policy({"conv2": (2, 4), "conv3": (4, 2)})
    assert gm.get_submodule("bn2").active_bits == 2 and gm.get_submodule("bn3").active_bits == 4
    assert q.weight_quantizer("conv1").active_bits == 8


def test_off_is_exact_and_model_untouched(tiny) -> None:
    model, x = tiny
    state = copy.deepcopy(model.state_dict())
    q = fxmpq.prepare(model, x).eval()
    assert torch.equal(q(x), model(x))
    q.set_uniform(3)
    assert not torch.equal(q(x), model(x))
    q.disable_quant()
    assert torch.equal(q(x), model(x))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert type(model.conv2) is torch.nn.Conv2d


def test_functional_layers_and_shared_module() -> None:
    torch.manual_seed(0)
    model, x = FunctionalNet().eval(), torch.randn(2, 3, 6, 6)
    q = fxmpq.prepare(model, x, bits=(2, 4))
    assert q.layer_names == ["stem", "shared", "shared#1", "w", "head_weight"]
    assert q.sites["w"].weight_quantizer == "fxmpq_quant.w.weight_quantizer"
    assert q.sites["shared#1"].act_quantizer == "fxmpq_quant.shared_call1.input_quantizer"
    assert torch.equal(q(x), model(x))
    q.set_policy({"shared": (2, 2), "shared#1": (4, 4), "w": (2, 4)})
    q.train()
    q(x).sum().backward()
    for name in ("shared", "shared#1", "w"):
        wq = q.weight_quantizer(name)
        assert wq.step.grad is not None and torch.count_nonzero(wq.step.grad) == 1, name


def test_gradients_reach_every_step_size(tiny) -> None:
    model, x = tiny
    q = fxmpq.prepare(model.train(), x, bits=(2, 3, 4))
    for b in q.bits:
        q.set_uniform(b)
        q(x).pow(2).sum().backward()
    for name, quantizer in q.quantizers():
        assert quantizer.step.grad is not None and bool((quantizer.step.grad != 0).all()), name


def test_bad_bits_and_bad_policy(tiny) -> None:
    model, x = tiny
    with pytest.raises(PolicyError, match="not supported by hardware 'bitops'"):
        fxmpq.prepare(model, x, bits=(1, 4))
    q = fxmpq.prepare(model, x, bits=(2, 4))
    with pytest.raises(PolicyError, match="outside this model's candidate bits"):
        q.set_policy({"conv2": (3, 4), "conv3": (4, 4)})
    with pytest.raises(PolicyError, match="outside"):
        q.set_uniform(6)
    with pytest.raises(PolicyError, match="no quantized layer 'nope'"):
        q.weight_quantizer("nope")


def test_pass_needs_annotations(tiny) -> None:
    model, x = tiny
    with pytest.raises(PassError, match="run AnnotateCostPass before it"):
        run_passes(trace(model, x), [InsertFakeQuantPass(bits=(2, 4))])


def test_fix_freezes_policy(tiny) -> None:
    model, x = tiny
    q = fxmpq.prepare(model, x, bits=(2, 4)).eval()
    q.set_policy({"conv2": (2, 4), "conv3": (4, 2)})
    y = q(x)
    q.fix()
    assert q.weight_quantizer("conv2").bits == (2,) and q.act_quantizer("conv3").bits == (2,)
    assert len(q.batchnorm("conv3").bns) == 1
    assert torch.equal(q(x), y)


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("mobilenet_v2", marks=pytest.mark.slow)])
def test_torchvision_joint_step(arch: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    q = fxmpq.prepare(model, x, bits=(2, 4))
    ind = fxmpq.train_indicators(q, [(x, torch.tensor([1, 2]))], TrainOptions(max_steps=1, progress=False))
    assert ind.layers == tuple(q.searchable_names)
    assert all(v > 0 for row in ind.weight.values() for v in row.values())


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_insertion(arch: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    q = fxmpq.prepare(model, x).eval()
    n_layers = len(q.layer_names)
    assert sum(isinstance(m, LSQQuantizer) for m in q.graph_module.modules()) == 2 * n_layers
    convs_with_bn = [n for n in q.searchable_names if q.batchnorm(n) is not None]
    assert len(convs_with_bn) == len([n for n in q.searchable_names if "fc" not in n and "classifier" not in n])
    assert torch.equal(q(x), model(x))


def test_deepcopy_and_state_dict_round_trip(tiny) -> None:
    model, x = tiny
    q = fxmpq.prepare(model, x, bits=(2, 4)).eval()
    q.set_uniform(2)
    y = q(x)
    q2 = copy.deepcopy(q)
    assert torch.equal(q2(x), y) and q2.policy == q.policy
    assert q2.analysis.graph_module is q2.graph_module
    q3 = fxmpq.prepare(model, x, bits=(2, 4)).eval()
    q3.load_state_dict(q.state_dict())
    q3.set_uniform(2)
    assert torch.equal(q3(x), y)
