"""Measured hardware files: the file profile_hw writes, the totals it predicts, and every way it is refused.

The files here are written by fxmpq.profiling.profile.HardwareProfile.to_toml from made-up numbers (no timing), for the
layers of a tiny model traced at a given input shape, as tools/profile_hw.py would write them.
"""

from __future__ import annotations

import pytest
import torch
from models import PlainCNN, ResidualNet, TinyAttention

import fxmpq
from fxmpq.errors import HardwareSpecError, PolicyError
from fxmpq.hardware.spec import FLOAT, LayerKind, LayerSignature, load_hardware
from fxmpq.policy_search.baselines import random_indicators
from fxmpq.profiling.profile import INT8, HardwareProfile, LayerProfile, ort_target

REMAINDER = 0.125


def measured_file(tmp_path, model, shape=(1, 3, 16, 16), *, drop: str | None = None, name: str = "hw.toml",
                  chains: bool = False):
    """A profile_hw-style file for `model` at `shape`: layer i costs i+1 ms at W8A8 and 3(i+1) ms in float; with
    `chains`, a layer read back to back saves 0.75 ms at W8A8 and 0.5 ms in float after a layer in its format, and
    0.25 ms after one in the other format."""
    a = fxmpq.analyze(model, torch.randn(shape), hardware=ort_target())
    layers = [LayerProfile(r.name, LayerSignature.of(r), {INT8: float(i + 1), FLOAT: 3.0 * (i + 1)},
                           {INT8: 0.0, FLOAT: 0.0}, {INT8: r.params + 12, FLOAT: 4 * r.params},
                           after=r.input_layer if chains else None,
                           chain_ms={INT8: {INT8: -0.75, FLOAT: -0.25}, FLOAT: {FLOAT: -0.5, INT8: -0.25}}
                           if chains and r.input_layer else {})
              for i, r in enumerate(a.layers) if r.name != drop]
    sum_float = sum(lp.measured_ms[FLOAT] for lp in layers)
    sum_int8 = sum(lp.measured_ms[INT8] for lp in layers)
    chain_float = sum(lp.chain_ms.get(FLOAT, {}).get(FLOAT, 0.0) for lp in layers)
    chain_int8 = sum(lp.chain_ms.get(INT8, {}).get(INT8, 0.0) for lp in layers)
    prof = HardwareProfile(model=type(model).__name__, input=tuple(shape[1:]), batch=shape[0], threads=1, repeats=20,
                           clock="thread_cpu", layers=layers, float_model_ms=sum_float + chain_float + REMAINDER,
                           int8_model_ms=sum_int8 + chain_int8 + REMAINDER, command="test")
    path = tmp_path / name
    path.write_text(prof.to_toml())
    return path


def test_file_parses_and_predicts_layers_plus_the_rest_once(tmp_path):
    path = measured_file(tmp_path, PlainCNN())
    hw = load_hardware(path)
    # matmuls are not timed alone (priced 0 by the file), so they stay integer: not a float kind
    assert hw.pairs == ((8, 8),) and hw.float_kinds == {*fxmpq.LayerKind} - {fxmpq.LayerKind.MATMUL}
    assert not hw.pins.first_layer and not hw.pins.last_layer
    assert hw.metrics["latency"].unit == "ms" and hw.metrics["bytes"].unit == "bytes"
    assert hw.provenance.threads == 1 and hw.provenance.batch == 1 and hw.provenance.input == "3x16x16"
    from fxmpq.core.cpuinfo import (
        cpu_info,  # the CPU it was measured on, with the features int8 speed depends on
    )

    assert hw.provenance.isa == cpu_info().features and hw.provenance.cpu_vendor == cpu_info().vendor
    a = fxmpq.analyze(PlainCNN(), torch.randn(1, 3, 16, 16), hardware=path)
    assert a.names == ["conv1", "conv2", "fc"]
    all_int8 = a.cost({n: INT8 for n in a.names})
    assert all_int8["latency"] == pytest.approx(1 + 2 + 3 + REMAINDER)  # the rest counted once
    mixed = a.cost({"conv1": FLOAT, "conv2": INT8, "fc": FLOAT})
    assert mixed["latency"] == pytest.approx(3 + 2 + 9 + REMAINDER)
    assert mixed["bytes"] == 4 * a.layer("conv1").params + a.layer("conv2").params + 12 + 4 * a.layer("fc").params
    assert "(rest of the model)" in a.table(fxmpq.Policy({n: INT8 for n in a.names}))


