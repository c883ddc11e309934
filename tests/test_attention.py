"""Attention quantized whole: MultiheadAttention, Swin's window attention and scaled_dot_product_attention open up
into layers (projections and activation-by-activation matmuls), priced, quantized and lowered with parity."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxmpq
from fxmpq.capture.attention import einsum_as_matmul
from fxmpq.capture.record import records
from fxmpq.core.options import TrainOptions
from fxmpq.hardware.spec import LayerKind
from fxmpq.models.vit import small_vit


def _coverage(gm: torch.fx.GraphModule, x: torch.Tensor) -> float:
    """MACs of the recorded layers over every conv/matmul MAC the captured graph runs (torch's FlopCounterMode)."""
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        gm(x)
    return sum(r.macs for _, r in records(gm)) * x.shape[0] / (fc.get_total_flops() / 2)


@pytest.mark.parametrize("name", ["vit_b_16", "swin_t"])
def test_torchvision_transformers_are_layers_for_at_least_99_percent_of_their_macs(name: str) -> None:
    model = getattr(torchvision.models, name)().eval()
    gm = fxmpq.trace(model, torch.randn(1, 3, 224, 224))
    kinds = [r.kind for _, r in records(gm)]
    blocks = 12  # vit_b_16: 12 encoder layers; swin_t: 2 + 2 + 6 + 2 blocks
    assert kinds.count(LayerKind.MATMUL) == 2 * blocks  # Q.K^T and A.V in every block
    cover = _coverage(gm, torch.randn(1, 3, 224, 224))
    assert cover >= 0.99, f"{name}: layers cover {100 * cover:.2f} % of the MACs"
    names = {r.name for _, r in records(gm)}
    if name == "vit_b_16":  # the MultiheadAttention's projections, named after the module's parameters
        assert {"encoder.layers.encoder_layer_0.self_attention.in_proj",
                "encoder.layers.encoder_layer_0.self_attention.out_proj",
                "encoder.layers.encoder_layer_0.self_attention.matmul"} <= names
    else:
        assert {"features.1.0.attn.qkv", "features.1.0.attn.proj", "features.1.0.attn.matmul"} <= names


def test_bitops_count_the_attention_matmuls_at_their_operands_bits() -> None:
    a = fxmpq.analyze(small_vit(), torch.randn(1, 1, 28, 28), hardware="bitops")
    mm = a.layer("blocks.0.attn.matmul")
    tokens, dim = 17, 64  # 16 patches + class token; 4 heads of 16
    assert mm.kind is LayerKind.MATMUL and mm.params == 0
    assert mm.macs == tokens * tokens * dim  # heads x T x T x head_dim
    assert a.layer_cost(mm.name, 4, 6)["bitops"] == mm.macs * 4 * 6
    assert a.layer_cost(mm.name, 4, 6)["size"] == 0
    w4a4 = fxmpq.Budget.uniform(4, 4)
    total = sum(m.macs for m in a.layers if not m.pinned) * 16 + sum(m.macs for m in a.pinned) * 64
    assert w4a4.resolve(a)["bitops"] == pytest.approx(total)


class _MHA(nn.Module):
    def __init__(self, batch_first: bool, masked: bool = False):
        super().__init__()
        self.batch_first, self.masked = batch_first, masked
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.batch_first else x.transpose(0, 1)
        if self.masked:
            t = x.shape[1 if self.batch_first else 0]
            y, _ = self.attn(x, x, x, attn_mask=torch.ones(t, t, dtype=torch.bool).tril())
        else:
            y, w = self.attn(x, x, x)
            y = y + w.sum()
        y = y if self.batch_first else y.transpose(0, 1)
        return self.head(y.mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_self_attention_opens_into_layers_with_the_same_values(batch_first: bool) -> None:
    torch.manual_seed(0)
    m = _MHA(batch_first).eval()
    x = torch.randn(2, 7, 32)
    gm = fxmpq.trace(m, x)
    assert [r.name for _, r in records(gm)] == ["attn.in_proj", "attn.matmul", "attn.matmul#1", "attn.out_proj", "head"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-6)


def test_masked_attention_keeps_the_module_call() -> None:
    m = _MHA(True, masked=True).eval()
    gm = fxmpq.trace(m, torch.randn(1, 7, 32))
    assert [r.name for _, r in records(gm)] == ["head"]
    assert any(n.op == "call_module" and n.target == "attn" for n in gm.graph.nodes)


class _SDPA(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4).unbind(0)
        if self.mode == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.mode == "bool":
            keep = (x[..., :5] > 0).unsqueeze(1) | torch.eye(5, dtype=torch.bool)  # every query keeps one key
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        if self.mode == "float":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=x[..., :5].transpose(-2, -1).unsqueeze(1), scale=0.3)
        return F.scaled_dot_product_attention(q, k, v)


def _assert_opened(m: nn.Module, gone: Any, kinds: list[LayerKind]) -> None:
    """`m` traced on (2, 5, 16) has no `gone` call left, these layer kinds, all its MACs in layers and m's values."""
    torch.manual_seed(0)
    m.eval()
    x = torch.randn(2, 5, 16)
    gm = fxmpq.trace(m, x)
    assert not any(n.target is gone for n in gm.graph.nodes)
    assert [r.kind for _, r in records(gm)] == kinds
    assert _coverage(gm, x) == pytest.approx(1.0)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["plain", "causal", "bool", "float"])
