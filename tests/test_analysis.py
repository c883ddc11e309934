"""Tests of fxmpq.analyze: per-layer records, pins, costs under policies and shared inputs."""

from __future__ import annotations

import math

import pytest
import torch
from models import GroupedNet, PlainCNN, ResidualNet, UntraceableNet

import fxmpq
from fxmpq import Analysis, LayerKind, Pins, Policy, PolicyError, analyze
from fxmpq.capture.record import record_of
from fxmpq.hardware.spec import loads_hardware

X16 = torch.randn(1, 3, 16, 16)


@pytest.fixture(scope="module")
def plain() -> Analysis:
    return analyze(PlainCNN(), torch.randn(1, 3, 16, 16))


def test_layers_in_graph_order_with_pins(plain):
    assert plain.names == ["conv1", "conv2", "fc"]
    assert [m.pinned for m in plain.layers] == [True, False, True]
    assert plain.layer("conv1").pin_bits == (8, 8) and plain.layer("conv2").pin_bits is None
    assert [m.name for m in plain.searchable] == ["conv2"]
    assert [m.name for m in plain.pinned] == ["conv1", "fc"]
    assert plain.metrics == ["bitops", "size"]
    conv2 = plain.layer("conv2")
    assert (conv2.kind, conv2.macs, conv2.params) == (LayerKind.CONV, 73728, 1152)
    assert conv2.in_shape == (1, 8, 16, 16) and conv2.out_shape == (1, 16, 8, 8)
    assert conv2.input_node == "relu"


def test_metadata_lives_on_the_graph_nodes(plain):
    metas = [record_of(n) for n in plain.graph_module.graph.nodes]
    assert [m.name for m in metas if m is not None] == plain.names
    meta = plain.layer("conv2")
    assert meta.costs[(4, 6)] == {"bitops": 73728 * 24, "size": 1152 * 4}
    assert set(meta.costs) == set(plain.hardware.pairs)


def test_unknown_layer_lists_the_names(plain):
    with pytest.raises(PolicyError) as exc:
        plain.layer("conv9")
    assert str(exc.value) == "no quantizable layer 'conv9'; layers: conv1, conv2, fc"


def test_cost_of_a_policy_sums_layer_costs(plain):
    policy = Policy({"conv2": (3, 5)})
    cost = plain.cost(policy)
    macs = {m.name: m.macs for m in plain.layers}
    params = {m.name: m.params for m in plain.layers}
    assert cost["bitops"] == macs["conv1"] * 64 + macs["conv2"] * 15 + macs["fc"] * 64
    assert cost["size"] == params["conv1"] * 8 + params["conv2"] * 3 + params["fc"] * 8
    assert plain.cost({"conv2": (3, 5)}) == cost  # a plain mapping works too
    assert plain.layer_cost("conv2", 3, 5) == {"bitops": macs["conv2"] * 15, "size": params["conv2"] * 3}


def test_fp32_cost(plain):
    fp = plain.fp32_cost()
    assert fp["bitops"] == sum(m.macs for m in plain.layers) * 32 * 32
    assert fp["size"] == sum(m.params for m in plain.layers) * 32


def test_fp32_cost_is_nan_for_table_metrics():
    a = analyze(PlainCNN(), X16, hardware="a100_int")
    fp = a.fp32_cost()
    assert math.isnan(fp["latency"])
    assert fp["bitops"] == sum(m.macs for m in a.layers) * 1024


def test_pins_override_and_by_name():
    a = analyze(PlainCNN(), X16, pins=Pins(first_layer=False, last_layer=False))
    assert not a.pinned
    b = analyze(PlainCNN(), X16, pins=Pins(first_layer=False, last_layer=True, w_bits=6, a_bits=4,
                                               layers=("conv2",)))
    assert [(m.name, m.pin_bits) for m in b.pinned] == [("conv2", (6, 4)), ("fc", (6, 4))]


def test_pinning_unknown_layer_is_an_error():
    with pytest.raises(PolicyError) as exc:
        analyze(PlainCNN(), X16, pins=Pins(layers=("conv3", "head")))
    assert str(exc.value) == ("pinned layer(s) 'conv3', 'head' (hardware 'bitops', pins.layers) are not "
                              "quantizable layers of this model; its layers are: conv1, conv2, fc")


