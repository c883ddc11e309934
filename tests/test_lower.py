"""Lowering to QDQ ONNX: ONNX Runtime matches PyTorch, integer weights in range, no BN, integer kernels."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from models import GroupedNet, PlainCNN, PoolResNet, ResidualNet
from onnx import numpy_helper

from fxmpq.core.options import LowerOptions
from fxmpq.errors import ExportError
from fxmpq.export.lower import LowerReport, lower, qlinear_counts
from fxmpq.stages import apply_policy, prepare

BITS = (2, 3, 4, 5, 6, 7, 8)


def _random_policy(q, seed=0):
    rng = random.Random(seed)
    return {n: (rng.randint(2, 8), rng.randint(2, 8)) for n in q.searchable_names}


def _quantized(model, shape, per_channel, seed=0):
    x = torch.randn(*shape)
    q = prepare(model.eval(), x, bits=BITS, per_channel=per_channel)
    pol = _random_policy(q, seed)
    apply_policy(q, pol, torch.randn(16, *shape[1:]))
    q.eval()
    return q, x, pol


def _check_model_file(path: Path, q, pol) -> onnx.ModelProto:
    m = onnx.load(str(path))
    assert m.opset_import[0].version == 21
    ops = [n.op_type for n in m.graph.node]
    assert "BatchNormalization" not in ops
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    # the b-bit range of each layer's weights, from the policy in force (pins included)
    ranges = {f"fxmpq_lowered_{name.replace('.', '_')}_weight": (-(2 ** (w - 1)), 2 ** (w - 1) - 1)
              for name, (w, _) in q.policy.items()}
    checked = 0
    for n in m.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        w = inits[n.input[0]]
        if w.dtype == np.int8:  # a weight: integers inside the layer's b-bit range
            lo, hi = ranges[n.input[0].replace(".", "_")]
            assert w.min() >= lo and w.max() <= hi, n.input[0]
            checked += 1
        else:
            assert w.dtype == np.int32  # biases
    assert checked == len([L for L in q.layer_names])
    meta = {p.key: p.value for p in m.metadata_props}
    stored = json.loads(meta["fxmpq.policy"])
    for name, (w, a) in pol.items():
        assert stored[name] == [w, a]
    return m


@pytest.mark.parametrize("model_cls,per_channel", [(PlainCNN, False), (PlainCNN, True), (ResidualNet, True),
                                                   (GroupedNet, False)])
def test_tiny_models_match_bit_for_bit(tmp_path, model_cls, per_channel):
    shape = (2, 3, 8, 8) if model_cls is GroupedNet else (2, 3, 16, 16)
    q, x, pol = _quantized(model_cls(), shape, per_channel)
    rep = lower(q, tmp_path / "m.onnx", x, LowerOptions(samples=512))
    assert isinstance(rep, LowerReport) and rep.passed
    assert rep.top1_agreement == 1.0 and rep.max_diff_steps == 0.0
    assert rep.fused_layers == rep.quantized_layers == len(q.layer_names)
    _check_model_file(tmp_path / "m.onnx", q, pol)
    assert "parity" in rep.table()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_residual_sums_run_as_qlinear_add_bit_for_bit(tmp_path, seed):
    """Random 2..8-bit policies: every residual sum of quantized tensors is a QLinearAdd, simulated exactly."""
    q, x, pol = _quantized(PoolResNet(), (2, 3, 16, 16), per_channel=seed == 1, seed=seed)
    rep = lower(q, tmp_path / "m.onnx", x, LowerOptions(samples=512))
    assert rep.passed and rep.max_diff_steps == 0.0 and rep.top1_agreement == 1.0
    assert rep.fused_layers == rep.quantized_layers == len(q.layer_names)
    _check_model_file(tmp_path / "m.onnx", q, pol)
    counts = qlinear_counts(tmp_path / "m.onnx")
    # the second sum always reads two output quantizers; the first reads the pooled stem output quantized only
    # when the block's first conv quantizes it at 8 bits (then the pool runs on uint8 too)
    eight = q.act_quantizer("a1").active_bits == 8
    assert counts["QLinearAdd"] == (2 if eight else 1) and counts["Add"] == (0 if eight else 1)
    assert counts["NhwcMaxPool"] == (1 if eight else 0)


def test_uniform_w8a8_runs_integer_end_to_end(tmp_path):
    """W8A8 everywhere: each tensor quantized once, no float op left between the input and the pooling."""
    x = torch.randn(2, 3, 16, 16)
    q = prepare(PoolResNet().eval(), x, bits=(8,))
    apply_policy(q, {n: (8, 8) for n in q.searchable_names}, torch.randn(16, 3, 16, 16))
    rep = lower(q, tmp_path / "m.onnx", x, LowerOptions(samples=512))
    assert rep.passed and rep.max_diff_steps == 0.0 and rep.top1_agreement == 1.0
    counts = qlinear_counts(tmp_path / "m.onnx")
    assert counts["QLinearConv"] == 7 and counts["QLinearAdd"] == 2 and counts["NhwcMaxPool"] == 1
    assert not {"Conv", "Add", "MaxPool", "Relu", "FusedConv"} & set(counts)
    # one QuantizeLinear for the input, one before the pooling; every other requantization is in a kernel
    assert counts["QuantizeLinear"] == 2 and counts["DequantizeLinear"] == 2


def _torchvision(tmp_path, name, per_channel, samples):
    model = getattr(torchvision.models, name)(num_classes=100)
    q, x, pol = _quantized(model, (2, 3, 32, 32), per_channel, seed=1)
    path = tmp_path / f"{name}.onnx"
    rep = lower(q, path, x, LowerOptions(samples=samples, check=False))
    _check_model_file(path, q, pol)
    # every quantized conv/linear became an integer kernel in ONNX Runtime's optimized graph
    counts = qlinear_counts(path)
    assert counts["QLinearConv"] + counts["QLinearMatMul"] == len(q.layer_names)
    assert counts["Conv"] == 0 and counts["FusedConv"] == 0 and counts["Gemm"] == 0
    assert rep.passed and rep.top1_agreement >= 0.995 and rep.max_diff_steps <= 1.0
    assert rep.samples == samples


@pytest.mark.parametrize("name,per_channel", [
    pytest.param("mobilenet_v2", False, marks=pytest.mark.slow), ("resnet18", True)])
def test_torchvision_models_fused_and_matching(tmp_path, name, per_channel):
    _torchvision(tmp_path, name, per_channel, samples=32)


@pytest.mark.slow
@pytest.mark.parametrize("name,per_channel", [("mobilenet_v2", False), ("mobilenet_v2", True),
                                              ("resnet18", True), ("resnet18", False)])
def test_torchvision_models_512_inputs(tmp_path, name, per_channel):
    _torchvision(tmp_path, name, per_channel, samples=512)


def test_integer_kernels_even_with_plain_relu_and_linear(tmp_path):
    q, x, _ = _quantized(PlainCNN(), (2, 3, 16, 16), False)
    path = tmp_path / "m.onnx"
    lower(q, path, x, LowerOptions(samples=8))
    counts = qlinear_counts(path)
    assert counts["QLinearConv"] == 3 and counts["Conv"] == 0 and counts["Relu"] == 0


def test_unquantized_model_is_refused(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    q = prepare(PlainCNN().eval(), x, bits=BITS)
    with pytest.raises(ExportError, match="apply a policy"):
        lower(q, tmp_path / "m.onnx", x)


class _Reflect(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = torch.nn.Conv2d(3, 4, 3)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(self.conv0(x)).mean((2, 3)))


def test_unsupported_layer_names_the_node(tmp_path):
    q, x, _ = _quantized(_Reflect(), (2, 3, 8, 8), False)
    with pytest.raises(ExportError, match=r"node .*conv.*padding_mode='reflect'"):
        lower(q, tmp_path / "m.onnx", x)
    assert not (tmp_path / "m.onnx").exists()


def test_mismatch_fails_loudly_and_names_a_layer(tmp_path, monkeypatch):
    import fxmpq.export.lower as E

    q, x, _ = _quantized(PlainCNN(), (2, 3, 16, 16), False)
    real = E.run_torch
    monkeypatch.setattr(E, "run_torch", lambda *a: real(*a) + 1.0)
    with pytest.raises(ExportError, match=r"does not match PyTorch.*first divergence"):
        lower(q, tmp_path / "m.onnx", x, LowerOptions(samples=16))
    rep = lower(q, tmp_path / "m2.onnx", x, LowerOptions(samples=16, check=False))
    assert not rep.passed and rep.max_diff_steps > 1
    # every quantizer inside the graph still agrees: the stage-by-stage check calls the export faithful
    assert rep.forced_max_steps is not None and rep.forced_max_steps <= 1 and rep.stagewise_faithful


def test_a_wrong_stage_is_found_stage_by_stage(tmp_path, monkeypatch):
    """A layer whose weights the file scales wrongly: named as the first divergence, and not faithful."""
    import fxmpq.export.lower as E

    q, x, _ = _quantized(PlainCNN(), (2, 3, 16, 16), False)
    real = E._save_model

    def corrupt(model, path):
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
              and any(i.name == n.input[0] and i.data_type == onnx.TensorProto.INT8 for i in model.graph.initializer)]
        scale = next(i for i in model.graph.initializer if i.name == dq[1].input[1])  # the second layer's weights
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 1.5, scale.name))
        real(model, path)

    monkeypatch.setattr(E, "_save_model", corrupt)
    rep = lower(q, tmp_path / "m.onnx", x, LowerOptions(samples=16, check=False))
    assert not rep.passed
    assert rep.diverging is not None and rep.diverging.startswith("quantizer ")
    assert rep.forced_max_steps > 1 and not rep.stagewise_faithful
    assert "an export stage computes something else" in rep.table()
    with pytest.raises(ExportError, match=r"stage by stage .* max \|diff\| [0-9.]+ steps$"):
        lower(q, tmp_path / "m2.onnx", x, LowerOptions(samples=16))


def test_write_is_atomic(tmp_path, monkeypatch):
    q, x, _ = _quantized(PlainCNN(), (2, 3, 16, 16), False)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", boom)
    with pytest.raises(ExportError, match=r"m\.onnx: cannot write the ONNX model: disk full"):
        lower(q, path, x, LowerOptions(samples=8))
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_a_failing_export_leaves_the_previous_good_file(tmp_path, monkeypatch):
    """The file is checked before it replaces anything: a parity failure keeps the old model and the failed one
    beside it under another name, and says so."""
    import fxmpq.export.lower as E

    q, x, _ = _quantized(PlainCNN(), (2, 3, 16, 16), False)
    path = tmp_path / "m.onnx"
    lower(q, path, x, LowerOptions(samples=8))
    good = path.read_bytes()
    real = E.run_torch
    monkeypatch.setattr(E, "run_torch", lambda *a: real(*a) + 1.0)
    with pytest.raises(ExportError) as exc:
        lower(q, path, x, LowerOptions(samples=8))
    msg = str(exc.value)
    assert "m.onnx was not replaced" in msg and "m.failed.onnx" in msg and "does not match PyTorch" in msg
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.failed.onnx", "m.onnx"]
    onnx.checker.check_model(str(tmp_path / "m.failed.onnx"))  # the failed export is whole, for inspection


class _ClassifierHead(torch.nn.Module):
    """AlexNet/VGG-style head: Dropout -> Linear -> ReLU -> Dropout -> Linear -> ReLU -> Linear, small outputs."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(32, 16), nn.ReLU(inplace=True), nn.Dropout(),
                                        nn.Linear(16, 16), nn.ReLU(inplace=True), nn.Linear(16, 10))
        with torch.no_grad():  # outputs well below one: a requantization at an unset step would round them to 0
            self.classifier[-1].weight.mul_(1e-3)
            self.classifier[-1].bias.mul_(1e-3)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def test_relu_dropout_linear_chain_with_small_outputs_and_batch_one_example(tmp_path):
    torch.manual_seed(0)
    q, x, _ = _quantized(_ClassifierHead(), (1, 3, 8, 8), per_channel=False)
    for name, quantizer in q.quantizers():
        if name.endswith("output_quantizer"):  # initialised on real outputs, not on a requantization at step 1
            assert float(quantizer.step_size().detach()) > 1e-6, name
    rep = lower(q, tmp_path / "m.onnx", x, LowerOptions(samples=256))
    assert rep.passed and rep.max_diff_steps == 0.0
    assert rep.fused_layers == rep.quantized_layers == 4