def test_scaled_dot_product_attention_is_decomposed_with_the_same_values(mode: str) -> None:
    _assert_opened(_SDPA(mode), F.scaled_dot_product_attention, [LayerKind.LINEAR, LayerKind.MATMUL, LayerKind.MATMUL])


class _Einsum(nn.Module):
    def __init__(self, equations: tuple[str, str]):
        super().__init__()
        self.equations = equations
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4).unbind(0)  # (batch, heads, tokens, 8)
        attn = torch.einsum(self.equations[0], q, k).softmax(-1)
        return torch.einsum(self.equations[1], attn, v)


@pytest.mark.parametrize("equations", [
    ("B H I D, B H J D -> B H I J", "B H I J, B H J D -> B H I D"),  # MaxViT's spelling
    ("...id,...jd->...ij", "...ij,...jd->...id"),
    ("bhid,bhjd->bhij", "bhij,bhjd->bihd"),  # the product's output in another order
    ("bhid,bhjd->bij", "bij,bhjd->bhid"),  # two contracted letters (h, d), then two n letters (h, d)
])
def test_an_einsum_that_is_a_batched_matmul_becomes_a_matmul_layer(equations: tuple[str, str]) -> None:
    _assert_opened(_Einsum(equations), torch.einsum, [LayerKind.LINEAR, LayerKind.MATMUL, LayerKind.MATMUL])


@pytest.mark.parametrize("equation", ["bij,bjk", "bij,bjk->bk", "bii,bij->bij", "bij,bkj->bikj", "ij,jk,kl->il"])
def test_an_einsum_that_is_not_one_batched_matmul_is_left_alone(equation: str) -> None:
    assert einsum_as_matmul(equation, (2, 3, 3), (2, 3, 3)) is None
    # timm's relative positions: the batch b would be unflattened at its example size
    assert einsum_as_matmul("byhwc,hkc->byhwk", (2, 3, 4, 4, 8), (4, 5, 8)) is None
    em = einsum_as_matmul("bjk,bij->bki", (2, 3, 4), (2, 5, 3))  # a^T b^T, the product transposed
    assert (em.perm_a, em.perm_b, em.perm_out, em.m_sizes, em.k, em.n_sizes) == ((0, 2, 1), (0, 2, 1), (0, 1, 2),
                                                                                 (4,), 1, (5,))


class _MultiQuery(nn.Module):
    """timm's MultiQueryAttention2d: one key and value for all heads, "bnhk,bmk->bnhm" (m and n groups)."""

    def __init__(self):
        super().__init__()
        self.q, self.kv = nn.Linear(16, 32), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x).unflatten(-1, (4, 8))  # (b, n, heads, 8)
        k, v = self.kv(x).chunk(2, dim=-1)  # (b, m, 8)
        attn = torch.einsum("bnhk,bmk->bnhm", q, k).softmax(-1)
        return torch.einsum("bnhm,bmv->bnhv", attn, v).flatten(2)


