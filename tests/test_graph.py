"""Tests of capture: tracing, TraceError messages, the matcher's layer records (MACs, shapes, options), accessors."""

from __future__ import annotations

import re

import pytest
import torch
import torch.fx as fx
from models import (
    Conv1dNet,
    FunctionalNet,
    Gate,
    GroupedNet,
    PlainCNN,
    ResidualNet,
    SharedLinearNet,
    UntraceableNet,
)
from torch import nn

import fxmpq
from fxmpq import LayerKind, TraceError, trace
from fxmpq.capture.matcher import match
from fxmpq.capture.record import LayerRecord, record_of, records, set_record
from fxmpq.core.options import LowerOptions


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trace_records_shapes_and_matches_the_model():
    model = PlainCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    gm = trace(model, x)
    assert isinstance(gm, fx.GraphModule)
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if "tensor_meta" in n.meta}
    assert shapes["conv1"] == (2, 8, 16, 16)
    assert shapes["conv2"] == (2, 16, 8, 8)
    assert shapes["fc"] == (2, 10)
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("training", [True, False])
def test_trace_does_not_mutate_the_model(training):
    model = PlainCNN().train(training)
    before = _snapshot(model)
    modules_before = [name for name, _ in model.named_modules()]
    x = torch.randn(4, 3, 16, 16) * 5 + 3  # would move BatchNorm's running stats if run in train mode
    gm = trace(model, x)
    after = _snapshot(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed"
    assert model.training is training
    assert [name for name, _ in model.named_modules()] == modules_before
    assert not model._forward_hooks and not model._forward_pre_hooks
    # the graph module is a copy: changing it leaves the user's model alone
    with torch.no_grad():
        gm.conv1.weight.add_(1.0)
    assert torch.equal(model.conv1.weight, before["conv1.weight"])
    assert gm.training is training


def test_trace_error_names_module_reason_line_and_leaf_hint():
    with pytest.raises(TraceError) as exc:
        trace(UntraceableNet(), torch.randn(1, 3, 8, 8))
    msg = str(exc.value)
    pattern = (
        r"torch\.fx cannot trace UntraceableNet in module 'gate' \(Gate\) at forward\(\) at .*tests/models\.py:\d+: "
        r"TraceError: symbolically traced variables cannot be used as inputs to control flow\. "
        r"Mark the offending submodule a leaf so it is kept as one opaque call \(its layers are then not "
        r"quantized\): fxmpq\.trace\(model, inputs, leaf_modules=\['gate'\]\), or make the code traceable "
        r"\(no Python control flow on tensor values\)\."
    )
    assert re.fullmatch(pattern, msg), msg
    assert exc.value.__cause__ is not None


def test_trace_error_at_top_level_suggests_a_placeholder_name():
    class TopLevelBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.mean() > 0:
                return self.fc(x)
            return x

    with pytest.raises(TraceError) as exc:
        trace(TopLevelBranch(), torch.randn(1, 4))
    msg = str(exc.value)
    assert msg.startswith("torch.fx cannot trace TopLevelBranch at forward() at ")
    assert "leaf_modules=[<SubmoduleName>]" in msg


@pytest.mark.parametrize("leaf", ["gate", Gate])
def test_leaf_modules_make_untraceable_code_opaque(leaf):
    model = UntraceableNet().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = trace(model, x, leaf_modules=[leaf])
    names = [r.name for _, r in records(gm)]
    assert names == ["conv", "fc"]  # gate.proj sits inside the opaque leaf
    assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x))


def test_trace_rejects_bad_arguments_with_clear_messages():
    with pytest.raises(TraceError, match=r"^expected an nn\.Module to trace, found int$"):
        trace(3, torch.randn(1))  # type: ignore[arg-type]
    with pytest.raises(TraceError, match=r"^example_inputs must be a tensor or a tuple of positional inputs, "
                                         r"found dict$"):
        trace(PlainCNN(), {"x": torch.randn(1, 3, 16, 16)})


def test_trace_error_on_inputs_of_the_wrong_shape():
    with pytest.raises(TraceError) as exc:
        trace(PlainCNN(), torch.randn(1, 5, 16, 16))
    msg = str(exc.value)
    assert msg.startswith("running the traced PlainCNN on the example inputs failed")
    assert msg.endswith("Check that example_inputs have the shape and dtype the model expects "
                        "(got ['Tensor(1, 5, 16, 16) torch.float32']).")


def test_trace_accepts_a_tuple_of_inputs():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, a, b):
            return self.fc(a + b)

    gm = trace(Two(), (torch.randn(1, 3), torch.randn(1, 3)))
    assert [r.name for _, r in records(gm)] == ["fc"]


# ------------------------------------------------------------------------------------------- discovery


def _found(model, x):
    gm = trace(model, x)
    return {r.name: r for _, r in records(gm)}


def test_discovery_plain_cnn_macs_params_shapes():
    found = _found(PlainCNN(), torch.randn(1, 3, 16, 16))
    assert list(found) == ["conv1", "conv2", "fc"]
    assert [q.kind for q in found.values()] == [LayerKind.CONV, LayerKind.CONV, LayerKind.LINEAR]
    c1, c2, fc = found.values()
    assert c1.macs == 16 * 16 * 8 * 3 * 3 * 3
    assert c2.macs == 8 * 8 * 16 * 8 * 3 * 3
    assert fc.macs == 16 * 10
    assert (c1.params, c2.params, fc.params) == (8 * 27 + 8, 16 * 72, 170)
    assert (c2.in_shape, c2.out_shape) == ((1, 8, 16, 16), (1, 16, 8, 8))
    assert c1.module == "conv1" and c1.weight == "conv1.weight" and c1.bias == "conv1.bias" and c2.bias is None
    assert c2.conv is not None and c2.conv.stride == (2, 2) and c2.conv.padding == (1, 1) and fc.conv is None