def test_convnext_block_exports_from_a_batch_of_one(tmp_path):
    from torchvision.models.convnext import CNBlock

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), CNBlock(8, 1e-6, 0.0),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    q, x, _ = _quantized(model, (1, 3, 8, 8), per_channel=True)
    rep = lower(q, tmp_path / "m.onnx", x, LowerOptions(samples=64))
    assert rep.passed and x.shape[0] == 1


class _TokenMLP(torch.nn.Module):
    """A transformer-style MLP on [N, tokens, C]: Linear layers on 3-D inputs run as float MatMul in ORT."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.embed = nn.Linear(3, 64)
        self.norm = nn.LayerNorm(64)
        self.fc1 = nn.Linear(64, 256)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(256, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        t = self.embed(x.flatten(2).transpose(1, 2))  # [N, 49, 64]
        t = t + self.fc2(self.act(self.fc1(self.norm(t))))
        return self.head(t.mean(1))


def _requantized_layers(q) -> set[str]:
    """Layers whose BiasRounding simulates an integer kernel's requantization (it reads an output step size)."""
    from fxmpq.passes.apply_policy import BiasRounding

    gm = q.graph_module
    return {n.target.rpartition(".")[0] for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(n.target), BiasRounding) and n.args[3] is not None}


def test_linear_on_tokens_runs_as_an_integer_kernel(tmp_path):
    torch.manual_seed(0)
    q, x, _ = _quantized(_TokenMLP(), (2, 3, 7, 7), per_channel=False, seed=3)
    # fc1/fc2 read [N, 49, C]: lowered as 1x1 convolutions on [N*49, C, 1, 1], fused by ONNX Runtime, so the
    # model simulates their integer requantization like any conv's
    assert {"fc1", "fc2"} <= _requantized_layers(q)
    rep = lower(q, tmp_path / "m.onnx", x, LowerOptions(samples=512))
    assert rep.passed and rep.max_diff_steps == 0.0 and rep.top1_agreement == 1.0
    assert rep.fused_layers == rep.quantized_layers == 4  # embed, fc1, fc2, head
    q2, _, _ = _quantized(_ClassifierHead(), (1, 3, 8, 8), per_channel=False)
    assert {"classifier.1", "classifier.4"} <= _requantized_layers(q2)


