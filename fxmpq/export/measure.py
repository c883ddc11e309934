"""Timing ONNX models in ONNX Runtime (CPU): fixed threads, medians of interleaved repeats, per-node profiles.

One thread (intra_op_num_threads = 1) runs the whole graph on the calling thread, so that thread's CPU time
(`time.thread_time`) is the model's latency on a core it has to itself, whatever else the machine runs; the wall
clock also counts the time other processes hold the core. `Clock.THREAD_CPU` is therefore the default at one
thread, `Clock.WALL` at more (the worker threads' time is not the caller's). Both are always recorded.
"""

from __future__ import annotations

import enum
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..core.cpuinfo import cpu_info
from ..errors import ArgumentError

__all__ = ["Clock", "NodeTime", "Timing", "TimingOptions", "cpu_name", "profile_nodes", "runtime_name", "session",
           "time_sessions"]

K = TypeVar("K", bound=Hashable)


class Clock(enum.StrEnum):
    """What a latency sample measures."""

    THREAD_CPU = "thread_cpu"  # CPU time of the calling thread (exact latency at one thread, immune to load)
    WALL = "wall"  # wall-clock time around InferenceSession.run


@dataclass(frozen=True)
class TimingOptions:
    """How to time: threads, repeats after warm-up, clock (None: thread CPU time at one thread, else wall)."""

    threads: int = 1
    repeats: int = 20
    warmup: int = 3
    clock: Clock | None = None

    def __post_init__(self) -> None:
        for k in ("threads", "repeats"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ArgumentError(f"{k} must be a positive integer, found {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ArgumentError(f"warmup must be a non-negative integer, found {self.warmup!r}")
        if self.clock is not None:
            clock = Clock(self.clock)
            if clock is Clock.THREAD_CPU and self.threads != 1:
                raise ArgumentError(f"the thread CPU clock measures latency only at one thread, not {self.threads}: "
                                    f"use the wall clock")
            object.__setattr__(self, "clock", clock)

    @property
    def resolved_clock(self) -> Clock:
        """The clock in use."""
        if self.clock is not None:
            return self.clock
        return Clock.THREAD_CPU if self.threads == 1 else Clock.WALL


@dataclass(frozen=True)
class Timing:
    """The samples of one model (milliseconds, both clocks) and the clock that counts."""

    cpu_ms: tuple[float, ...]
    wall_ms: tuple[float, ...]
    clock: Clock

    @property
    def samples(self) -> tuple[float, ...]:
        """The samples of the clock in use."""
        return self.cpu_ms if self.clock is Clock.THREAD_CPU else self.wall_ms

    @property
    def median_ms(self) -> float:
        """The median of the samples of the clock in use."""
        return float(statistics.median(self.samples))

    @property
    def wall_median_ms(self) -> float:
        """The median wall-clock time."""
        return float(statistics.median(self.wall_ms))


def session(model: str | Path | bytes, threads: int = 1, *, profile_prefix: str | None = None,
            optimized_path: str | Path | None = None) -> Any:
    """An ONNX Runtime CPU session with `threads` intra-op threads, one inter-op thread, sequential execution and
    every graph optimization (the defaults a deployment gets), optionally profiling or writing its optimized graph."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def time_sessions(runs: Mapping[K, tuple[Any, Mapping[str, np.ndarray]]], options: TimingOptions = TimingOptions(),
                  *, progress: Any = None, warm_inputs: bool = False) -> dict[K, Timing]:
    """Time every (session, feed) of `runs`: `warmup` runs each, then `repeats` rounds that run each once in turn.

    Interleaving spreads a slow spell of the machine over all of them instead of one (and leaves each model's
    weights as cold as the rest of a large model leaves them). With `warm_inputs`, each input is written right
    before its run (not timed), so it is in cache as a tensor just produced by the op before would be: how a layer
    profiled alone sees its input inside the whole model. `progress` (a tqdm bar, optional) advances per round.
    """
    clock = options.resolved_clock
    feeds = {k: {n: np.array(v, copy=True) for n, v in feed.items()} for k, (_, feed) in runs.items()}
    for key, (sess, _) in runs.items():
        for _ in range(options.warmup):
            sess.run(None, feeds[key])
    cpu: dict[K, list[float]] = defaultdict(list)
    wall: dict[K, list[float]] = defaultdict(list)
    for _ in range(options.repeats):
        for key, (sess, feed) in runs.items():
            f = feeds[key]
            if warm_inputs:
                for n, v in feed.items():
                    np.copyto(f[n], v)
            w0, c0 = time.perf_counter(), time.thread_time()
            sess.run(None, f)
            c1, w1 = time.thread_time(), time.perf_counter()
            cpu[key].append((c1 - c0) * 1e3)
            wall[key].append((w1 - w0) * 1e3)
        if progress is not None:
            progress.update(1)
    return {k: Timing(tuple(cpu[k]), tuple(wall[k]), clock) for k in runs}


@dataclass(frozen=True)
class NodeTime:
    """One node of ONNX Runtime's optimized graph: its op, inputs, outputs and median kernel time per run."""

    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    median_ms: float


def profile_nodes(model: str | Path | bytes, feed: Mapping[str, np.ndarray], threads: int = 1, *, runs: int = 10,
                  warmup: int = 3) -> list[NodeTime]:
    """Every node ONNX Runtime ran (its optimized graph, in order) with its median kernel time over `runs` runs.

    From ORT's profiler (SessionOptions.enable_profiling, the JSON trace's "Node" events); the optimized graph,
    written by the same session, gives each node's inputs (how `fxmpq.lower` maps nodes back to layers).
    """
    import onnx

    with tempfile.TemporaryDirectory() as d:
        opt = Path(d) / "optimized.onnx"
        sess = session(model, threads, profile_prefix=str(Path(d) / "profile"), optimized_path=opt)
        for _ in range(warmup + runs):
            sess.run(None, dict(feed))
        trace = sess.end_profiling()
        try:
            events = json.loads(Path(trace).read_text())
        finally:
            if os.path.exists(trace):
                os.remove(trace)
        graph = onnx.load(str(opt), load_external_data=False).graph
    durations: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            durations[e["name"][: -len("_kernel_time")]].append(float(e["dur"]) / 1e3)
    out = []
    for n in graph.node:
        ds = durations.get(n.name, [])[-runs:]
        out.append(NodeTime(n.name, n.op_type, tuple(n.input), tuple(n.output),
                            float(statistics.median(ds)) if ds else 0.0))
    return out


def runtime_name() -> str:
    """"onnxruntime 1.32.0 (CPUExecutionProvider)"."""
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__} (CPUExecutionProvider)"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo, read once by fxmpq.core.cpuinfo), or the platform's string elsewhere."""
    return cpu_info().name

