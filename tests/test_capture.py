"""Capture of models that branch on shapes or dtypes (the specializing tracer) and of models whose output is not one
tensor (the output selector); slow tests run the Hugging Face models the capture issue names, when installed."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmpq
from fxmpq.capture.tracer import ShapeTracer
from fxmpq.core.options import LowerOptions, TrainOptions
from fxmpq.errors import TraceError


class ShapeBranching(nn.Module):
    """Python control flow on the input's shape and dtype, a size computed with math, a batch-sized reshape, and an
    output dataclass-like dict, as in Hugging Face vision models."""

    def __init__(self, patch: int = 4):
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(3, 16, patch, stride=patch)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        if x.dtype != torch.float32:
            x = x.float()
        b, _, h, w = x.shape
        if h != w:
            raise ValueError("square images only")
        if h % self.patch:
            x = F.pad(x, (0, self.patch - w % self.patch, 0, self.patch - h % self.patch))
        n = math.ceil(h / self.patch) ** 2
        y = self.embed(x).reshape(b, 16, n).transpose(1, 2)
        y = y + self.fc2(F.gelu(self.fc1(self.norm(y))))
        return OrderedDict(loss=None, logits=self.head(y.mean(1)), tokens=n)


def test_plain_tracing_fails_and_the_specializing_tracer_captures_it() -> None:
    m = ShapeBranching().eval()
    with pytest.raises(torch.fx.proxy.TraceError):  # torch.fx alone: control flow on a Proxy
        torch.fx.symbolic_trace(m)
    x = torch.randn(2, 3, 16, 16)
    gm = fxmpq.trace(m, x)
    assert gm.meta["capture"] == "specialized" and gm.meta["output"] == "logits"
    for batch in (1, 5):  # the batch stays symbolic: the graph runs at any batch size
        xb = torch.randn(batch, 3, 16, 16)
        torch.testing.assert_close(gm(xb), m(xb)["logits"])
    names = [r.name for r in fxmpq.analyze(m, x).layers]
    assert names == ["embed", "fc1", "fc2", "head"]  # module qualnames, as with plain tracing


class _RebuiltTable(nn.Module):
    """timm's ConViT in small: a buffer rebuilt for the token count in forward, then expanded to the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.zeros(1, 1, 3), persistent=False)
        self.proj = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        if self.table.shape[1] != n:
            self.table = torch.arange(3 * n, dtype=torch.float32).reshape(1, n, 3) / n
        return x[..., :4] + self.proj(self.table.expand(b, -1, -1))


def test_a_real_tensor_expanded_to_the_traced_batch_is_recorded() -> None:
    m = _RebuiltTable().eval()
    gm = fxmpq.trace(m, torch.randn(2, 5, 8))
    assert gm.meta["capture"] == "specialized"
    for batch in (1, 3):  # the expand follows the batch
        xb = torch.randn(batch, 5, 8)
        torch.testing.assert_close(gm(xb), m(xb))


def test_a_model_plain_tracing_handles_stays_symbolic() -> None:
    gm = fxmpq.trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.randn(1, 3, 8, 8))
    assert gm.meta["capture"] == "symbolic" and "output" not in gm.meta


def test_the_tracer_keeps_only_batch_sizes_symbolic() -> None:
    class M(nn.Module):
        def forward(self, x):
            b, t, d = x.shape
            return x.reshape(b * t, d).sum(0) + x.size(1) + len(x[0])

    x = torch.randn(2, 5, 3)
    graph = ShapeTracer((x,)).trace(M())
    gm = torch.fx.GraphModule(M(), graph)
    code = gm.code
    assert "size(0)" in code and "size(1)" not in code  # t and len(x[0]) are constants, b follows the batch
    for batch in (1, 4):
        xb = torch.randn(batch, 5, 3)
        torch.testing.assert_close(gm(xb), M()(xb))


def test_batch_dependent_python_values_are_refused_clearly() -> None:
    class M(nn.Module):
        def forward(self, x):
            return x * len(x)  # the batch size as a Python int: not a constant of the graph

    with pytest.raises(TraceError, match=r"len\(\) of x follows the batch size"):
        fxmpq.trace(M(), torch.randn(2, 3))