def test_report_separates_tied_logits_from_disagreements(tmp_path):
    torch.manual_seed(0)
    model = _ClassifierHead()
    with torch.no_grad():  # a zero-initialised head (as torchvision's ViT): every logit ties
        model.classifier[-1].weight.zero_()
        model.classifier[-1].bias.zero_()
    q, x, _ = _quantized(model, (1, 3, 8, 8), per_channel=False)
    rep = lower(q, tmp_path / "m.onnx", x, LowerOptions(samples=32))
    assert rep.within_tolerance and rep.top1_ties == 32 and rep.top1_decisive is None
    q2, x2, _ = _quantized(_ClassifierHead(), (1, 3, 8, 8), per_channel=False)
    rep2 = lower(q2, tmp_path / "m2.onnx", x2, LowerOptions(samples=64))
    assert rep2.top1_ties < 64 and rep2.top1_decisive == 1.0 and rep2.passed


def test_metadata_holds_the_policy_bits_and_steps(tmp_path):
    q, x, pol = _quantized(ResidualNet(), (2, 3, 16, 16), per_channel=False)
    assert all(q.policy[n] == bits for n, bits in pol.items())
    lower(q, tmp_path / "m.onnx", x, LowerOptions(samples=16))
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    bits = json.loads(meta["fxmpq.bits"])
    full = q.policy
    assert bits == {name: [w, a] for name, (w, a) in full.items()}  # every layer, pins included
    assert all(a is not None for _, a in bits.values())
    steps = json.loads(meta["fxmpq.steps"])
    for name in q.layer_names:
        path = q.sites[name].act_quantizer
        assert steps[path] == pytest.approx(float(q.act_quantizer(name).step_size().detach()), rel=0, abs=0)
    qrange = json.loads(meta["fxmpq.weight_qrange"])
    for name, (w, _) in full.items():
        assert qrange[f"fxmpq_lowered.{name.replace('.', '_')}_weight"] == [-(2 ** (w - 1)), 2 ** (w - 1) - 1]


