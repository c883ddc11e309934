"""Packed weight storage: <= 4-bit weights as INT4 initializers, parity on the packed file, fxmpq.ort_session."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from models import PoolResNet, ResidualNet
from onnx import TensorProto, numpy_helper

import fxmpq
from fxmpq.capture.record import records
from fxmpq.core.options import LowerOptions
from fxmpq.export.lower import lower, qlinear_counts
from fxmpq.quant.storage import Storage, widen
from fxmpq.stages import apply_policy, prepare

BITS = (2, 3, 4, 5, 6, 7, 8)
MIXED = (2, 4, 8, 3, 5)  # the searchable layers' weight bits, in turn


def _mixed(model: torch.nn.Module, per_channel: bool):
    """The model prepared, a 2/4/8/3/5-bit weight policy (8-bit activations) applied; with its example input."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    q = prepare(model.eval(), x, bits=BITS, per_channel=per_channel)
    apply_policy(q, {n: (MIXED[i % len(MIXED)], 8) for i, n in enumerate(q.searchable_names)},
                 torch.randn(16, 3, 16, 16))
    return q.eval(), x


def _weights(q) -> dict[str, tuple[int, int]]:
    """Each quantized layer's weight initializer name -> (weight bits, values) from the policy in force."""
    shapes = {r.name: r.weight_shape for _, r in records(q.graph_module)}
    return {f"fxmpq_lowered.{name.replace('.', '_')}_weight": (w, math.prod(shapes[name]))
            for name, (w, _) in q.policy.items()}


def _both(tmp_path, q, x):
    """The int8 and the packed export of `q` (no latency audit) and their reports."""
    r8 = lower(q, tmp_path / "int8.onnx", x, LowerOptions(samples=64, measure=False))
    r4 = lower(q, tmp_path / "packed.onnx", x, LowerOptions(samples=64, measure=False, storage="packed"))
    return r8, r4


@pytest.fixture(scope="module", params=[(ResidualNet, True), (PoolResNet, False)], ids=["residual", "poolres"])
def exported(request, tmp_path_factory):
    model_cls, per_channel = request.param
    d = tmp_path_factory.mktemp("storage")
    q, x = _mixed(model_cls(), per_channel)
    r8, r4 = _both(d, q, x)
    return q, x, d, r8, r4


def test_packed_initializers_are_int4_below_5_bits_and_sized_by_the_policy(exported):
    q, _, d, r8, r4 = exported
    weights = _weights(q)
    assert {w for w, _ in weights.values()} >= {2, 4, 8}
    inits8 = {t.name: t for t in onnx.load(str(d / "int8.onnx")).graph.initializer}
    inits4 = {t.name: t for t in onnx.load(str(d / "packed.onnx")).graph.initializer}
    saved = 0
    for name, (w, n) in weights.items():
        t8, t4 = inits8[name], inits4[name]
        assert t8.data_type == TensorProto.INT8 and len(t8.raw_data) == n
        if w <= 4:  # signed weights in the signed 4-bit container, two to a byte
            assert t4.data_type == TensorProto.INT4 and len(t4.raw_data) == math.ceil(n / 2), name
            saved += n - math.ceil(n / 2)
        else:
            assert t4.data_type == TensorProto.INT8 and len(t4.raw_data) == n, name
        assert np.array_equal(numpy_helper.to_array(t4).astype(np.int8), numpy_helper.to_array(t8)), name
    expected = sum(math.ceil(n * (4 if w <= 4 else 8) / 8) for w, n in weights.values())
    assert r4.stored_weight_bytes == expected
    assert r8.stored_weight_bytes == sum(n for _, n in weights.values())
    assert r4.packed_weight_bytes == r8.packed_weight_bytes == sum(n * w for w, n in weights.values()) // 8
    # the files differ by the bytes the 4-bit containers save (and a few bytes of metadata)
    assert abs((r8.onnx_bytes - r4.onnx_bytes) - saved) <= 16
    assert r4.onnx_bytes == (d / "packed.onnx").stat().st_size


def test_report_and_metadata_name_each_layers_container(exported):
    q, _, d, r8, r4 = exported
    expected = {name: "int4" if w <= 4 else "int8" for name, (w, _) in q.policy.items()}
    assert (r8.storage, r4.storage) == ("int8", "packed")
    assert r4.weight_containers == expected
    assert r8.weight_containers == dict.fromkeys(expected, "int8")
    meta = {p.key: p.value for p in onnx.load(str(d / "packed.onnx")).metadata_props}
    assert meta["fxmpq.storage"] == "packed"
    assert json.loads(meta["fxmpq.weight_containers"]) == expected
    table = r4.table()
    assert "storage        packed" in table and "vs the policy's packed" in table
    assert f"{r4.fused_layers_plain}/{r4.quantized_layers} when the packed file is opened plainly" in table


