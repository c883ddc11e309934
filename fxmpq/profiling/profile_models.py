"""The small models `fxmpq profile` times: one layer of a captured model alone (a matmul as a two-input model),
and two layers run back to back with the ops between them (fxmpq.profiling.profile exports and times them)."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from ..capture.matcher import layer_input, weight_arg
from ..capture.record import record_of
from ..errors import ArgumentError
from ..hardware.spec import LayerKind
from ..passes.patterns import is_nonnegative

__all__ = ["one_layer_module", "pair_module", "reads_elsewhere"]


class _OneMatmul(nn.Module):
    """A matmul of two inputs (a @ b); an operand the model shows non-negative (a softmax) goes through a ReLU first,
    so that it gets the same unsigned quantizer (and ONNX Runtime the same u8 kernel) as in the model."""

    def __init__(self, a_nonnegative: bool, b_nonnegative: bool):
        super().__init__()
        self.a_nonnegative, self.b_nonnegative = a_nonnegative, b_nonnegative

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a.relu() if self.a_nonnegative else a, b.relu() if self.b_nonnegative else b)


class _OneLayer(nn.Module):
    """A module holding one layer (`self.layer`), so that the layer is the model's only quantizable op, and the
    BatchNorm after it when it has one (folded by the lowering, as in the whole model)."""

    def __init__(self, layer: nn.Module, bn: nn.Module | None = None):
        super().__init__()
        self.layer = layer
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        return self.bn(y) if self.bn is not None else y


def _bn_after(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The BatchNorm module call that is `node`'s only user (the lowering folds it into the layer), or None."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module":
        if isinstance(gm.get_submodule(users[0].target), nn.BatchNorm1d | nn.BatchNorm2d):
            return users[0]
    return None


def one_layer_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    """The layer at `node` of the captured `gm` as a model of its own: a plain nn.Conv*/nn.Linear with its options
    and a copy of its weights (module or functional call), then a copy of the BatchNorm after it if any; a matmul
    as a two-input matmul whose operands keep the signedness the graph shows."""
    rec = record_of(node)
    if rec.kind is LayerKind.MATMUL:
        return _OneMatmul(is_nonnegative(gm, layer_input(node)), is_nonnegative(gm, weight_arg(node))).eval()
    if not rec.weight:
        raise ArgumentError(f"layer {rec.name}: its weight is computed in forward, so it cannot be profiled alone "
                            f"(fxmpq profile); price the model with a formula-based hardware file")
    weight = gm.get_parameter(rec.weight).detach().clone()
    bias = gm.get_parameter(rec.bias).detach().clone() if rec.bias is not None else None
    if rec.conv is None:
        layer: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        c = rec.conv
        cls = {1: nn.Conv1d, 2: nn.Conv2d}[c.dim]
        layer = cls(weight.shape[1] * c.groups, weight.shape[0], tuple(weight.shape[2:]), stride=c.stride,
                    padding=c.padding, dilation=c.dilation, groups=c.groups, bias=bias is not None,
                    padding_mode=c.padding_mode)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    bn = _bn_after(gm, node)
    return _OneLayer(layer, copy.deepcopy(gm.get_submodule(bn.target)) if bn is not None else None).eval()


def pair_module(gm: fx.GraphModule, producer: fx.Node, consumer: fx.Node) -> fx.GraphModule:
    """The two layers `producer` -> `consumer` of `gm`, the ops between them (BN, ReLU, reshapes) and the consumer's
    BatchNorm, as a model of their own reading the producer's input."""
    between = []
    x = layer_input(consumer)
    while x is not producer:
        between.append(x)
        x = x.args[0]
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {layer_input(producer): g.placeholder("x")}

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op != "get_attr":
                raise ArgumentError(f"layers {producer.name} -> {consumer.name}: node {a.format_node()} between them "
                                    f"reads another value")
            env[a] = g.node_copy(a)
        return env[a]

    bn = _bn_after(gm, consumer)
    last = bn if bn is not None else consumer
    for n in [producer, *reversed(between), consumer, *([bn] if bn is not None else [])]:
        env[n] = g.node_copy(n, arg)
    g.output(env[last])
    return fx.GraphModule(gm, g).eval()


def reads_elsewhere(producer: fx.Node, consumer: fx.Node) -> bool:
    """Whether the producer's output (through the ops up to the consumer) is also read by something else."""
    x = layer_input(consumer)
    path = []
    while x is not producer:
        path.append(x)
        x = x.args[0]
    chain = {producer, *path}
    return any(u not in chain and u is not consumer for n in chain for u in n.users)