# ----------------------------------------------------------------------------------------------- latency audit
def test_latency_audit_maps_every_layer_and_states_its_conditions(tmp_path):
    q, x, _ = _quantized(ResidualNet(), (1, 3, 16, 16), per_channel=True)
    rep = lower(q, tmp_path / "m.onnx", x, LowerOptions(samples=16, repeats=5))
    assert rep.measured_latency_ms > 0 and rep.measured_wall_ms > 0
    assert (rep.latency_threads, rep.latency_batch, rep.latency_repeats, rep.latency_clock) == (1, 1, 5, "thread_cpu")
    assert rep.predicted_latency_ms is None  # bitops: no latency metric
    assert [t.layer for t in rep.layer_timings] == q.layer_names
    assert all(t.integer and t.kernels == ("QLinearConv",) and t.predicted_ms is None for t in rep.layer_timings)
    assert rep.format_mismatches == ()
    assert "latency" in rep.table() and "QLinearConv" in rep.layer_table()
    assert json.loads(json.dumps(rep.to_dict()))["layer_timings"][0]["layer"] == "stem"
    off = lower(q, tmp_path / "n.onnx", x, LowerOptions(samples=16, measure=False))
    assert off.measured_latency_ms is None and off.layer_timings == () and "measured (" not in off.table()
    with pytest.raises(ExportError, match="repeats must be a positive integer"):
        lower(q, tmp_path / "n.onnx", x, LowerOptions(samples=16, repeats=0))