def test_parity_is_checked_on_the_packed_file(exported):
    _, _, d, r8, r4 = exported
    onnx.checker.check_model(str(d / "packed.onnx"), full_check=True)
    assert r4.passed and r4.max_diff_steps is not None and r4.max_diff_steps <= 1.0
    assert r4.top1_agreement is not None and r8.passed
    # ONNX Runtime runs the 4-bit layers in float when the file is opened plainly
    plain = qlinear_counts(d / "packed.onnx")
    n4 = sum(c == "int4" for c in r4.weight_containers.values())
    assert plain["QLinearConv"] == r4.quantized_layers - n4 == r4.fused_layers_plain
    assert r8.fused_layers_plain is None


def test_ort_session_of_the_packed_file_is_the_int8_session_bit_for_bit(exported, tmp_path):
    _, _, d, r8, r4 = exported
    packed = fxmpq.ort_session(d / "packed.onnx", optimized_path=tmp_path / "opt.onnx")
    opt = onnx.load(str(tmp_path / "opt.onnx"))
    assert sum(n.op_type == "QLinearConv" for n in opt.graph.node) == r4.quantized_layers
    assert r4.fused_layers == r8.fused_layers == r4.quantized_layers
    plain8 = ort.InferenceSession(str(d / "int8.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32)
    y4 = packed.run(None, {"input": x})[0]
    y8 = plain8.run(None, {"input": x})[0]
    assert np.array_equal(y4, y8)


def test_ort_session_reads_external_data(exported, tmp_path):
    _, _, d, _, _ = exported
    m = onnx.load(str(d / "packed.onnx"))
    onnx.save_model(m, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").is_file()
    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    y = fxmpq.ort_session(tmp_path / "ext.onnx").run(None, {"input": x})[0]
    assert np.array_equal(y, fxmpq.ort_session(d / "int8.onnx").run(None, {"input": x})[0])
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(fxmpq.ArgumentError, match="external data"):
        fxmpq.ort_session(tmp_path / "ext.onnx")


def test_widen_restores_the_int8_graph(exported):
    _, _, d, _, _ = exported
    m4, m8 = onnx.load(str(d / "packed.onnx")), onnx.load(str(d / "int8.onnx"))
    assert widen(m4) == sum(t.data_type == TensorProto.INT4 for t in onnx.load(str(d / "packed.onnx")).graph.initializer)
    assert {t.name: numpy_helper.to_array(t).dtype for t in m4.graph.initializer} == \
        {t.name: numpy_helper.to_array(t).dtype for t in m8.graph.initializer}
    onnx.checker.check_model(m4, full_check=True)
    assert widen(m8) == 0


def test_eight_bit_policy_packed_is_the_int8_file(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    q = prepare(ResidualNet().eval(), x, bits=(8,))
    apply_policy(q, {n: (8, 8) for n in q.searchable_names}, x)
    r4 = lower(
        q.eval(), tmp_path / "p.onnx", x, LowerOptions(samples=8, measure=False, storage=Storage.PACKED)
    )
    assert set(r4.weight_containers.values()) == {"int8"} and r4.fused_layers_plain is None
    assert r4.fused_layers == r4.quantized_layers


def test_latency_audit_of_a_packed_file_times_the_widened_session(exported, tmp_path):
    q, x, _, _, _ = exported
    rep = lower(q, tmp_path / "p.onnx", x, LowerOptions(samples=8, repeats=2, storage="packed"))
    assert rep.measured_latency_ms is not None and not rep.format_mismatches
    assert all(t.integer for t in rep.layer_timings)


@pytest.mark.parametrize("bad", ["int3", "INT4", 4, None])
def test_bad_storage_is_one_argument_error_naming_it(tmp_path, exported, bad):
    q, x, _, _, _ = exported
    with pytest.raises(fxmpq.ArgumentError, match=r"lower: storage must be one of 'int8', 'packed'"):
        lower(q, tmp_path / "m.onnx", x, LowerOptions(storage=bad))
    assert not (tmp_path / "m.onnx").exists()


def test_ort_session_bad_input(tmp_path):
    with pytest.raises(fxmpq.ArgumentError, match=r"ort_session: path: no ONNX file at .*missing\.onnx"):
        fxmpq.ort_session(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\xff not a model")
    with pytest.raises(fxmpq.ArgumentError, match=r"junk\.onnx is not a readable ONNX model"):
        fxmpq.ort_session(tmp_path / "junk.onnx")
    with pytest.raises(fxmpq.ArgumentError, match="ort_session: threads"):
        fxmpq.ort_session(tmp_path / "junk.onnx", threads=0)