def test_search_under_a_latency_budget_counts_the_rest(tmp_path):
    path = measured_file(tmp_path, PlainCNN())
    a = fxmpq.analyze(PlainCNN(), torch.randn(1, 3, 16, 16), hardware=path)
    ind = random_indicators(tuple(a.names), (8,), seed=0)
    res = fxmpq.search(a, ind, "latency<=12.5")
    assert res.totals["latency"] == pytest.approx(a.cost(res.policy)["latency"]) and res.totals["latency"] <= 12.5
    assert any(res.policy[n] == FLOAT for n in a.names)
    with pytest.raises(fxmpq.InfeasibleBudget, match=r"smallest achievable 6\.125"):  # 1 + 2 + 3 + the rest
        fxmpq.search(a, ind, "latency<=6")


def test_quantize_with_a_measured_file_and_a_latency_budget(tmp_path):
    path = measured_file(tmp_path, PlainCNN())
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    r = fxmpq.quantize(PlainCNN(), "latency<=12.5", data, torch.randn(1, 3, 16, 16), hardware=path,
                       work_dir=tmp_path / "run", finetune_epochs=0, progress=False)
    assert r.model.bits == (8,)  # the hardware's bit-widths, the paper's 2..6 being absent
    assert r.analysis.cost(r.policy)["latency"] <= 12.5
    audit = r.audit
    assert audit is not None and audit.predicted_latency_ms == pytest.approx(r.analysis.cost(r.policy)["latency"])
    assert audit.measured_latency_ms > 0 and audit.latency_threads == 1 and audit.latency_batch == 1
    assert (tmp_path / "run" / "audit.json").is_file() and (tmp_path / "run" / "model.onnx").is_file()