def test_predicted_latency_in_milliseconds_from_the_hardware_unit(tmp_path):
    """bitfusion's latency is in microseconds: the report states it in milliseconds, per layer and in total."""
    x = torch.randn(1, 3, 16, 16)
    q = prepare(PlainCNN().eval(), x, hardware="bitfusion", bits=(4, 8))
    apply_policy(q, {"conv2": (4, 4)}, torch.randn(8, 3, 16, 16))
    q.eval()
    rep = lower(q, tmp_path / "m.onnx", x, LowerOptions(samples=16, repeats=3, threads=1))
    us = q.analysis.cost(q.policy)["latency"]
    assert rep.predicted_latency_ms == pytest.approx(us / 1000)
    assert sum(t.predicted_ms for t in rep.layer_timings) == pytest.approx(us / 1000)


def test_an_integer_layer_run_in_float_is_flagged(tmp_path, monkeypatch):
    """A layer priced as an integer kernel that ONNX Runtime runs in float is listed (here: the profile says so)."""
    import fxmpq.export.audit as export

    q, x, _ = _quantized(PlainCNN(), (1, 3, 16, 16), per_channel=False)
    real = export.profile_nodes

    def conv2_in_float(*a, **k):
        nodes = real(*a, **k)
        return [export.NodeTime(n.name, "Conv", n.inputs, n.outputs, n.median_ms)
                if "fxmpq_lowered.conv2_weight" in n.inputs else n for n in nodes]
    monkeypatch.setattr(export, "profile_nodes", conv2_in_float)
    rep = lower(q, tmp_path / "m.onnx", x, LowerOptions(samples=16, repeats=3))
    assert rep.format_mismatches == (f"conv2: priced as an integer kernel (W{q.policy['conv2'][0]}A"
                                     f"{q.policy['conv2'][1]}), ORT ran Conv in float",)
    assert "NOT AS PRICED" in rep.table()
    flagged = [t for t in rep.layer_timings if t.flag]
    assert [t.layer for t in flagged] == ["conv2"] and not flagged[0].integer
