"""The noise floor of a QuantModel: how far its own output moves when its float ops round differently in the last
bits, the most any second implementation (ONNX Runtime) can be asked to match.

Between two quantizers a network may compute in float (LayerNorm, softmax, GELU, a float BatchNorm, a mean, a
matmul of dequantized operands, and the float accumulation from which PyTorch's simulation of an integer kernel
recovers the integer sum). Two libraries computing those ops differ in the last bits, a value that lands within
those bits of a rounding tie is quantized one step apart, and the network can carry such a flip to its output.
`measure_noise_floor` runs the QuantModel against itself with the output of every such float op multiplied by
(1 + r * 2**-23), r a seeded random integer in [-eps, eps] (a change of up to eps float32 epsilons, about as far as
two libraries' LayerNorm or softmax differ), and reports the end-to-end spread in output steps and top-1 agreement,
and how many quantizer values the perturbation moves at their own quantizer. Exact computations
are not perturbed: data movement, comparisons (ReLU, clamp, max pooling), single IEEE-754 arithmetic ops (correctly
rounded in every library), the quantizers and the simulated integer kernels (BiasRounding, AddRounding) given
their inputs. A network without float ops between its quantizers therefore has a floor of 0 output steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx

from ..quant.float_ops import float_op_nodes, float_ops_before
from ..quant.lsq import LSQQuantizer

if TYPE_CHECKING:
    from ..quant.quant_model import QuantModel

__all__ = ["NoiseFloor", "float_op_nodes", "float_ops_before", "measure_noise_floor", "perturb"]


EPSILON = 2.0**-23  # float32's machine epsilon: one unit in the last place of a value in [1, 2)


def perturb(x: Any, eps: int, generator: torch.Generator) -> Any:
    """A float tensor `x` with every value multiplied by (1 + r * 2**-23), r drawn uniformly from {-eps, ..., eps}
    (seeded by `generator`): a relative change of up to `eps` float32 epsilons (and the product's rounding), up to
    2 * eps ulps of the value (zeros, infinities and NaNs unchanged); anything else returned as it is."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        return x
    factor = torch.randint(-eps, eps + 1, x.shape, generator=generator, dtype=torch.float32)
    factor = factor.mul_(EPSILON).add_(1.0).to(x.device)  # exact in float32 for |r| < 2**23
    return (x.detach().float() * factor).to(x.dtype)


def _quantizer_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    return {n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), LSQQuantizer)}


class _Perturbed(fx.Interpreter):
    """Runs `gm` with the outputs of `nodes` perturbed (`perturb`); `touched`: those that computed a float tensor."""

    def __init__(self, gm: fx.GraphModule, nodes: set[fx.Node], eps: int, generator: torch.Generator) -> None:
        super().__init__(gm)
        self.nodes, self.eps, self.generator = nodes, eps, generator
        self.touched: set[fx.Node] = set()

    def run_node(self, n: fx.Node) -> Any:
        r = super().run_node(n)
        if n not in self.nodes:
            return r
        if isinstance(r, torch.Tensor) and r.is_floating_point():
            self.touched.add(n)
        return perturb(r, self.eps, self.generator)


class _Forced(fx.Interpreter):
    """Runs `gm` as it is (the values it returns) and, alongside, with the outputs of `nodes` perturbed, each
    quantizer fed the perturbed values before it but passing the unperturbed value on (teacher forcing); counts the
    quantizer values the perturbation moved at their own stage (`flips` of `values`). Only values that differ from
    the unperturbed ones are computed twice; a value shared by both runs is copied before an op reads it for the
    perturbed run (an in-place op must not change it twice)."""

    def __init__(self, gm: fx.GraphModule, nodes: set[fx.Node], eps: int, generator: torch.Generator) -> None:
        super().__init__(gm)
        self.nodes, self.eps, self.generator = nodes, eps, generator
        self.quantizers = _quantizer_nodes(gm)
        self.pert: dict[fx.Node, Any] = {}
        self.flips = self.values = 0

    def _run_perturbed(self, n: fx.Node) -> Any:
        env = self.env
        self.env = {a: self.pert[a] if a in self.pert else
                    (env[a].clone() if isinstance(env[a], torch.Tensor) else env[a]) for a in n.all_input_nodes}
        try:
            return super().run_node(n)
        finally:
            self.env = env

    def run_node(self, n: fx.Node) -> Any:
        r = super().run_node(n)
        distinct = any(a in self.pert for a in n.all_input_nodes)
        if n in self.quantizers and isinstance(r, torch.Tensor):
            if distinct:
                self.flips += int((self._run_perturbed(n) != r).sum())
            self.values += r.numel()
        elif n in self.nodes or distinct:
            p = self._run_perturbed(n) if distinct else r
            p = perturb(p, self.eps, self.generator) if n in self.nodes else p
            if p is not r and not isinstance(p, int | float | bool | torch.Size | None):
                self.pert[n] = p
        for dead in self.user_to_last_uses.get(n, ()):
            self.pert.pop(dead, None)
        return r


