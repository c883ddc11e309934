"""The integer-kernel simulations: AddRounding against ONNX Runtime's QLinearAdd bit for bit, an exact float32 fma."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fxmpq.core.primitives import quantize
from fxmpq.quant.kernels import AddRounding, MatMulRounding, fma_float32


def _exact_fma32(x: float, y: float, z: float) -> float:
    """x * y + z rounded once to float32, in exact rational arithmetic (ties to even)."""
    v = Fraction(x) * Fraction(y) + Fraction(z)
    f = np.float32(float(v))
    near = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    return float(min(near, key=lambda c: (abs(Fraction(float(c)) - v), int(c.view(np.uint32)) & 1)))


def test_fma_float32_rounds_once():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3000,), generator=g).float()
    y = torch.rand(3000, generator=g) * 2
    z = torch.randn(3000, generator=g) * 50
    r = fma_float32(x, y, z)
    assert all(r[i].item() == _exact_fma32(x[i].item(), y[i].item(), z[i].item()) for i in range(3000))
    # the float64 sum lands exactly halfway between two float32 values while the exact sum lies just below it
    # (then z odd) or just above it (z odd, the product negative): rounding the float64 sum again to even goes
    # the wrong way
    for sign in (1, -1):
        xs = torch.full((4,), sign * (1 + 2**-15) * 2**-24)
        ys = torch.full((4,), 1 - 2**-15)
        zs = torch.tensor([1 + k * 2**-23 for k in (1, 3, 5, 7)])
        r = fma_float32(xs, ys, zs)
        naive = (xs.double() * ys.double() + zs.double()).float()
        for i in range(4):
            want = _exact_fma32(xs[i].item(), ys[i].item(), zs[i].item())
            assert r[i].item() == want and naive[i].item() != want


def _ort_add(sa: float, za: int, sb: float, zb: int, sc: float, zc: int, fused: bool) -> ort.InferenceSession:
    n = "n"  # any length
    inits = [numpy_helper.from_array(np.array(v, np.float32), k) for v, k in ((sa, "sa"), (sb, "sb"), (sc, "sc"))]
    inits += [numpy_helper.from_array(np.array(v, np.uint8), k) for v, k in ((za, "za"), (zb, "zb"), (zc, "zc"))]
    if fused:  # what fxmpq exports: ONNX Runtime fuses it into QLinearAdd
        nodes = [helper.make_node("DequantizeLinear", ["A", "sa", "za"], ["fa"]),
                 helper.make_node("DequantizeLinear", ["B", "sb", "zb"], ["fb"]),
                 helper.make_node("Add", ["fa", "fb"], ["s"]), helper.make_node("QuantizeLinear", ["s", "sc", "zc"], ["C"])]
    else:
        nodes = [helper.make_node("QLinearAdd", ["A", "sa", "za", "B", "sb", "zb", "sc", "zc"], ["C"],
                                  domain="com.microsoft")]
    graph = helper.make_graph(nodes, "add", [helper.make_tensor_value_info(k, TensorProto.UINT8, [n]) for k in "AB"],
                              [helper.make_tensor_value_info("C", TensorProto.UINT8, [n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("seed", range(4))
def test_add_rounding_is_qlinear_add_bit_for_bit(seed):
    rng = random.Random(seed)
    a, b = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    # every pair once (the direct computation) or, for odd seeds, every pair twice in random order: over 65,536
    # elements AddRounding looks the pairs up in a table it computes, which must give the same numbers
    a, b = a.ravel(), b.ravel()
    if seed % 2:
        order = np.random.default_rng(seed).permutation(2 * a.size)
        a, b = np.concatenate([a, a])[order], np.concatenate([b, b])[order]
    for _ in range(6):
        sa, sb, sc = (float(np.float32(10 ** rng.uniform(-3, 0))) for _ in range(3))
        za, zb, zc = (rng.choice((0, 128)) for _ in range(3))  # fxmpq's zero points: unsigned 0, signed 128
        want = _ort_add(sa, za, sb, zb, sc, zc, fused=True).run(None, {"A": a, "B": b})[0]
        assert np.array_equal(want, _ort_add(sa, za, sb, zb, sc, zc, fused=False).run(None, {"A": a, "B": b})[0])
        s = [torch.tensor(v, dtype=torch.float32) for v in (sa, sb, sc)]
        xa = (torch.from_numpy(a.astype(np.float32)) - za) * s[0]  # DequantizeLinear
        xb = (torch.from_numpy(b.astype(np.float32)) - zb) * s[1]
        y = AddRounding(zero_points=(za, zb, zc)).eval()(xa + xb, xa, xb, *s)
        got = (quantize(y, s[2], -zc, 255 - zc) + zc).to(torch.uint8).numpy()  # the quantizer that reads it
        plain = (quantize(xa + xb, s[2], -zc, 255 - zc) + zc).to(torch.uint8).numpy()
        assert np.array_equal(got, want), (sa, sb, sc, za, zb, zc, int((got != want).sum()))
        assert (plain != want).sum() <= 8  # float add-then-round: the same but near ties


def test_add_rounding_is_identity_in_training_and_before_the_step_is_set():
    m = AddRounding(zero_points=(0, 128, 0))
    y = torch.randn(4, 8)
    s = torch.tensor(0.1)
    assert m(y, y, y, s, s, s) is y
    m.eval()
    assert torch.equal(m(y, y, y, s, s, s, ready=torch.tensor(False)), y)


def test_add_rounding_table_equals_the_direct_computation_with_broadcasting():
    from fxmpq.quant import kernels

    g = torch.Generator().manual_seed(0)
    s = [torch.tensor(v) for v in (0.0213, 0.0071, 0.0302)]
    for shape_a, shape_b in (((2, 8, 70, 70), (2, 8, 70, 70)), ((2, 8, 70, 70), (1, 8, 1, 1)),
                             ((1, 8, 1, 70), (2, 8, 70, 70))):
        xa = torch.randint(0, 256, shape_a, generator=g).float() * s[0]
        xb = (torch.randint(0, 256, shape_b, generator=g).float() - 128) * s[1]
        m = AddRounding(zero_points=(0, 128, 0)).eval()
        got = m(xa + xb, xa, xb, *s)
        qa, qb = torch.round(xa / s[0]), torch.round(xb / s[1]) + 128
        ra, rb = s[0] / s[2], s[1] / s[2]
        fixed = -(rb * 128)
        n = torch.round(kernels.fma_float32(qa, ra, kernels.fma_float32(qb, rb, fixed.expand_as(qb))))
        assert got.shape == (xa + xb).shape
        assert torch.equal(got, n * s[2])


def _ort_matmul(sa: float, za: int, sb: float, zb: int, shape_a: tuple[int, ...], shape_b: tuple[int, ...],
                sy: float | None = None, zy: int = 0) -> ort.InferenceSession:
    """DQ(A), DQ(B) -> MatMul (-> Q -> DQ with `sy`): what ONNX Runtime fuses into MatMulIntegerToFloat (or
    QLinearMatMul)."""
    init = [numpy_helper.from_array(np.array(v, t), n) for v, t, n in
            ((sa, np.float32, "sa"), (za, np.uint8, "za"), (sb, np.float32, "sb"), (zb, np.uint8, "zb"))]
    nodes = [helper.make_node("DequantizeLinear", ["A", "sa", "za"], ["da"]),
             helper.make_node("DequantizeLinear", ["B", "sb", "zb"], ["db"]),
             helper.make_node("MatMul", ["da", "db"], ["mm"])]
    if sy is None:
        nodes.append(helper.make_node("Identity", ["mm"], ["Y"]))
    else:
        init += [numpy_helper.from_array(np.array(sy, np.float32), "sy"), numpy_helper.from_array(np.array(zy, np.uint8), "zy")]
        nodes += [helper.make_node("QuantizeLinear", ["mm", "sy", "zy"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "sy", "zy"], ["Y"])]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("A", TensorProto.UINT8, list(shape_a)),
                                            helper.make_tensor_value_info("B", TensorProto.UINT8, list(shape_b))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("seed", range(4))
def test_matmul_rounding_is_matmul_integer_to_float_bit_for_bit(seed):
    """Attention's q @ k^T in ONNX Runtime sums the integers exactly and scales once; PyTorch's float32 matmul of
    the dequantized operands differs from it in most values, MatMulRounding in none (and with a quantizer after
    it, QLinearMatMul's values too)."""
    rng = np.random.default_rng(seed)
    shape_a, shape_b = (2, 3, 64, 96), (2, 3, 96, 80)
    a = rng.integers(0, 256, shape_a, dtype=np.uint8)
    b = rng.integers(0, 256, shape_b, dtype=np.uint8)
    sa, sb = (float(np.float32(10 ** rng.uniform(-3, -1))) for _ in range(2))
    za, zb = (int(rng.choice((0, 128))) for _ in range(2))
    s_a, s_b = torch.tensor(sa), torch.tensor(sb)
    xa = (torch.from_numpy(a.astype(np.float32)) - za) * s_a  # the quantizers' outputs
    xb = (torch.from_numpy(b.astype(np.float32)) - zb) * s_b
    plain = torch.matmul(xa, xb)
    y = MatMulRounding().eval()(plain, xa, xb, s_a, s_b)
    want = _ort_matmul(sa, za, sb, zb, shape_a, shape_b).run(None, {"A": a, "B": b})[0]
    assert np.array_equal(y.numpy(), want)
    assert (plain.numpy() != want).mean() > 0.3  # the float32 matmul is not what ONNX Runtime computes
    sy = float(np.float32(sa * sb * 10 ** rng.uniform(1.5, 2.5)))
    want_q = _ort_matmul(sa, za, sb, zb, shape_a, shape_b, sy, 128).run(None, {"A": a, "B": b})[0]
    got_q = quantize(y, torch.tensor(sy), -128, 127) * torch.tensor(sy)
    assert np.array_equal(got_q.numpy(), want_q)
    assert MatMulRounding().train()(plain, xa, xb, s_a, s_b) is plain  # identity in training