def test_discovery_macs_are_per_sample():
    one = _found(PlainCNN(), torch.randn(1, 3, 16, 16))
    four = _found(PlainCNN(), torch.randn(4, 3, 16, 16))
    assert [r.macs for r in one.values()] == [r.macs for r in four.values()]


def test_discovery_grouped_and_depthwise():
    found = _found(GroupedNet(), torch.randn(1, 3, 8, 8))
    assert {n: (q.kind, q.groups) for n, q in found.items()} == {
        "conv": (LayerKind.CONV, 1),
        "grouped": (LayerKind.CONV, 2),
        "depthwise": (LayerKind.DEPTHWISE_CONV, 8),
        "pointwise": (LayerKind.CONV, 1),
        "fc": (LayerKind.LINEAR, 1),
    }
    assert found["grouped"].macs == 8 * 8 * 8 * (4 * 3 * 3)
    assert found["depthwise"].macs == 8 * 8 * 8 * 9


def test_discovery_functional_calls_with_parameter_weights_only():
    found = _found(FunctionalNet(), torch.randn(1, 3, 8, 8))
    assert list(found) == ["conv_weight", "fc_weight"]  # the buffer-weight conv (blur) is not a layer
    conv, fc = found["conv_weight"], found["fc_weight"]
    assert conv.module is None and conv.kind is LayerKind.CONV and conv.bias == "conv_bias"
    assert conv.conv.padding == (1, 1)
    assert fc.kind is LayerKind.LINEAR and fc.bias is None and fc.weight == "fc_weight"
    assert conv.macs == 8 * 8 * 8 * 27
    assert conv.params == 8 * 27 + 8


def test_discovery_functional_names_strip_the_weight_suffix():
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 6))

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = Inner()

        def forward(self, x):
            return torch.nn.functional.linear(x, self.proj.weight)

    found = _found(Outer(), torch.randn(1, 6))
    assert list(found) == ["proj"]
    assert found["proj"].weight == "proj.weight"


def test_discovery_conv1d():
    found = _found(Conv1dNet(), torch.randn(1, 4, 32))
    assert list(found) == ["conv1", "conv2", "fc"]
    assert found["conv1"].macs == 32 * 8 * 4 * 3
    assert found["conv2"].macs == 16 * 8 * 8 * 5
    assert found["conv2"].kind is LayerKind.CONV and found["conv2"].conv.dim == 1


def test_discovery_module_called_twice_gets_two_names():
    found = _found(SharedLinearNet(), torch.randn(1, 6))
    assert list(found) == ["fc", "fc#1", "head"]
    assert found["fc"].weight == found["fc#1"].weight == "fc.weight"


def test_discovery_residual_graph_order():
    found = _found(ResidualNet(), torch.randn(1, 3, 16, 16))
    assert list(found) == ["stem", "conv1", "conv2", "shortcut", "fc"]


def test_record_accessors():
    gm = trace(PlainCNN(), torch.randn(1, 3, 16, 16))
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv2")
    rec = record_of(node)
    assert isinstance(rec, LayerRecord) and rec.name == "conv2" and rec.searchable
    with pytest.raises(AttributeError):
        rec.macs = 3  # type: ignore[misc]
    node.meta["fxmpq"] = {"not": "a LayerRecord"}
    assert record_of(node) is None
    set_record(node, rec)
    assert record_of(node) is rec
    relu = next(n for n in gm.graph.nodes if n.name == "relu")
    assert record_of(relu) is None and match(gm, relu) is None


def test_matcher_reads_every_argument_spelling():
    class Spellings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.b = nn.Parameter(torch.zeros(4))
            self.lw = nn.Parameter(torch.randn(2, 4))

        def forward(self, x):
            y = torch.nn.functional.conv2d(x, self.w, self.b, 2, 1)
            z = torch.nn.functional.conv2d(input=x, weight=self.w, bias=None, stride=(2, 2), padding=(1, 1))
            return torch.nn.functional.linear(input=(y + z).mean((2, 3)), weight=self.lw)

    found = [r for _, r in records(trace(Spellings(), torch.randn(1, 3, 8, 8)))]
    assert [r.name for r in found] == ["w", "w#1", "lw"]
    assert found[0].conv == found[1].conv and found[0].conv.stride == (2, 2) and found[0].conv.padding == (1, 1)
    assert found[0].bias == "b" and found[1].bias is None
    assert found[0].out_shape == found[1].out_shape == (1, 4, 4, 4)
    assert found[2].kind is LayerKind.LINEAR and found[2].macs == 2 * 4


class _ConstantBiasMLP(nn.Module):
    """Swin-V2-style: an MLP over a constant table (a buffer) produces a bias added to the activations."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.linspace(-1, 1, 16).reshape(8, 2))
        self.cpb = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        bias = self.cpb(self.table).reshape(1, 8, 1, 1)
        y = self.conv2(torch.relu(self.conv(x)) + bias)
        return self.fc(y.mean((2, 3)))


def test_layers_on_constants_are_not_quantizable_layers(tmp_path):
    found = _found(_ConstantBiasMLP(), torch.randn(1, 3, 8, 8))
    assert list(found) == ["conv", "conv2", "fc"]  # cpb.0 / cpb.2 read a buffer: a constant, precomputed
    q = fxmpq.prepare(_ConstantBiasMLP().eval(), torch.randn(2, 3, 8, 8))
    fxmpq.apply_policy(q, {"conv2": (2, 3)}, torch.randn(8, 3, 8, 8))
    rep = fxmpq.lower(q, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), LowerOptions(samples=64))
    assert rep.passed and rep.quantized_layers == 3