def test_a_wrong_lowering_is_found_against_the_quant_model(tmp_path, monkeypatch):
    """The lowered graph itself wrong (one layer's weight scale off by 1.5x): ONNX Runtime runs it faithfully, so
    only comparing the QuantModel with the lowered graph finds it; the diagnosis must not call it faithful."""
    import fxmpq.export.lower as E
    from fxmpq.passes import LowerToQDQPass, PassBase, PassResult

    class Corrupt(PassBase):
        def call(self, gm):
            name = next(n for n, _ in gm.named_buffers() if n.endswith("conv2_weight_scale"))
            buf = gm.get_buffer(name)
            buf.mul_(1.5)
            return PassResult(gm, False)

    q, x, _ = _quantized(PlainCNN(), (2, 3, 16, 16), False)
    monkeypatch.setattr(E, "lower_passes", lambda ex=None, accuracy_level=4: [LowerToQDQPass(example_inputs=ex), Corrupt()])
    rep = lower(q, tmp_path / "m.onnx", x, LowerOptions(samples=16, check=False))
    assert not rep.passed
    assert rep.forced_max_steps is not None and rep.forced_max_steps <= 1  # ORT agrees with the (wrong) graph
    assert rep.lowered_max_steps > 1 and not rep.stagewise_faithful
    assert rep.lowered_diverging.startswith("quantizer ")
    assert "QuantModel vs lowered graph" in rep.table()


def test_output_step_is_found_through_a_trailing_identity_module(tmp_path):
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 10)
            self.out = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Identity(), torch.nn.Dropout())

        def forward(self, x):
            return self.out(self.fc(torch.relu(self.conv(x)).mean((2, 3))))

    torch.manual_seed(0)
    q, x, _ = _quantized(Head(), (2, 3, 8, 8), False)
    rep = lower(q, tmp_path / "m.onnx", x, LowerOptions(samples=32))
    assert rep.output_step is not None and rep.max_diff_steps is not None and rep.passed


class _PlainBNHead(torch.nn.Module):
    """A plain BN CNN whose head is conv -> ReLU -> global average pool -> Linear (the issue's pattern)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.last = nn.Conv2d(64, 64, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.last(self.body(x)))), 1))


def _random_bn_stats(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics (fresh ones are 0 and 1, which folding leaves unchanged)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


def test_conv_relu_pool_linear_head_is_fused_and_accepted(tmp_path):
    torch.manual_seed(0)
    model = _PlainBNHead().eval()
    _random_bn_stats(model)
    q, x, _ = _quantized(model, (2, 3, 32, 32), per_channel=False, seed=3)
    rep = lower(
        q, tmp_path / "m.onnx", x, LowerOptions(samples=512)
    )  # check=True: raises unless it passes by default
    assert rep.quantized_layers == 6 and rep.fused_layers == 6  # every conv and the linear an integer kernel
    assert rep.top1_agreement >= 0.995


class _PosEnc(torch.nn.Module):
    """timm's PositionalEncodingFourier in small: forward reads its conv's weight dtype, then calls the conv."""

    def __init__(self):
        super().__init__()
        self.token_projection = torch.nn.Conv2d(8, 16, 1)

    def forward(self, x):
        pos = torch.ones_like(x[:, :8]).to(self.token_projection.weight.dtype)
        return self.token_projection(pos)


class _PosEncNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.pos = _PosEnc()
        self.conv = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = y + self.pos(y)
        return self.fc(torch.relu(self.conv(y)).mean((2, 3)))


def test_a_module_read_after_its_layer_is_lowered_keeps_its_attributes(tmp_path):
    """Regression (timm edgenext/xcit): the lowering used to delete token_projection.bias while the graph still read
    token_projection.weight.dtype, and the export died with an internal AttributeError."""
    q, x, _ = _quantized(_PosEncNet(), (2, 3, 16, 16), False)
    rep = lower(q, tmp_path / "m.onnx", x, LowerOptions(samples=16, measure=False))
    assert rep.passed and rep.quantized_layers == rep.fused_layers == 4


class _BatchNormAct2d(torch.nn.BatchNorm2d):
    """timm's BatchNormAct2d in small: an nn.BatchNorm2d subclass whose forward is F.batch_norm and an activation."""

    def __init__(self, c):
        super().__init__(c)
        self.act = torch.nn.ReLU()

    def forward(self, x):
        x = torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                           self.training, 0.1, self.eps)
        return self.act(x)