def test_an_einsum_with_several_letters_per_group_becomes_one_matmul() -> None:
    _assert_opened(_MultiQuery(), torch.einsum, [LayerKind.LINEAR, LayerKind.LINEAR, LayerKind.MATMUL, LayerKind.MATMUL])


def test_a_vit_is_quantized_whole_and_lowered_with_parity() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, 28, 28)
    q = fxmpq.prepare(small_vit(), x)
    data = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    ind = fxmpq.train_indicators(q, data, TrainOptions(indicator_epochs=1, max_steps=2, progress=False))
    matmuls = [m.name for m in q.analysis.layers if m.kind is LayerKind.MATMUL]
    assert len(matmuls) == 8 and set(matmuls) <= set(ind.layers)  # both operands' steps are indicators
    res = fxmpq.search(q.analysis, ind, fxmpq.Budget.uniform(4, 4))
    assert all(res.policy[n][0] is not None for n in matmuls)
    fxmpq.apply_policy(q, res.policy, torch.randn(8, 1, 28, 28))
    sites = q.sites
    assert all(q.graph_module.get_submodule(sites[n].weight_quantizer).active_bits == res.policy[n][0]
               for n in matmuls)
    with tempfile.TemporaryDirectory() as d:
        rep = fxmpq.lower(q, Path(d) / "vit.onnx", x)
        assert rep.passed
        assert rep.fused_layers == rep.quantized_layers == len(q.analysis.layers)
        ops = rep.op_counts
        assert ops.get("MatMulIntegerToFloat", 0) + ops.get("QLinearMatMul", 0) == len(matmuls)
        kinds = {t.layer: t.kernels for t in rep.layer_timings}
        assert all(set(kinds[n]) & {"MatMulIntegerToFloat", "QLinearMatMul"} for n in matmuls)
        bits = onnx.load(str(Path(d) / "vit.onnx")).metadata_props
        assert any(p.key == "fxmpq.bits" and "blocks.0.attn.matmul" in p.value for p in bits)


class _BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass checking its input's rank, then F.batch_norm and an act."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return F.relu(x)


class _ConvBNAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = _BNAct(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(self.stem(x))).mean((2, 3)))


def test_a_functional_batch_norm_behind_a_rank_check_is_switchable_and_folded(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    gm = fxmpq.trace(_ConvBNAct(), x)
    assert not any(n.target is torch._assert for n in gm.graph.nodes)  # the rank check read the conv a 2nd time
    q = fxmpq.prepare(_ConvBNAct(), x)
    assert q.sites["conv"].batchnorm == "bn.batch_norm"
    fxmpq.train_indicators(
        q,
        [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,)))] * 2,
        TrainOptions(indicator_epochs=1, progress=False),
    )
    fxmpq.apply_policy(q, {"conv": (4, 4)}, torch.randn(8, 3, 8, 8))
    rep = fxmpq.lower(q, tmp_path / "bn.onnx", x)
    assert rep.passed
    assert "BatchNormalization" not in rep.op_counts
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(tmp_path / "bn.onnx")).graph.node)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit", "swin"])
def test_hugging_face_transformers_are_layers_for_at_least_99_percent_of_their_macs(name: str) -> None:
    tf = pytest.importorskip("transformers")
    model = (tf.ViTForImageClassification(tf.ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=10)) if name == "vit" else tf.SwinForImageClassification(tf.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
            num_labels=10))).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = fxmpq.trace(model, x)
    assert sum(r.kind is LayerKind.MATMUL for _, r in records(gm)) == 4  # 2 blocks x (Q.K^T, A.V)
    cover = _coverage(gm, x)
    assert cover >= 0.99, f"hf:{name}: layers cover {100 * cover:.2f} % of the MACs"


class _TimmStyleAttention(nn.Module):
    """timm's VisionTransformer in small: forward(x, attn_mask=None, is_causal=False), the C spelling of SDPA."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4).unbind(0)
        return torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def test_inputs_beyond_the_examples_are_their_defaults_and_timm_attention_opens() -> None:
    torch.manual_seed(0)
    m, x = _TimmStyleAttention().eval(), torch.randn(2, 5, 16)
    gm = fxmpq.trace(m, x)
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert [r.kind for _, r in records(gm)] == [LayerKind.LINEAR, LayerKind.MATMUL, LayerKind.MATMUL]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-6)