def test_a_file_for_another_model_is_refused(tmp_path):
    path = measured_file(tmp_path, PlainCNN())
    with pytest.raises(HardwareSpecError) as exc:
        fxmpq.analyze(ResidualNet(), torch.randn(1, 3, 16, 16), hardware=path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: metrics.latency.terms[1].layers: no entry for layer 'stem'")
    assert "measured on another model" in msg
    # a model with a subset of the file's layers: the extra entries give it away
    small = torch.nn.Sequential()
    small.add_module("conv1", torch.nn.Conv2d(3, 8, 3, padding=1))
    with pytest.raises(HardwareSpecError, match=r"entries for 2 layer\(s\) this model does not have \('conv2', 'fc'\)"):
        fxmpq.analyze(small, torch.randn(1, 3, 16, 16), hardware=path)


def test_a_file_for_another_input_shape_or_batch_is_refused(tmp_path):
    path = measured_file(tmp_path, PlainCNN())
    with pytest.raises(HardwareSpecError) as exc:
        fxmpq.prepare(PlainCNN(), torch.randn(1, 3, 32, 32), hardware=path, bits=(8,))
    assert str(exc.value).startswith(
        f"{path}: metrics.latency.terms[1].layers.conv1: measured on conv 1x3x16x16->1x8x16x16, weight 8x3x3x3, but "
        f"this model's layer is conv 1x3x32x32->1x8x32x32, weight 8x3x3x3")
    with pytest.raises(HardwareSpecError, match=r"measured on conv 1x3x16x16->1x8x16x16.* is conv 8x3x16x16"):
        fxmpq.analyze(PlainCNN(), torch.randn(8, 3, 16, 16), hardware=path)


def test_a_file_missing_a_layer_is_refused(tmp_path):
    path = measured_file(tmp_path, PlainCNN(), drop="conv2")
    with pytest.raises(HardwareSpecError, match=rf"^{path}: metrics.latency.terms\[1\].layers: no entry for layer "
                                                r"'conv2' \(conv 1x8x16x16->1x16x8x8, weight 16x8x3x3\)"):
        fxmpq.analyze(PlainCNN(), torch.randn(1, 3, 16, 16), hardware=path)


def test_a_format_the_runtime_cannot_run_is_refused(tmp_path):
    path = measured_file(tmp_path, PlainCNN())
    x = torch.randn(1, 3, 16, 16)
    q = fxmpq.prepare(PlainCNN(), x, hardware=path, bits=(8,))
    with pytest.raises(PolicyError) as exc:
        fxmpq.apply_policy(q, {"conv1": INT8, "conv2": (4, 8), "fc": FLOAT}, x)
    assert (f"bits hardware 'ort_cpu' ({path}) does not run: conv2 W4A8 (supported pairs: W8A8; float for conv, "
            f"depthwise_conv, linear layers)") in str(exc.value)  # the one policy check's wording (cost/policy.py)
    with pytest.raises(PolicyError, match=r"candidate bits \[4\] are not supported by hardware 'ort_cpu'"):
        fxmpq.prepare(PlainCNN(), x, hardware=path, bits=(4, 8))
    a = fxmpq.analyze(PlainCNN(), x, hardware=path)
    with pytest.raises(HardwareSpecError, match=r"layers.conv2: no value for layer 'conv2' as W4A8; the file prices "
                                                r"W8A8, float"):
        a.layer_cost("conv2", 4, 8)


def test_a_format_the_target_offers_but_the_file_does_not_price_is_refused(tmp_path):
    path = measured_file(tmp_path, PlainCNN())
    text = path.read_text().replace("weight_bits = [8]", "weight_bits = [4, 8]").replace(
        "pairs = [[8, 8]]", "pairs = [[4, 8], [8, 8]]")
    path.write_text(text)
    with pytest.raises(HardwareSpecError) as exc:
        load_hardware(path)
    assert str(exc.value) == (f"{path}: metrics.latency.terms[1].layers.conv1: no value for format(s) 4x8, which the "
                              f"target offers a conv layer")


def test_chains_price_layers_back_to_back_and_the_search_is_exact(tmp_path):
    """ResidualNet: stem feeds conv1 and shortcut back to back (through a ReLU), conv1 feeds conv2; fc reads a mean.
    The search (those four choose together) finds the brute-force optimum under every budget."""
    import itertools

    path = measured_file(tmp_path, ResidualNet(), chains=True)
    hw = load_hardware(path)
    assert hw.chained
    a = fxmpq.analyze(ResidualNet(), torch.randn(1, 3, 16, 16), hardware=path)
    assert {m.name: m.input_layer for m in a.layers} == {"stem": None, "conv1": "stem", "conv2": "conv1",
                                                         "shortcut": "stem", "fc": None}
    base = {"stem": 1, "conv1": 2, "conv2": 3, "shortcut": 4, "fc": 5}
    all_int8 = a.cost({n: INT8 for n in a.names})["latency"]
    assert all_int8 == pytest.approx(sum(base.values()) - 3 * 0.75 + REMAINDER)
    mixed = {"stem": INT8, "conv1": INT8, "conv2": FLOAT, "shortcut": FLOAT, "fc": FLOAT}
    assert a.cost(mixed)["latency"] == pytest.approx(1 + 2 - 0.75 + 9 - 0.25 + 12 - 0.25 + 15 + REMAINDER)
    assert a.policy_costs(mixed)["conv1"]["latency"] == pytest.approx(2 - 0.75)
    ind = random_indicators(tuple(a.names), (8,), seed=3)

    def objective(pol):
        return sum(0.0 if pol[n] == FLOAT else 2 * ind.weight[n][8] + ind.act[n][8] for n in pol)

    combos = [dict(zip(a.names, c)) for c in itertools.product([INT8, FLOAT], repeat=len(a.names))]
    lat_float = a.cost({n: FLOAT for n in a.names})["latency"]
    for frac in (0.1, 0.3, 0.5, 0.7, 0.9):
        budget = all_int8 + frac * (lat_float - all_int8)
        res = fxmpq.search(a, ind, f"latency<={budget!r}")
        assert res.totals["latency"] == pytest.approx(a.cost(res.policy)["latency"])
        assert res.totals["latency"] <= budget + 1e-9
        best = min(objective(p) for p in combos if a.cost(p)["latency"] <= budget + 1e-9)
        assert res.objective == pytest.approx(best)


def test_a_chain_for_another_producer_is_refused(tmp_path):
    path = measured_file(tmp_path, PlainCNN(), chains=True)
    text = path.read_text()
    path.write_text(text.replace('after = "conv1"', 'after = "fc"'))
    with pytest.raises(HardwareSpecError, match=r"layers.conv2.after: measured reading layer 'fc' back to back, "
                                                r"but in this model it reads layer 'conv1'"):
        fxmpq.analyze(PlainCNN(), torch.randn(1, 3, 16, 16), hardware=path)
    path.write_text(text.replace('after = "conv1"', 'after = "stem"'))
    with pytest.raises(HardwareSpecError, match=r"after: names no layer of this table \('stem'\)"):
        load_hardware(path)


def _canonical(path) -> list:
    """An ONNX file's nodes as a sorted list of (op, domain, attributes, inputs by content): equal for two files
    that compute the same thing with the same constants, whatever their tensor names and node order."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}

    def arg(t: str) -> tuple:
        v = inits.get(t)
        return ("tensor",) if v is None else (v.dtype.str, v.shape, v.tobytes())

    return sorted(((n.op_type, n.domain, repr(sorted((a.name, repr(onnx.helper.get_attribute_value(a)))
                                                      for a in n.attribute)), tuple(arg(t) for t in n.input))
                   for n in g.node), key=repr)


@pytest.mark.parametrize("model, shape", [(PlainCNN, (3, 16, 16)), (TinyAttention, (4, 8))])
def test_bundled_exports_equal_one_export_per_model(tmp_path, model, shape):
    """Profiling exports its one-layer and pair models as branches of one bundle and cuts them apart: each file
    holds the nodes and constants that lowering the model alone writes (every format profiling times, a weight-only
    linear, a matmul of two activations, a pair back to back in mixed formats)."""
    from fxmpq.capture.record import records
    from fxmpq.profiling import profile as prof
    from fxmpq.profiling.bundle import Part, export_one, export_parts
    from fxmpq.profiling.profile_models import one_layer_module, pair_module

    torch.manual_seed(0)
    hw = ort_target()
    a = fxmpq.analyze(model().eval(), torch.randn(1, *shape), hardware=hw)
    node_of = {r.name: n for n, r in records(a.graph_module)}
    by_name = {r.name: r for r in a.layers}
    parts = [Part(one_layer_module(a.graph_module, node_of[r.name]),
                  prof._random(prof._input_shapes(r), torch.Generator().manual_seed(i)), [f], tmp_path / f"b{i}_{j}.onnx")
             for i, r in enumerate(a.layers) for j, f in enumerate(prof._measured_formats(r, hw))]
    pairs = [(r.input_layer, r.name) for r in a.layers if r.input_layer in by_name  # as profile_model pairs them
             and LayerKind.MATMUL not in (r.kind, by_name[r.input_layer].kind)]
    parts += [Part(pair_module(a.graph_module, node_of[u], node_of[v]), torch.randn(by_name[u].in_shape), [fu, fv],
                   tmp_path / f"p{k}.onnx") for k, (u, v, fu, fv) in enumerate((u, v, fu, fv) for u, v in pairs
                                                                               for fu in (INT8, FLOAT) for fv in (FLOAT, INT8))]
    assert len({tuple(p.formats) for p in parts}) >= 3
    export_parts(parts, hw)
    for k, p in enumerate(parts):
        alone = export_one(p.module, p.inputs, p.formats, tmp_path / f"alone{k}.onnx", hw)
        assert _canonical(p.path) == _canonical(alone), (p.path.name, p.formats)


def test_a_bundle_that_fails_is_exported_part_by_part(tmp_path, monkeypatch):
    """When the bundle's export fails, every part is lowered alone (so a failing layer raises lower()'s own error,
    naming it) and the files are still written."""
    from fxmpq.profiling import bundle
    from fxmpq.profiling.profile_models import one_layer_module

    def broken(*args, **kwargs):
        raise RuntimeError("the exporter choked on the bundle")

    monkeypatch.setattr(bundle, "_export_bundle", broken)
    hw = ort_target()
    a = fxmpq.analyze(PlainCNN().eval(), torch.randn(1, 3, 16, 16), hardware=hw)
    from fxmpq.capture.record import records

    node = next(n for n, r in records(a.graph_module) if r.name == "conv2")
    parts = [bundle.Part(one_layer_module(a.graph_module, node), torch.randn(1, 8, 16, 16), [f], tmp_path / f"{i}.onnx")
             for i, f in enumerate((INT8, FLOAT))]
    bundle.export_parts(parts, hw)
    assert all(p.path.is_file() for p in parts)


def test_bundles_export_in_forked_workers_to_the_same_files(tmp_path, monkeypatch):
    """Two processes export the bundles at once: the files equal those of one process; an error in a worker comes
    back with its class and message (the layer named)."""
    from fxmpq.capture.record import records
    from fxmpq.errors import ExportError
    from fxmpq.profiling import bundle
    from fxmpq.profiling import profile as prof
    from fxmpq.profiling.profile_models import one_layer_module

    if not bundle.can_fork():
        pytest.skip("no fork on this platform")
    monkeypatch.setattr(bundle, "MAX_PARTS", 2)
    hw = ort_target()
    a = fxmpq.analyze(PlainCNN().eval(), torch.randn(1, 3, 16, 16), hardware=hw)
    node_of = {r.name: n for n, r in records(a.graph_module)}

    def parts(d):
        d.mkdir()
        return [bundle.Part(one_layer_module(a.graph_module, node_of[r.name]),
                            prof._random(prof._input_shapes(r), torch.Generator().manual_seed(i)), [f], d / f"{i}_{j}.onnx")
                for i, r in enumerate(a.layers) for j, f in enumerate((INT8, FLOAT))]

    one, two = parts(tmp_path / "one"), parts(tmp_path / "two")
    assert len(bundle._chunks(two)) >= 3
    bundle.export_parts(one, hw, workers=1)
    bundle.export_parts(two, hw, workers=2)
    for p, q in zip(one, two):
        assert _canonical(p.path) == _canonical(q.path)

    def broken(*args, **kwargs):
        raise RuntimeError("the exporter choked on the bundle")

    def refuse(module, inputs, formats, path, hw, storage="int8"):
        raise ExportError(f"layer conv2: refused for {path.name}")

    monkeypatch.setattr(bundle, "_export_bundle", broken)
    monkeypatch.setattr(bundle, "export_one", refuse)
    with pytest.raises(ExportError, match="layer conv2: refused"):
        bundle.export_parts(parts(tmp_path / "three"), hw, workers=2)