def test_pinned_bits_must_be_supported():
    with pytest.raises(PolicyError) as exc:
        analyze(PlainCNN(), X16, hardware="a100_int", pins=Pins(w_bits=4, a_bits=8))
    assert str(exc.value) == ("pinned bits W4A8 are not a pair hardware 'a100_int' runs (a100_int.toml (shipped)); "
                              "supported pairs: ((4, 4), (8, 8))")


def test_pins_from_the_hardware_file():
    hw = loads_hardware("""
[target]
name = "t"
weight_bits = [4, 8]
act_bits = [8]
[pins]
first_layer = false
last_layer = false
layers = ["conv2"]
[metrics.size]
terms = [{ type = "weight_bits" }]
""", "t.toml")
    a = analyze(PlainCNN(), X16, hardware=hw)
    assert [m.name for m in a.pinned] == ["conv2"]


def test_shared_input_groups():
    a = analyze(ResidualNet(), X16)
    assert a.shared_input_groups() == [["conv1", "shortcut"]]
    assert analyze(PlainCNN(), X16).shared_input_groups() == []


def test_table_lists_layers_and_totals(plain):
    text = plain.table(Policy.uniform(plain, 4, 4))
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "kind", "MACs", "params", "W/A", "bitops", "size"]
    assert lines[2].split()[:5] == ["conv1", "conv", "55,296", "224", "W8A8*"]
    assert lines[3].split()[:5] == ["conv2", "conv", "73,728", "1,152", "W4A4"]
    total = lines[-2].split()
    assert total[0] == "total" and total[1] == f"{sum(m.macs for m in plain.layers):,}"
    assert float(total[-2]) == pytest.approx(plain.cost(Policy.uniform(plain, 4, 4))["bitops"], rel=1e-3)
    assert lines[-1] == "(* pinned)"
    bare = plain.table()
    assert "search" in bare


def test_every_shipped_target_prices_a_model():
    for name in fxmpq.builtin_hardware():
        prov = fxmpq.load_hardware(name).provenance
        if prov is not None and prov.model:  # measured on one model: price that model, at its shape
            model = fxmpq.models.build_model(prov.model)
            x = torch.randn(prov.batch, *(int(d) for d in prov.input.split("x")))
        else:
            model, x = GroupedNet(), torch.randn(1, 3, 8, 8)
        a = analyze(model, x, hardware=name)
        w, aa = max(a.hardware.pairs)
        cost = a.cost(Policy.uniform(a, w, aa))
        assert set(cost) == set(a.hardware.metrics)
        assert all(v > 0 for v in cost.values()), (name, cost)


def test_depthwise_kind_reaches_the_cost_terms():
    hw = loads_hardware("""
[target]
name = "dw"
weight_bits = [8]
act_bits = [8]
[metrics.dw_macs]
terms = [{ type = "macs", kinds = ["depthwise_conv"] }]
""", "dw.toml")
    a = analyze(GroupedNet(), torch.randn(1, 3, 8, 8), hardware=hw)
    assert a.cost(Policy.uniform(a, 8, 8))["dw_macs"] == a.layer("depthwise").macs


def test_analyze_does_not_mutate_the_model():
    model = PlainCNN().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analyze(model, torch.randn(4, 3, 16, 16) * 3)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_analyze_with_leaf_modules_and_trace_errors():
    with pytest.raises(fxmpq.TraceError, match="leaf_modules=\\['gate'\\]"):
        analyze(UntraceableNet(), torch.randn(1, 3, 8, 8))
    a = analyze(UntraceableNet(), torch.randn(1, 3, 8, 8), leaf_modules=["gate"])
    assert a.names == ["conv", "fc"]


def test_analyze_unknown_hardware():
    with pytest.raises(fxmpq.HardwareSpecError, match=r"^unknown hardware 'nope': shipped targets are"):
        analyze(PlainCNN(), X16, hardware="nope")