def test_output_selection_by_name_index_or_the_only_tensor() -> None:
    class Tup(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.a(x), self.b(x)

    x = torch.randn(2, 4)
    with pytest.raises(TraceError, match=r"returns tuple with outputs 0, 1 \(tensors: 0, 1\): pass output="):
        fxmpq.trace(Tup(), x)
    gm = fxmpq.trace(Tup(), x, output=1)
    assert gm(x).shape == (2, 2) and gm.meta["output"] == "1"
    with pytest.raises(TraceError, match=r"output='logits': the model's outputs are 0, 1"):
        fxmpq.trace(Tup(), x, output="logits")

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x):
            return {"hidden": self.a(x), "aux": None}

    assert fxmpq.trace(One(), x).meta["output"] == "hidden"


def test_a_shape_branching_model_goes_through_every_stage_with_parity(tmp_path) -> None:
    m = ShapeBranching().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 16, 16, generator=g)
    data = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    q = fxmpq.prepare(m, x)
    ind = fxmpq.train_indicators(
        q, data, TrainOptions(indicator_epochs=1, progress=False)
    )  # batch 8 here, 8 at capture: any batch works
    res = fxmpq.search(q.analysis, ind, "w4a4")
    fxmpq.apply_policy(q, res.policy, x)
    q.eval()
    rep = fxmpq.lower(q, tmp_path / "m.onnx", x[:1], LowerOptions(samples=8, measure=False), inputs=x)
    assert rep.passed and rep.fused_layers == rep.quantized_layers == 4, rep.table()


class ComputedBias(nn.Module):
    """eva02's attention: the qkv bias is cat(q_bias, zeros, v_bias), computed in the graph from parameters."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim))
        self.v_bias = nn.Parameter(torch.randn(dim))
        self.head = nn.Linear(3 * dim, 10)

    def forward(self, x):
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        return self.head(F.relu(F.linear(x, self.qkv.weight, bias)))


def test_a_bias_computed_from_parameters_is_lowered_as_a_constant(tmp_path) -> None:
    m = ComputedBias().eval()
    x = torch.randn(16, 5, 16)
    q = fxmpq.prepare(m, x)
    rec = next(r for r in q.records if r.bias_computed)
    q.set_uniform(4, 4)
    fxmpq.apply_policy(q, q.policy, x)
    q.eval()
    rep = fxmpq.lower(q, tmp_path / "m.onnx", x[:1], LowerOptions(samples=8, measure=False), inputs=x)
    assert rep.passed and rep.max_diff_steps == 0.0, rep.table()  # the int32 bias is simulated bit for bit
    assert rep.fused_layers == rep.quantized_layers == 2 and rec.name == "qkv"


# ------------------------------------------------------------------ Hugging Face (optional, slow)
def _hf_models():
    tf = pytest.importorskip("transformers")
    vit = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, num_labels=10)
    return {
        "vit": lambda: tf.ViTForImageClassification(tf.ViTConfig(**vit)),
        "deit": lambda: tf.DeiTForImageClassification(tf.DeiTConfig(**vit)),
        "convnext": lambda: tf.ConvNextForImageClassification(tf.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32],
                                                                                 depths=[1, 1], num_labels=10)),
        "resnet": lambda: tf.ResNetForImageClassification(tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32],
                                                                           depths=[1, 1], num_labels=10)),
        "swin": lambda: tf.SwinForImageClassification(tf.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=10)),
        "mobilevit": lambda: tf.MobileViTForImageClassification(tf.MobileViTConfig(
            image_size=32, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_labels=10)),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit", "deit", "convnext", "resnet", "swin", "mobilevit"])
def test_hugging_face_models_pass_every_stage(tmp_path, name) -> None:
    m = _hf_models()[name]().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=g)
    data = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    q = fxmpq.prepare(m, x)
    assert q.graph_module.meta["capture"] == "specialized" and q.graph_module.meta["output"] == "logits"
    ind = fxmpq.train_indicators(q, data, TrainOptions(indicator_epochs=1, progress=False))
    fxmpq.apply_policy(q, fxmpq.search(q.analysis, ind, "w4a4").policy, x)
    q.eval()
    rep = fxmpq.lower(q, tmp_path / "m.onnx", x[:1], LowerOptions(samples=8, measure=False), inputs=x)
    assert rep.passed and rep.fused_layers == rep.quantized_layers, rep.table()
