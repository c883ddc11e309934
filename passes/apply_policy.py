"""ApplyPolicyPass: fix a QuantModel at one policy and give un-quantized conv/linear outputs an 8-bit quantizer."""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxmpq.errors import PassError
from fxmpq.graph import as_input_tuple
from fxmpq.policy import Policy
from fxmpq.quant import LSQQuantizer

from .base import PassBase, PassResult, run_passes

if TYPE_CHECKING:
    from fxmpq.quant import QuantModel, QuantSite

log = logging.getLogger(__name__)

__all__ = ["OUTPUT_QUANTIZER", "ApplyPolicyPass", "BiasRounding", "apply_policy", "layer_node", "relu_bounds"]

OUTPUT_QUANTIZER = "output_quantizer"
_ADD_CONTAINER = "fxmpq_join"

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


def linear_runs_as_conv(node: fx.Node) -> bool:
    """Whether LowerToQDQPass emits this Linear as a 1x1 QLinearConv (an integer kernel that requantizes its
    output): when its output has rank >= 2. On a 1-D input it stays a float MatMul. One rule for both passes."""
    tm = node.meta.get("tensor_meta")
    return tm is not None and hasattr(tm, "shape") and len(tm.shape) >= 2


def relu_bounds(gm: fx.GraphModule, node: fx.Node) -> tuple[float, float] | None:
    """(lo, hi) when `node` is a ReLU / ReLU6 / Hardtanh (module, function or method), else None."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.ReLU6):
            return 0.0, 6.0
        if isinstance(m, nn.ReLU):
            return 0.0, float("inf")
        if isinstance(m, nn.Hardtanh):
            return float(m.min_val), float(m.max_val)
        return None
    if node.op == "call_function":
        if node.target in (F.relu, torch.relu, torch.relu_):
            return 0.0, float("inf")
        if node.target is F.relu6:
            return 0.0, 6.0
        if node.target is F.hardtanh:
            args = [*list(node.args[1:]), None, None]
            lo = node.kwargs.get("min_val", args[0] if args[0] is not None else -1.0)
            hi = node.kwargs.get("max_val", args[1] if args[1] is not None else 1.0)
            return float(lo), float(hi)
        return None
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return 0.0, float("inf")
    return None


def _is_bn(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    m = gm.get_submodule(node.target)
    return isinstance(m, _BN_TYPES) or hasattr(m, "bns")


def _device(gm: fx.GraphModule) -> torch.device:
    p = next(gm.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _is_bias_rounding(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), BiasRounding)


def _is_quantizer(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), LSQQuantizer)


def layer_node(gm: fx.GraphModule, site: QuantSite) -> fx.Node:
    """The call node of the layer a QuantSite describes (module call, or functional call fed by its quantizer)."""
    owner = site.weight_quantizer.rpartition(".")[0]
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == owner:
            return node
        if node.op == "call_function" and any(
            isinstance(a, fx.Node) and a.op == "call_module" and a.target == site.weight_quantizer
            for a in (*node.args, *node.kwargs.values())
        ):
            return node
    raise PassError(f"layer {site.layer}: no call node uses its weight quantizer {site.weight_quantizer!r}")


class BiasRounding(nn.Module):
    """In eval mode, adds what rounding the (BN-folded) bias to int32 at scale s_x * s_w changes: per channel
    round(b'/S) * S - b' with S = s_w * gamma/sqrt(var+eps) * s_x and b' the folded bias; identity in training.

    The exported QDQ model carries the bias as int32 (ONNX Runtime's integer kernels need it), so with this
    node the PyTorch model in eval mode computes what the exported model computes. The tensors arrive as
    graph inputs (get_attr of the layer's and BatchNorm's own parameters), so nothing is stored twice.
    """

    def __init__(self, *, channel_axis: int, eps: float | None):
        super().__init__()
        self.channel_axis = channel_axis
        self.eps = eps

    def forward(self, y: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor, s_out: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None,
                mean: torch.Tensor | None = None, var: torch.Tensor | None = None,
                ready: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            return y
        with torch.no_grad():
            ch = y.shape[self.channel_axis]
            s_w = s_w.detach().float().reshape(-1).expand(ch)
            b = bias.detach().float() if bias is not None else torch.zeros(ch, device=y.device)
            scale = s_w
            if mean is not None and var is not None and self.eps is not None:
                f = torch.rsqrt(var.float() + self.eps)
                if gamma is not None:
                    f = f * gamma.detach().float()
                b = (b - mean.float()) * f + (beta.detach().float() if beta is not None else 0.0)
                scale = scale * f
            sx = s_x.detach().float().reshape(())
            b_scale = scale * sx
            b_int = torch.round(b / b_scale)
            shape = [1] * y.dim()
            shape[self.channel_axis] = ch
            rounded = y + (b_int * b_scale - b).reshape(shape).to(y.dtype)
            if s_out is None:
                return rounded
            # the integer kernel: acc (exact integer sum + int32 bias) * M, M = s_x * s_w / s_out (float32),
            # rounded half to even; the following quantizer recovers n exactly from n * s_out
            acc = torch.round((y.float() - b.reshape(shape)) / b_scale.reshape(shape)) + b_int.reshape(shape)
            so = s_out.detach().float().reshape(())
            m = (sx * scale) / so
            n = torch.round(acc * m.reshape(shape))
            out = (n * so).to(y.dtype)
            if ready is not None:  # the output quantizer has no step size yet (its first batch): do not use it
                out = torch.where(ready, out, rounded)
        return out


class ApplyPolicyPass(PassBase):
    """Fix every quantizer of `model` at `policy` (keeping only that bit's step size and BatchNorm).

    Then every conv/linear whose output (after the BatchNorm that folds into it, and a following ReLU/ReLU6)
    feeds anything but quantizers gets an 8-bit output quantizer (unsigned after a ReLU, signed otherwise),
    a submodule `<layer>.output_quantizer` whose step size is learned like the others. With `quantize_adds`
    (off by default), tensor sums (residual joins) that feed no quantizer get one too
    (`fxmpq_join.<node>_output_quantizer`), so ONNX Runtime runs them as QLinearAdd; its fixed-point
    arithmetic does not reproduce float add-then-round, so lower()'s parity check fails on such models
    (measured on resnet18: 8 output steps, 83 % top-1 agreement) until the simulation emulates QLinearAdd.
    All consumers of such an output read the quantized value, so the PyTorch model computes what the exported QDQ graph computes and
    ONNX Runtime can fuse the layer into an integer kernel. The pass runs on `model.graph_module`.
    """

    def __init__(self, *, model: QuantModel, policy: Policy | Mapping[str, tuple[int, int]], output_bits: int = 8,
                 quantize_adds: bool = False):
        super().__init__()
        self.model = model
        self.policy = policy if isinstance(policy, Policy) else Policy(policy)
        if not 2 <= int(output_bits) <= 8:
            raise PassError(f"ApplyPolicyPass: output_bits must be in 2..8 (uint8 activations), found {output_bits}")
        self.output_bits = int(output_bits)
        self.quantize_adds = quantize_adds
        self.added: list[str] = []

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        if gm is not self.model.graph_module:
            raise PassError("ApplyPolicyPass must run on the graph module of the QuantModel it was given")
        self.model.set_policy(self.policy)
        self.model.fix()
        self.added = []
        for name in self.model.layer_names:
            site = self.model.sites[name]
            node = layer_node(gm, site)
            end = node
            if len(end.users) == 1 and _is_bn(gm, next(iter(end.users))):
                end = next(iter(end.users))
            if len(end.users) == 1 and _is_bias_rounding(gm, next(iter(end.users))):
                end = next(iter(end.users))
            unsigned = False
            if len(end.users) == 1:
                nxt = next(iter(end.users))
                bounds = relu_bounds(gm, nxt)
                if bounds is not None and bounds[0] >= 0:
                    end, unsigned = nxt, True
            users = list(end.users)
            # ONNX Runtime fuses a layer only into a single QuantizeLinear consumer
            if len(users) == 1 and _is_quantizer(gm, users[0]):
                continue
            owner = site.weight_quantizer.rpartition(".")[0]
            path = f"{owner}.{OUTPUT_QUANTIZER}"
            parent = gm.get_submodule(owner)
            if not hasattr(parent, OUTPUT_QUANTIZER):
                q = LSQQuantizer((self.output_bits,), signed=not unsigned)
                q.set_bits(self.output_bits)
                q.train(gm.training)
                q.to(_device(gm))
                parent.add_module(OUTPUT_QUANTIZER, q)
            with gm.graph.inserting_after(end):
                qn = gm.graph.call_module(path, (end,))
            for u in users:
                u.replace_input_with(end, qn)
            self.added.append(path)
            log.debug("layer %s: %d-bit output quantizer %s after %s", name, self.output_bits, path, end.name)
        if self.quantize_adds:
            self._add_quantizers(gm)
        for name in self.model.layer_names:
            self._bias_rounding(gm, self.model.sites[name])
        if self.added:
            gm.graph.lint()
            gm.recompile()
        log.info("applied policy to %d layers; %d output quantizers added", len(self.model.layer_names),
                 len(self.added))
        # fixing quantizers changes the module even when the graph does not
        return PassResult(gm, True)


    def _add_quantizers(self, gm: fx.GraphModule) -> None:
        """An 8-bit quantizer after each tensor sum (a residual join, after its ReLU) that feeds no quantizer.

        With both inputs and the output quantized, ONNX Runtime runs the join as QLinearAdd and the blocks
        after it read integers, instead of a float Add between DequantizeLinear/QuantizeLinear pairs.
        """
        if not hasattr(gm, _ADD_CONTAINER):
            gm.add_module(_ADD_CONTAINER, nn.Module())
        holder = gm.get_submodule(_ADD_CONTAINER)
        for node in list(gm.graph.nodes):
            is_add = (node.op == "call_function" and node.target in (operator.add, torch.add)) or (
                node.op == "call_method" and node.target == "add")
            if not is_add or len(node.args) < 2 or not all(isinstance(a, fx.Node) for a in node.args[:2]):
                continue
            end, unsigned = node, False
            if len(end.users) == 1:
                bounds = relu_bounds(gm, next(iter(end.users)))
                if bounds is not None and bounds[0] >= 0:
                    end, unsigned = next(iter(end.users)), True
            users = list(end.users)
            if not users or (len(users) == 1 and _is_quantizer(gm, users[0])):
                continue
            mname = f"{node.name}_output_quantizer"
            if not hasattr(holder, mname):
                q = LSQQuantizer((self.output_bits,), signed=not unsigned)
                q.set_bits(self.output_bits)
                q.train(gm.training)
                q.to(_device(gm))
                holder.add_module(mname, q)
            with gm.graph.inserting_after(end):
                qn = gm.graph.call_module(f"{_ADD_CONTAINER}.{mname}", (end,))
            for u in users:
                u.replace_input_with(end, qn)
            self.added.append(f"{_ADD_CONTAINER}.{mname}")

    @staticmethod
    def _bias_rounding(gm: fx.GraphModule, site: QuantSite) -> None:
        node = layer_node(gm, site)
        wq = gm.get_submodule(site.weight_quantizer)
        aq = gm.get_submodule(site.act_quantizer)
        if wq.active_bits is None or aq.active_bits is None or aq.channels:
            return
        g = gm.graph
        after = node
        bn_path = None
        if len(node.users) == 1 and _is_bn(gm, next(iter(node.users))):
            after = next(iter(node.users))
            bn_mod = gm.get_submodule(after.target)
            bn_path = after.target + (".bns.0" if hasattr(bn_mod, "bns") else "")
        if any(_is_bias_rounding(gm, u) for u in after.users):
            return
        owner = site.weight_quantizer.rpartition(".")[0]
        bias_target = None
        if node.op == "call_module":
            if getattr(gm.get_submodule(node.target), "bias", None) is not None:
                bias_target = f"{node.target}.bias"
        else:
            b = node.kwargs.get("bias", node.args[2] if len(node.args) > 2 else None)
            if isinstance(b, fx.Node) and b.op == "get_attr":
                bias_target = b.target
        bn = gm.get_submodule(bn_path) if bn_path else None
        channel_axis = 1 if (node.op == "call_module" and not isinstance(gm.get_submodule(node.target), nn.Linear)
                             ) or node.target in (F.conv1d, F.conv2d, torch.conv1d, torch.conv2d) else -1
        mod = BiasRounding(channel_axis=channel_axis, eps=float(bn.eps) if bn is not None else None)
        mod.train(gm.training)
        parent = gm.get_submodule(owner)
        parent.add_module("bias_rounding", mod)
        # the single quantizer this output reaches (maybe through a ReLU): its step defines the requantization
        # of the integer kernel. A Linear on a 1-D input stays a float MatMul in ONNX Runtime (no requantization),
        # so only its bias rounding is simulated.
        out_q = None
        float_kernel = channel_axis == -1 and not linear_runs_as_conv(node)
        nxt = after
        if len(nxt.users) == 1 and relu_bounds(gm, next(iter(nxt.users))) is not None:
            nxt = next(iter(nxt.users))
        if not float_kernel and len(nxt.users) == 1 and _is_quantizer(gm, next(iter(nxt.users))):
            cand = next(iter(nxt.users))
            qmod = gm.get_submodule(cand.target)
            if qmod.active_bits is not None and not qmod.channels:
                out_q = cand.target
        users = list(after.users)
        order = {n: i for i, n in enumerate(g.nodes)}
        first = min(users, key=order.__getitem__) if users else None
        with g.inserting_before(first) if first is not None else g.inserting_after(after):
            args = [after, g.get_attr(f"{site.act_quantizer}.step"), g.get_attr(f"{site.weight_quantizer}.step"),
                    g.get_attr(f"{out_q}.step") if out_q else None,
                    g.get_attr(bias_target) if bias_target else None]
            if bn is not None:
                args += [g.get_attr(f"{bn_path}.{k}") if getattr(bn, k) is not None else None
                         for k in ("weight", "bias", "running_mean", "running_var")]
            ready = {"ready": g.get_attr(f"{out_q}.initialized")} if out_q else {}
            rn = g.call_module(f"{owner}.bias_rounding", tuple(args), ready)
        for u in users:
            u.replace_input_with(after, rn)


def apply_policy(qmodel: QuantModel, policy: Policy | Mapping[str, tuple[int, int]], example_inputs: Any = None,
                 *, output_bits: int = 8) -> QuantModel:
    """Fix `qmodel` (in place) at `policy` and add output quantizers; returns `qmodel`.

    With `example_inputs`, the model runs once on them (eval mode, no gradients) so that new output
    quantizers take their initial step size from data (LSQ's init); otherwise they do on the first batch.
    """
    p = ApplyPolicyPass(model=qmodel, policy=policy, output_bits=output_bits)
    run_passes(qmodel.graph_module, [p])
    if example_inputs is not None:
        was = qmodel.training
        qmodel.eval()
        with torch.no_grad():
            qmodel(*as_input_tuple(example_inputs))
        qmodel.train(was)
    return qmodel