@dataclass(frozen=True)
class NoiseFloor:
    """The QuantModel against itself with its float ops perturbed: `seeds` runs, each moving the output of every
    float op by up to `eps` float32 epsilons (`perturb`); the worst run's figures.

    `max_steps`: the largest end-to-end output difference in output steps (None for a float output); `rel_l2` its
    relative L2 error; `top1_decisive`: the lowest top-1 agreement on the decisive inputs (those whose two largest
    logits are further apart than the tolerance band; None without logits or decisive inputs); `disagreements`:
    the most decisive inputs one run flipped. `float_ops`: how many graph nodes were perturbed. `stage_flips` of
    `stage_values`: the quantizer values the first seed's perturbation moved by a step at their own quantizer
    (each quantizer fed the unperturbed values of those before it), on the first `batch` inputs, as ONNX Runtime's
    stage-by-stage diagnosis counts its own."""

    eps: int
    seeds: int
    max_steps: float | None
    rel_l2: float
    top1_decisive: float | None
    disagreements: int
    float_ops: int
    stage_flips: int = 0
    stage_values: int = 0
    seed_steps: tuple[float, ...] = ()  # each seed's output difference in output steps
    seed_disagreements: tuple[int, ...] = ()  # each seed's flipped decisive inputs
    seconds: float = 0.0  # what measuring it took (wall clock)

    def describe(self) -> str:
        """One line: how far the output moved, and under what perturbation."""
        steps = f"{self.max_steps:.2f} output steps" if self.max_steps is not None else "float output"
        top1 = "n/a" if self.top1_decisive is None else f"{100 * self.top1_decisive:.2f} %"
        return (f"{steps}, decisive top-1 {top1} (PyTorch against itself, the outputs of its {self.float_ops} float "
                f"ops moved by up to {self.eps} float32 epsilons, worst of {self.seeds} seeds)")


def measure_noise_floor(qmodel: QuantModel, inputs: tuple[torch.Tensor, ...], batch: int, *, step: float | None,
                        decisive: np.ndarray | None, eps: int = 2, seeds: int = 4, seed: int = 0) -> NoiseFloor:
    """Run `qmodel`'s graph (eval) on `inputs` as it is and `seeds` times with the outputs of its float ops moved by
    up to `eps` float32 epsilons (`perturb`), in batches of `batch`; the spread of the perturbed outputs around the
    unperturbed one.

    `step` is the output quantizer's step (the spread is given in it; None for a float output); `decisive` marks
    the inputs whose top-1 a difference within tolerance cannot flip (top-1 agreement is counted on those, as it is
    for ONNX Runtime). The stage flips are counted on the first batch with the first seed's perturbation. Without
    float ops the floor is 0 and only the unperturbed run is made."""
    start = time.perf_counter()
    gm = qmodel.graph_module
    nodes = set(float_op_nodes(gm))
    n_inputs = inputs[0].shape[0]
    chunks = [tuple(x[i: i + batch] for x in inputs) for i in range(0, n_inputs, batch)]
    with torch.no_grad():
        ref_parts = []
        for i, chunk in enumerate(chunks):
            run = _Forced(gm, nodes if i == 0 else set(), eps, torch.Generator().manual_seed(seed * 7919))
            ref_parts.append(run.run(*chunk).float().numpy())
            if i == 0:
                flips, values = run.flips, run.values
        reference = np.concatenate(ref_parts)
        ref64 = reference.astype(np.float64)
        logits = decisive is not None and bool(decisive.any()) and reference.ndim == 2
        touched: set[fx.Node] = set()
        seed_steps: list[float] = []
        seed_dis: list[int] = []
        rel: list[float] = []
        top1: list[float] = []
        for s in range(seeds if nodes else 0):
            g = torch.Generator().manual_seed(seed * 7919 + s)
            outs = []
            for chunk in chunks:
                run = _Perturbed(gm, nodes, eps, g)
                outs.append(run.run(*chunk).float().numpy())
                touched |= run.touched
            y = np.concatenate(outs).reshape(reference.shape)
            diff = np.abs(y.astype(np.float64) - ref64)
            seed_steps.append(float(diff.max(initial=0.0)) / step if step else 0.0)
            rel.append(float(np.linalg.norm(diff) / max(np.linalg.norm(ref64), 1e-30)))
            if logits:
                agree = (y.argmax(1) == reference.argmax(1))[decisive]
                seed_dis.append(int((~agree).sum()))
                top1.append(float(agree.mean()))
    return NoiseFloor(eps=eps, seeds=seeds, max_steps=max(seed_steps, default=0.0) if step else None,
                      rel_l2=max(rel, default=0.0), top1_decisive=min(top1, default=1.0) if logits else None,
                      disagreements=max(seed_dis, default=0), float_ops=len(touched), stage_flips=flips,
                      stage_values=values, seed_steps=tuple(seed_steps) if step else (),
                      seed_disagreements=tuple(seed_dis), seconds=time.perf_counter() - start)
