"""Many small models exported as one: the one-layer and pair models `fxmpq profile` times become the branches of
one module, exported by one torch.onnx run (not one run each, which cost seconds apiece), then cut back apart
with onnx's Extractor into files that hold the same nodes and initializers as separate exports would.

Each branch reads its own inputs and ends in a ReduceMean that marks its output (a mean the optimizer cannot
merge into the branch, unlike a reshape); the marker is not part of the extracted file. A bundle that fails to
lower is exported again branch by branch, so that the error names the layer and not the bundle."""

from __future__ import annotations

import copy
import multiprocessing
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from ..capture.graph import as_input_tuple, propagate_shapes
from ..core.options import LowerOptions
from ..errors import FxmpqError
from ..export.lower import lower, to_onnx
from ..hardware.spec import HardwareSpec, Pair
from ..passes import run_passes
from ..quant.storage import as_storage
from ..stages import apply_policy, lower_passes, prepare

__all__ = ["Part", "bundle_module", "export_one", "export_parts", "export_workers"]

MAX_PARTS = 96  # branches per bundle: bounds the bundle's size (and memory) on large models
MAX_PARAMS = 40_000_000  # float parameters per bundle


@dataclass
class Part:
    """One small model to export: the module, its example inputs, one format per quantizable layer (graph order),
    and the file it goes to."""

    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    formats: list[Pair]
    path: Path

    def __post_init__(self) -> None:
        self.inputs, self.formats = as_input_tuple(self.inputs), list(self.formats)


def export_one(module: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...], fmt: Pair | Sequence[Pair],
               path: Path, hw: HardwareSpec, storage: str = "int8") -> Path:
    """`module` prepared at the target's bits, fixed at `fmt` (one format for every layer, or one per layer in
    graph order) and lowered alone to `path` with `storage` (lower() without its parity judgement)."""
    inputs = as_input_tuple(inputs)
    q = prepare(module, inputs, hardware=hw, bits=hw.weight_bits, act_bits=hw.act_bits)
    single = isinstance(fmt, tuple) and len(fmt) == 2 and not isinstance(fmt[0], tuple)
    fmts = [fmt] * len(q.layer_names) if single else list(fmt)
    apply_policy(q, dict(zip(q.layer_names, fmts, strict=True)), inputs)
    q.eval()
    lower(q, path, inputs, LowerOptions(samples=2, check=False, measure=False, storage=storage))
    return path


def bundle_module(modules: Sequence[nn.Module], arity: Sequence[int]) -> fx.GraphModule:
    """One module whose branch i runs `modules[i]` on its own `arity[i]` inputs; the output stacks each branch's
    mean (the markers export_parts cuts at)."""
    root = nn.Module()
    root.parts = nn.ModuleList(modules)
    g = fx.Graph()
    marks, k = [], 0
    for i, n in enumerate(arity):
        xs = tuple(g.placeholder(f"x{k + j}") for j in range(n))
        k += n
        marks.append(g.call_method("mean", (g.call_module(f"parts.{i}", xs),)))
    g.output(g.call_function(torch.stack, (marks,)))
    return fx.GraphModule(root, g).eval()


def _chunks(parts: Sequence[Part]) -> list[list[Part]]:
    out: list[list[Part]] = [[]]
    params = 0
    for p in parts:
        n = sum(t.numel() for t in p.module.parameters())
        if out[-1] and (len(out[-1]) >= MAX_PARTS or params + n > MAX_PARAMS):
            out.append([])
            params = 0
        out[-1].append(p)
        params += n
    return [c for c in out if c]