class _BNActNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn1 = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False), _BatchNormAct2d(16)
        self.conv, self.bn2 = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False), _BatchNormAct2d(16)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.bn2(self.conv(self.bn1(self.stem(x)))).mean((2, 3)))


def test_functional_batch_norm_after_a_conv_is_switchable_and_folded(tmp_path):
    """Regression (#16 cause 6, timm's BatchNormAct2d): the traced F.batch_norm becomes a plain BatchNorm module,
    so it is switchable during indicator training, folded by the lowering (no BatchNormalization node) and its
    activation stays."""
    torch.manual_seed(0)
    net = _BNActNet().eval()
    _random_bn_stats(net)
    import fxmpq

    x = torch.randn(2, 3, 16, 16)
    gm = fxmpq.trace(net, x)
    assert torch.nn.functional.batch_norm not in [n.target for n in gm.graph.nodes]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == [
        "stem", "bn1.batch_norm", "bn1.act", "conv", "bn2.batch_norm", "bn2.act", "fc"]
    assert torch.equal(gm(x), net(x))
    q, x, _ = _quantized(net, (2, 3, 16, 16), False)
    from fxmpq.quant.lsq import SwitchableBatchNorm2d

    assert isinstance(q.graph_module.get_submodule("bn2.batch_norm"), SwitchableBatchNorm2d)
    rep = lower(q, tmp_path / "m.onnx", x, LowerOptions(samples=16, measure=False))
    assert rep.passed and rep.fused_layers == rep.quantized_layers == 3
    assert "BatchNormalization" not in rep.op_counts


def test_a_module_called_twice_is_lowered_as_two_layers_with_their_own_bits(tmp_path) -> None:
    """coat_lite_tiny's shared cpe/crpe in small (#16 cause 5): the second call's integer weights and scales must
    not overwrite the first's, and both calls are integer kernels."""
    from _quant_models import FunctionalNet

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    q = prepare(FunctionalNet().eval(), x[:1], bits=(2, 4))
    apply_policy(q, {"shared": (2, 2), "shared#1": (4, 4), "w": (4, 4)}, torch.randn(8, 3, 6, 6))
    rep = lower(q, tmp_path / "shared.onnx", x[:1], inputs=x)
    assert rep.passed and rep.fused_layers == rep.quantized_layers == 5
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "shared.onnx")).metadata_props}
    bits = json.loads(meta["fxmpq.bits"])
    assert bits["shared"] == [2, 2] and bits["shared#1"] == [4, 4]
    ranges = json.loads(meta["fxmpq.weight_qrange"])
    assert ranges["fxmpq_lowered.shared_weight"] == [-2, 1] and ranges["fxmpq_lowered.shared_call1_weight"] == [-8, 7]