def _export_bundle(parts: Sequence[Part], hw: HardwareSpec, storage: str) -> None:
    import onnx
    from onnx.utils import Extractor

    bundle = bundle_module([copy.deepcopy(p.module) for p in parts], [len(p.inputs) for p in parts])
    flat = tuple(t for p in parts for t in p.inputs)
    q = prepare(bundle, flat, hardware=hw, bits=hw.weight_bits, act_bits=hw.act_bits)
    formats = [f for p in parts for f in p.formats]
    apply_policy(q, dict(zip(q.layer_names, formats, strict=True)), flat)
    q.eval()
    propagate_shapes(q.graph_module, flat)  # initialises every quantizer and records the shapes, as lower() does
    passes = lower_passes(None, accuracy_level=hw.matmul_nbits_accuracy_level)
    lowered = run_passes(copy.deepcopy(q.graph_module).eval(), passes).graph_module
    proto = to_onnx(lowered, flat, q.policy, as_storage(storage, "profile: storage"))[0]
    inputs = [i.name for i in proto.graph.input]
    owner = {}  # graph input name -> branch index
    k = 0
    for b, p in enumerate(parts):
        for j in range(len(p.inputs)):
            owner[inputs[k + j]] = b
        k += len(p.inputs)
    producer = {o: n for n in proto.graph.node for o in n.output}

    def branch_of(tensor: str) -> set[int]:
        seen, todo, found = set(), [tensor], set()
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in owner:
                found.add(owner[t])
            elif t in producer:
                todo.extend(producer[t].input)
        return found

    out_of: dict[int, str] = {}
    for n in proto.graph.node:
        if n.op_type == "ReduceMean":
            b = branch_of(n.input[0])
            if len(b) != 1:
                raise FxmpqError(f"profile: a branch marker reads {len(b)} branches' inputs")
            out_of[b.pop()] = n.input[0]
    if len(out_of) != len(parts):
        raise FxmpqError(f"profile: found {len(out_of)} branch outputs in a bundle of {len(parts)}")
    ex = Extractor(proto)
    k = 0
    for b, p in enumerate(parts):
        names = inputs[k:k + len(p.inputs)]
        k += len(p.inputs)
        part = ex.extract_model(names, [out_of[b]])
        part.producer_name = proto.producer_name
        onnx.save_model(part, str(p.path))


def _export_chunk(chunk: Sequence[Part], hw: HardwareSpec, storage: str) -> None:
    try:
        _export_bundle(chunk, hw, storage)
    except Exception:  # whatever failed (ours or the exporter's), one by one: the failing part raises as lower()
        for p in chunk:  # raises for it alone, naming its layer
            export_one(p.module, p.inputs, p.formats, p.path, hw, storage)


def export_workers(chunks: int | None = None) -> int:
    """Processes that export bundles at once: one per CPU this process may run on, at most 4 (each holds a bundle's
    export in memory) and at most one per bundle (`chunks`; None: the cap alone); 1 where fork is unavailable or
    FXMPQ_EXPORT_WORKERS=1 says so. torch.onnx's exporter is single-threaded Python, so on 2 cores two bundles
    export in about the time of one."""
    if not can_fork():
        return 1
    env = os.environ.get("FXMPQ_EXPORT_WORKERS")
    if env is not None and env.strip().isdigit():
        cap = max(1, int(env))
    else:
        cap = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    return cap if chunks is None else max(1, min(cap, chunks))


def can_fork() -> bool:
    """Whether workers can be forked here (Linux; elsewhere fork is unavailable or unsafe with torch)."""
    return sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods()


_JOB: tuple[list[list[Part]], HardwareSpec, str] | None = None  # what forked workers export (copied by fork)


def _export_chunk_at(i: int) -> tuple[type[BaseException], str] | None:
    """In a forked worker: bundle `i` of _JOB; an error comes back as (class, message), so that its class survives."""
    torch.set_num_threads(1)
    chunks, hw, storage = _JOB
    try:
        _export_chunk(chunks[i], hw, storage)
    except FxmpqError as e:
        return type(e), str(e)
    except Exception as e:  # reported in the parent
        return FxmpqError, f"profile: exporting bundle {i} failed: {type(e).__name__}: {e}"
    return None


def export_parts(parts: Sequence[Part], hw: HardwareSpec, storage: str = "int8", progress: object = None,
                 workers: int | None = None) -> None:
    """Write every part's ONNX file (prepared at the target's bits, fixed at its formats, lowered with `storage`),
    a bundle of them per torch.onnx export; a bundle that fails is exported part by part with lower(), whose error
    names the layer. Bundles export in `workers` forked processes at once (default `export_workers`); the files are
    the same either way. `progress` (a tqdm bar) advances by one per part written."""
    global _JOB
    chunks = _chunks(parts)
    n = export_workers(len(chunks)) if workers is None else max(1, min(workers, len(chunks)))
    if n == 1 or not can_fork():
        for chunk in chunks:
            _export_chunk(chunk, hw, storage)
            if progress is not None:
                progress.update(len(chunk))
        return
    _JOB = (chunks, hw, storage)
    try:
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = {pool.submit(_export_chunk_at, i): i for i in range(len(chunks))}
            for f in as_completed(futures):
                try:
                    err = f.result()
                except BrokenProcessPool:
                    raise FxmpqError("profile: an export worker process died (out of memory?); "
                                     "FXMPQ_EXPORT_WORKERS=1 exports in this process alone") from None
                if err is not None:
                    for other in futures:
                        other.cancel()
                    cls, msg = err
                    raise cls(msg)
                if progress is not None:
                    progress.update(len(chunks[futures[f]]))
    finally:
        _JOB = None