class _InPlaceGain(torch.nn.Module):
    """timm's NormFreeBlock in small: `out.mul_(gain)` whose result is unused, then `out * alpha + shortcut`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.gain = torch.nn.Parameter(torch.full((), 0.3))
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv1(x)
        out = self.conv2(torch.relu(shortcut))
        out.mul_(self.gain)
        out = out * 0.5 + shortcut
        return self.head(out.mean((2, 3)))


def test_an_in_place_op_whose_result_is_unused_survives_capture_and_lowering(tmp_path) -> None:
    """torch.fx's dead-code elimination drops `out.mul_(g)` (pytorch#68301); fxmpq's keeps it (timm dm_nfnet)."""
    import fxmpq

    torch.manual_seed(0)
    m, x = _InPlaceGain().eval(), torch.randn(4, 3, 8, 8)
    q = prepare(m, x[:1], bits=(4, 8))
    with torch.no_grad():
        torch.testing.assert_close(q(x), m(x))
    apply_policy(q, {"conv2": (8, 8)}, torch.randn(8, 3, 8, 8))
    rep = lower(q, tmp_path / "inplace.onnx", x[:1], inputs=x)
    assert rep.passed, rep.table()
    assert any(n.op == "call_method" and n.target == "mul_" for n in fxmpq.trace(m, x[:1]).graph.nodes)


def test_a_bias_that_overflows_int32_exports_the_layer_in_float_and_says_so(tmp_path):
    """A degenerate input step (fc reads values ~1e-6) puts the bias beyond int32 at s_x*s_w: the layer runs in float on
    its quantized weights, in PyTorch (BiasRounding) as in ONNX Runtime, and the audit names it as not run as priced."""
    torch.manual_seed(0)
    m = PlainCNN().eval()
    with torch.no_grad():
        m.conv2.weight.mul_(1e-5)
        m.fc.bias.zero_()
        m.fc.bias[0] = 1e4  # one large bias: beyond int32 at s_x*s_w ~ 1e-7; the other outputs stay W.x
    x = torch.randn(2, 3, 16, 16)
    q = prepare(m, x, bits=(8,))
    apply_policy(q, {n: (8, 8) for n in q.searchable_names}, torch.randn(16, 3, 16, 16))
    q.eval()
    rep = lower(q, tmp_path / "m.onnx", x, LowerOptions(samples=16, repeats=3))
    assert rep.passed and rep.max_diff_steps <= 1.0
    assert rep.quantized_layers == rep.fused_layers == 2  # conv1, conv2 integer; fc float
    assert len(rep.format_mismatches) == 1 and rep.format_mismatches[0].startswith(
        "fc: priced as W8A8, exported in float (float: the bias does not fit int32 at s_x*s_w)")
    inits = {t.name: t for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    assert inits["fxmpq_lowered.fc_bias"].data_type == onnx.TensorProto.FLOAT


def test_the_graph_cleanup_equals_torch_onnx_optimize(tmp_path, monkeypatch):
    """fxmpq.export.onnx_optimize (torch.onnx's cleanup without the SlicesSplit rule) writes the same ONNX graph and
    initializers as torch.onnx's own optimize, here on an attention net (its qkv output chunked in three); and where
    onnxscript has moved its pieces it falls back to that optimize."""
    from models import TinyAttention

    import fxmpq.export.lower as lower_module
    import fxmpq.export.onnx_optimize as cleanup

    q, x, _ = _quantized(TinyAttention(), (1, 4, 8), per_channel=True)

    def graph(path):
        m = onnx.load(str(path))
        return ([(n.op_type, tuple(n.input), tuple(n.output)) for n in m.graph.node],
                sorted((t.name, t.SerializeToString()) for t in m.graph.initializer))

    lower(q, tmp_path / "ours.onnx", x, LowerOptions(samples=2, check=False))
    monkeypatch.setattr(lower_module, "optimize", lambda program: program.optimize())
    lower(q, tmp_path / "torch.onnx", x, LowerOptions(samples=2, check=False))
    assert graph(tmp_path / "ours.onnx") == graph(tmp_path / "torch.onnx")
    called = []

    class Program:
        def optimize(self):
            called.append(True)

    monkeypatch.setattr(cleanup, "_passes", lambda: None)
    cleanup.optimize(Program())
    assert called == [True]
