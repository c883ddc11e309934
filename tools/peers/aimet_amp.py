"""AIMET's mixed-precision search (AMP) as a peer for tools/bench_peers.py: run inside AIMET's own venv,

    /work/venvs/aimet/bin/python tools/peers/aimet_amp.py JOB.json     (venv: tools/peers/make_env.sh aimet DIR)

it does what a new AIMET 2.x user does with the FP32 model of the job, then turns AIMET's choice into an fxmpq
Policy priced by fxmpq, so that both tools are measured with one ruler.

What it runs (aimet-torch 2.42): `prepare_model` -> `fold_all_batch_norms` -> `QuantizationSimModel` (W8A8
defaults, `compute_encodings` on the first `calib_samples` validation images) -> `choose_mixed_precision` with
phase 1 = AIMET's SQNR callback (`EvalCallbackFactory(...).sqnr()`) and phase 2 = top-1 on the first
`phase2_samples` (1000) validation images, `allowed_accuracy_drop=None` and `AMPSearchAlgo.BruteForce`, so that
phase 2 evaluates every point of the greedy order. Candidates are AIMET tuples ((act bits, int), (param bits, int)):
(b, b) for every b of `bits` under a BitOps (or any non-size) budget, (8, b) under a size budget.
AIMET's own stopping rule is accuracy, not cost, and its relative BitOps is wrong where a conv and its ReLU share
one quantizer, so the budget is applied here: starting from AIMET's baseline candidate on every group (8/8
unless another uniform candidate scored higher in phase 2), the greedy order is walked one step at a time and the
first point whose cost measured by fxmpq (`Analysis.cost`) is <= `budget.limit` is taken; when none is, the
cheapest point is taken and `fits` is false. The whole validation slice is the only data the callbacks see.

A model that calls F.scaled_dot_product_attention (small_vit) is given to AIMET with that call written out as
softmax(q @ k^T * scale) @ v (`attention_written_out`): aimet-torch 2.42 has no quantized definition of the op and
stops otherwise. fxmpq's attention-matmul layers then have no AIMET module of their name (kept at 8/8), nor do the
projections' inputs (AIMET quantizes the matmul's output before the transpose): the walk may not reach a tight
BitOps budget, and the cheapest point is kept (`fits` false).

Mapping AIMET's quantizer groups onto fxmpq layers (names: `fxmpq.analyze(model, x, hardware=...).layers`):
  * weight bits: the group holding the layer's weight quantizer. prepare_model keeps module qualnames, so an
    fxmpq conv/linear named "features.0.2.0" is the sim's module "features.0.2.0" (weight shape checked).
  * activation bits: the bits of the quantizer object that produced the tensor the layer reads, found by running
    the sim once with hooks (that quantizer's output storage is the layer's input storage, views such as flatten
    included), or the layer's own input quantizer (the first conv). AIMET's groups put a tensor's quantizer and
    the weights of all its consumers in one group, so w and a usually come from one group, but see the next point.
  * a quantizer object can sit in two groups: the sim ties a depthwise conv's output quantizer to the following
    nn.ReLU's (one object, its range taken from the pre-ReLU tensor; seen in small_mobilenet, not for the ReLU6
    of mobilenet_v2_small, where both tensors get quantizers of their own), and find_quantizer_group makes an
    activation-only group of the conv's name and puts the ReLU's name in the next layer's weight group. AIMET then
    leaves that object at the bits of whichever group its greedy order changed last, which the walk follows per
    object (and checks at the chosen point by replaying AIMET's own setters on the sim: `walk_model_checked`).
    So a layer's w and a can differ, and AIMET's relative BitOps (`peer_cost`) is off for such points.
Caveats:
  * Phase 1 scores that tied quantizer only with the activation-only group (AIMET disables the groups in order
    and re-enables per group only what was still enabled; the shared object is already off when the weight
    group's turn comes), so the weight group's phase-1 score does not depend on the activation bits at all. The
    sensitivity table reports AIMET's scores as they are; `sensitivity_input` gives, for those layers, the
    activation-only group's score per activation bits.
  * Layers that read one tensor (a block input feeding a conv and a residual add; two convs on one tensor) share
    one group: AIMET cannot give them different bits, and their phase-1 scores are one score.
  * AIMET quantizes tensors an fxmpq Policy has no entry for (activation-only groups): a depthwise conv's output
    before its ReLU6, a projection conv's output before the residual add, the features before pooling, the logits.
    AIMET lowers them in its greedy order (they change AIMET's accuracy, not the fxmpq cost) and the policy leaves
    them to fxmpq's defaults. Steps that only touch such groups count in `steps` but do not change the policy.
  * AIMET's baseline is the uniform candidate with the best phase-2 score, not necessarily the widest; the walk
    starts from it as AIMET's phase 2 does (`baseline`), and phase 1 then also scores raising a group above it.
  * Layers pinned by the hardware file keep their pins (Policy.complete); AIMET searches them anyway.
  * Only the bit-widths transfer: AIMET's encodings (min-max, per-channel symmetric weights, asymmetric
    activations, BN folded) are not fxmpq's LSQ steps.
  * The sensitivity table gives, per fxmpq layer, AIMET's phase-1 score (its SQNR callback: dB of the model
    output with ONLY that group quantized, the rest in float; AIMET divides by the sample count, not the batch
    count, so every score is offset by -10 log10(64) dB, 64 being the batch size here) of the layer's weight
    group at candidate (w, a), under "w,a"; the baseline candidate is not scored. `sensitivity_pairs` runs one more phase 1 (AIMET's own routine,
    the private `_create_and_save_accuracy_list` of its GreedyMixedPrecisionAlgo) on those candidates with a
    16/16 sentinel baseline so that (8, 8) is scored too, timed as `sensitivity_s`.

JOB keys: net, net_kwargs, fp32, data ("fashion-mnist" | "digits"), data_dir, val [start, stop], calib_samples,
hardware, bits, budget {metric, limit}, sensitivity_pairs ([[w, a], ...] or null), seed, out; optional
phase1_samples (256), phase2_samples (1000), threads (torch threads; unset: torch's default).
Writes out/policy.json (complete fxmpq Policy), out/peer.json and AIMET's own files under out/aimet/ (and
out/aimet_sensitivity/). Besides the keys bench_peers.py reads, peer.json holds: metric, peer_val_top1 (AIMET's
phase-2 top-1 at the chosen point; null at step 0), sensitivity_input, timings (sim, AMP call, AIMET's phase 1 and
phase 2), baseline, walk_model_checked, groups (AIMET's, as to_list()), mapping (layer -> groups) and walk (fxmpq
cost, AIMET's relative BitOps and top-1 at every point walked).
Exit status 2 with one error line for a bad job file or a missing peer package.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

PEER = "aimet"
SENTINEL_BITS = 16  # baseline of the sensitivity run: not a candidate, so every requested pair is scored


def fail(msg: str) -> None:
    print(f"aimet_amp: error: {msg}", file=sys.stderr)
    sys.exit(2)


def say(msg: str) -> None:
    print(f"aimet_amp: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ the job
def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_job(path: str) -> dict[str, Any]:
    """The job file as a dict with defaults filled in; exits 2 with one line on anything wrong."""
    try:
        job = json.loads(Path(path).read_text())
    except OSError as e:
        fail(f"cannot read job file {path}: {e.strerror or e}")
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        fail(f"job file {path} is not valid JSON ({e})")
    if not isinstance(job, dict):
        fail(f"job file {path}: expected a JSON object")
    required = ("net", "fp32", "data", "val", "calib_samples", "hardware", "bits", "budget", "out")
    missing = [k for k in required if k not in job]
    if missing:
        fail(f"job file {path}: missing key(s) {', '.join(missing)}")
    job = {"net_kwargs": {}, "data_dir": None, "sensitivity_pairs": None, "seed": 0, "phase1_samples": 256,
           "phase2_samples": 1000, "threads": None, **job}
    problems = []
    if not isinstance(job["net"], str) or not job["net"]:
        problems.append("net must be a model name")
    if not isinstance(job["net_kwargs"], dict):
        problems.append("net_kwargs must be an object")
    if not isinstance(job["fp32"], str) or not Path(job["fp32"]).is_file():
        problems.append(f"fp32 {job['fp32']!r} is not a file")
    if job["data"] not in ("fashion-mnist", "digits"):
        problems.append(f"data must be 'fashion-mnist' or 'digits', found {job['data']!r}")
    if job["data_dir"] is not None and not isinstance(job["data_dir"], str):
        problems.append("data_dir must be a path or null")
    v = job["val"]
    if not (isinstance(v, list) and len(v) == 2 and all(_int(x) for x in v) and 0 <= v[0] < v[1]):
        problems.append(f"val must be [start, stop] with 0 <= start < stop, found {v!r}")
    for k in ("calib_samples", "phase1_samples", "phase2_samples"):
        if not _int(job[k]) or job[k] <= 0:
            problems.append(f"{k} must be a positive integer")
    if job["threads"] is not None and (not _int(job["threads"]) or job["threads"] <= 0):
        problems.append("threads must be a positive integer or null")
    if not isinstance(job["hardware"], str):
        problems.append("hardware must be a path or a built-in hardware name")
    b = job["bits"]
    if not (isinstance(b, list) and b and all(_int(x) and 2 <= x <= 16 for x in b)):
        problems.append(f"bits must be a non-empty list of integers in 2..16, found {b!r}")
    bud = job["budget"]
    if not (isinstance(bud, dict) and isinstance(bud.get("metric"), str) and isinstance(bud.get("limit"), (int, float))
            and not isinstance(bud.get("limit"), bool) and math.isfinite(bud["limit"]) and bud["limit"] > 0):
        problems.append(f"budget must be {{\"metric\": name, \"limit\": positive number}}, found {bud!r}")
    sp = job["sensitivity_pairs"]
    if sp is not None and not (isinstance(sp, list) and all(
            isinstance(p, list) and len(p) == 2 and all(_int(x) and 2 <= x <= 16 for x in p) for p in sp)):
        problems.append("sensitivity_pairs must be null or a list of [w_bits, a_bits] integer pairs")
    if not _int(job["seed"]):
        problems.append("seed must be an integer")
    if not isinstance(job["out"], str) or not job["out"]:
        problems.append("out must be a folder path")
    if problems:
        fail(f"job file {path}: " + "; ".join(problems))
    job["bits"] = sorted(set(job["bits"]), reverse=True)
    return job


def import_peer() -> dict[str, Any]:
    """AIMET's modules this adapter uses; exits 2 when aimet-torch is not importable here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import aimet_torch
            from aimet_torch.amp.mixed_precision_algo import EvalCallbackFactory, GreedyMixedPrecisionAlgo
            from aimet_torch.amp.quantizer_groups import find_quantizer_group
            from aimet_torch.amp.utils import _mock_v1_quantizers
            from aimet_torch.batch_norm_fold import fold_all_batch_norms
            from aimet_torch.common.amp.utils import AMPSearchAlgo
            from aimet_torch.common.defs import CallbackFunc, QuantizationDataType
            from aimet_torch.common.utils import AimetLogger
            from aimet_torch.mixed_precision import choose_mixed_precision
            from aimet_torch.model_preparer import prepare_model
            from aimet_torch.quantsim import QuantizationSimModel
    except ImportError as e:
        fail(f"aimet-torch is not importable with {sys.executable} ({e}); run this script with the python of "
             f"AIMET's venv (tools/peers/make_env.sh aimet VENV)")
    try:
        from importlib.metadata import version
        ver = version("aimet-torch")
    except Exception:  # a source checkout without metadata
        ver = getattr(aimet_torch, "__version__", "unknown")
    AimetLogger.set_level_for_all_areas(logging.WARNING)
    return {"ver": ver, "EvalCallbackFactory": EvalCallbackFactory, "GreedyMixedPrecisionAlgo": GreedyMixedPrecisionAlgo,
            "find_quantizer_group": find_quantizer_group, "_mock_v1_quantizers": _mock_v1_quantizers,
            "fold_all_batch_norms": fold_all_batch_norms, "AMPSearchAlgo": AMPSearchAlgo, "CallbackFunc": CallbackFunc,
            "QuantizationDataType": QuantizationDataType, "choose_mixed_precision": choose_mixed_precision,
            "prepare_model": prepare_model, "QuantizationSimModel": QuantizationSimModel}


# ------------------------------------------------------------------------------------------------ AIMET
def attention_written_out(model: Any, dummy: Any) -> tuple[Any, int]:
    """`model` with every F.scaled_dot_product_attention call written out as softmax(q @ k^T * scale) @ v (the
    same function; fxmpq's own capture does the same rewrite), and how many; `model` itself when it has none.

    aimet-torch 2.42 has no quantized definition of scaled_dot_product_attention: its QuantizationSimModel stops
    and asks the user to register one (`@QuantizationMixin.implements(ScaledDotProductAttention)`). Written out,
    the attention is two matmuls and a softmax, which AIMET quantizes (its MatMul and Softmax modules). Module
    qualnames are kept, so the layers map onto fxmpq's as before; AIMET's matmul modules have no fxmpq name, so
    fxmpq's attention-matmul layers stay at 8/8 in the mapped policy (a note says so)."""
    import torch
    import torch.fx as fx
    from torch.fx.passes.shape_prop import ShapeProp

    from fxmpq.capture.attention import decompose_sdpa

    try:
        gm = fx.symbolic_trace(copy.deepcopy(model).eval())
        ShapeProp(gm).propagate(dummy)
    except Exception:  # not traceable by plain fx: AIMET's own preparation will say what it makes of it
        return model, 0
    n = decompose_sdpa(gm)
    if not n:
        return model, 0
    for node in gm.graph.nodes:  # AIMET makes an nn.Softmax of a functional softmax: its dim must be a keyword
        if node.op == "call_function" and node.target is torch.softmax and len(node.args) == 2:
            node.target, node.args, node.kwargs = torch.nn.functional.softmax, node.args[:1], {"dim": node.args[1]}
    gm.recompile()
    return gm, n


def build_sim(aimet: dict[str, Any], model: Any, dummy: Any, calib_fn: Any, calib: Any) -> Any:
    """prepare_model -> fold_all_batch_norms -> QuantizationSimModel (W8A8) -> compute_encodings."""
    prepared = aimet["prepare_model"](copy.deepcopy(model).eval())  # fx shares modules: never touch the user's
    aimet["fold_all_batch_norms"](prepared, None, dummy_input=dummy)
    sim = aimet["QuantizationSimModel"](prepared, dummy, default_output_bw=8, default_param_bw=8)
    sim.compute_encodings(calib_fn, calib)
    return sim


def quantizer_groups(aimet: dict[str, Any], sim: Any) -> list[Any]:
    with aimet["_mock_v1_quantizers"](sim):
        _, groups = aimet["find_quantizer_group"](sim)
    return list(groups)


def activation_quantizers(sim: Any) -> dict[str, list[Any]]:
    """AIMET's activation-quantizer names (the module name for its output quantizers,
    "<module>_input_quantizer_idx_<i>" for an input quantizer) -> the quantizer objects behind them. One object
    can sit behind two names: the sim ties a depthwise conv's output quantizer to its ReLU's."""
    names: dict[str, list[Any]] = {}
    for name, qm in sim.named_qmodules():
        outs = [q for q in qm.output_quantizers if q is not None]
        if outs:
            names[name] = outs
        for i, q in enumerate(qm.input_quantizers):
            if q is not None:
                names[f"{name}_input_quantizer_idx_{i}"] = [q]
    return names


def input_quantizers(sim: Any, names: list[str], dummy: Any) -> dict[str, Any]:
    """Sim module name -> the activation-quantizer object whose output that module reads (found by one forward
    pass with hooks: the quantizer's output storage is the module's input storage, views included; the module's
    own input quantizer when it has one), or None when no quantizer produced that tensor."""
    import torch

    qmodules = dict(sim.named_qmodules())
    produced: dict[int, Any] = {}
    keep: list[Any] = []  # outputs stay alive, so no storage is reused during the pass
    seen: dict[str, Any] = {}
    handles = []

    def ptr(t: Any) -> int | None:
        return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None

    def on_output(q: Any, _args: Any, out: Any) -> None:
        keep.append(out)
        produced[ptr(out)] = q

    for qs in activation_quantizers(sim).values():
        for q in qs:
            handles.append(q.register_forward_hook(on_output))
    for name in names:
        qm = qmodules[name]

        def pre(_mod: Any, args: Any, name: str = name, qm: Any = qm) -> None:
            own = qm.input_quantizers[0] if len(qm.input_quantizers) else None
            seen[name] = own if own is not None else produced.get(ptr(args[0]))
        handles.append(qm.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            sim.model.eval()
            sim.model(dummy)
    finally:
        for h in handles:
            h.remove()
    return {n: seen.get(n) for n in names}


class Layout:
    """AIMET's quantizer groups laid over the sim's quantizer objects and the fxmpq layers.

    A group sets the bits of its activation quantizers and weight quantizers. Groups can share a quantizer object
    (the sim ties a depthwise conv's output quantizer to its ReLU's, and AIMET puts the two names in two groups):
    AIMET then sets that object from whichever group it changed last, which `State` follows. Its phase 1 scores
    the object only with the first group holding it (AIMET disables the groups in order and collects each one's
    still-enabled quantizers, so the later group never re-enables the shared one)."""

    def __init__(self, sim: Any, groups: list[Any], analysis: Any, dummy: Any):
        self.groups = groups
        qmodules = dict(sim.named_qmodules())
        self.notes: list[str] = []
        self.tied: list[str] = []  # layers whose input quantizer object sits in two or more groups
        names = []
        for m in analysis.layers:
            qm = qmodules.get(m.name)
            w = getattr(qm, "weight", None)
            if qm is None or w is None or tuple(w.shape) != tuple(m.weight_shape):
                self.notes.append(f"fxmpq layer {m.name} has no AIMET module of that name and weight shape "
                                  f"(kept at 8/8)")
                continue
            names.append(m.name)
        by_name = activation_quantizers(sim)
        key: dict[int, int] = {}  # id(quantizer object) -> a small key
        self.act_name: dict[int, str] = {}
        for qname, qs in by_name.items():
            for q in qs:
                k = key.setdefault(id(q), len(key))
                self.act_name.setdefault(k, qname)
        self.group_act: list[list[int]] = []
        self.w_group: dict[str, int] = {}
        for i, g in enumerate(groups):
            acts = [key[id(q)] for qn in (*g.input_quantizers, *g.output_quantizers) for q in by_name.get(qn, [])]
            self.group_act.append(sorted(set(acts)))
            for n in g.parameter_quantizers:
                self.w_group[n] = i
        owners: dict[int, list[int]] = {}
        for i, acts in enumerate(self.group_act):
            for k in acts:
                owners.setdefault(k, []).append(i)
        self.shared = {k: v for k, v in owners.items() if len(v) > 1}
        feeds = input_quantizers(sim, names, dummy)
        self.mapping: dict[str, dict[str, Any]] = {}
        for n in names:
            q = feeds[n]
            k = key.get(id(q)) if q is not None else None
            a_groups = owners.get(k, []) if k is not None else []
            e = {"w_group": self.w_group.get(n), "a_quantizer": self.act_name.get(k) if k is not None else None,
                 "a_key": k, "a_groups": a_groups, "phase1_a_group": a_groups[0] if a_groups else None}
            e["phase1_sees_a"] = e["phase1_a_group"] is not None and e["phase1_a_group"] == e["w_group"]
            if e["w_group"] is None:
                self.notes.append(f"{n}: AIMET does not quantize its weight (kept at 8 bits)")
            if k is None:
                self.notes.append(f"{n}: no AIMET quantizer produces its input; its activation is kept at 8 bits")
            elif len(a_groups) > 1:
                self.tied.append(n)
            elif a_groups and a_groups[0] != e["w_group"]:
                self.notes.append(f"{n}: weight and input activation are in different AIMET groups")
            self.mapping[n] = e

    def check(self, sim: Any, state: State) -> list[str]:
        """Where the sim's quantizers disagree with `state` (each mapped layer's weight and input bits)."""
        qmodules = dict(sim.named_qmodules())
        by_name = activation_quantizers(sim)
        wrong = []
        for n, e in self.mapping.items():
            wq = qmodules[n].param_quantizers["weight"]
            if e["w_group"] is not None and wq is not None and wq.bitwidth != state.w[e["w_group"]]:
                wrong.append(f"{n} weight {wq.bitwidth} bits in the sim, {state.w[e['w_group']]} in the walk")
            if e["a_key"] is not None:
                aq = by_name[e["a_quantizer"]][0]
                if aq.bitwidth != state.act[e["a_key"]]:
                    wrong.append(f"{n} input {aq.bitwidth} bits in the sim, {state.act[e['a_key']]} in the walk")
        return wrong

    def start(self, a_bits: int, w_bits: int | None) -> State:
        return State({k: a_bits for k in self.act_name}, [w_bits] * len(self.groups))


class State:
    """Bits of every AIMET activation-quantizer object and every group's weights at one point of the walk."""

    def __init__(self, act: dict[int, int], w: list[int | None]):
        self.act, self.w = act, w

    def apply(self, layout: Layout, group: int, a_bits: int, w_bits: int | None) -> None:
        for k in layout.group_act[group]:
            self.act[k] = a_bits
        if w_bits is not None:
            self.w[group] = w_bits

    def policy(self, layout: Layout, analysis: Any, fxmpq: Any) -> Any:
        """The fxmpq Policy at this point; pinned layers at their pins, unmapped parts at 8 bits."""
        bits = {}
        for m in analysis.layers:
            if not m.searchable:
                continue
            e = layout.mapping.get(m.name)
            w = self.w[e["w_group"]] if e and e["w_group"] is not None else None
            a = self.act[e["a_key"]] if e and e["a_key"] is not None else None
            bits[m.name] = (8 if w is None else w, 8 if a is None else a)
        return fxmpq.Policy(bits).complete(analysis)


@contextlib.contextmanager
def phase1_list(algo_cls: Any) -> Any:
    """AIMET's phase-1 list as its algorithm returns it, kept in memory.

    AIMET also caches that list as a pickle under results_dir; the adapter never reads it (no unpickling).
    """
    lists: list[list] = []
    original = algo_cls._create_and_save_accuracy_list

    def capture(self: Any, baseline_candidate: Any) -> Any:
        out = original(self, baseline_candidate)
        lists.append(list(out))
        return out

    algo_cls._create_and_save_accuracy_list = capture
    try:
        yield lists
    finally:
        algo_cls._create_and_save_accuracy_list = original


def bits_of(candidate: tuple) -> tuple[int, int | None]:
    """(activation bits, parameter bits or None) of an AIMET candidate."""
    if len(candidate) == 1:
        return int(candidate[0][0]), None
    return int(candidate[0][0]), int(candidate[1][0])


def sensitivity_table(accuracy_list: list, layout: Layout) -> dict[str, dict[str, float]]:
    """fxmpq layer -> {"w,a": AIMET's phase-1 score of the layer's weight group at candidate (w, a)}."""
    index = {g: i for i, g in enumerate(layout.groups)}
    table: dict[str, dict[str, float]] = {}
    for group, cand, score, _ in accuracy_list:
        a, w = bits_of(cand)
        if w is None or group not in index:
            continue
        for name, e in layout.mapping.items():
            if e["w_group"] == index[group]:
                table.setdefault(name, {})[f"{w},{a}"] = float(score)
    return table


def input_sensitivity(accuracy_list: list, layout: Layout) -> dict[str, dict[str, float]]:
    """For each fxmpq layer whose input quantizer AIMET's phase 1 scored with another group than its weight (an
    activation-only group): {"a": that group's phase-1 score at activation bits a} (its weight bits are moot)."""
    index = {g: i for i, g in enumerate(layout.groups)}
    table: dict[str, dict[str, float]] = {}
    for group, cand, score, _ in accuracy_list:
        a, _w = bits_of(cand)
        for name, e in layout.mapping.items():
            if not e["phase1_sees_a"] and e["phase1_a_group"] is not None and e["phase1_a_group"] == index.get(group):
                table.setdefault(name, {}).setdefault(str(a), float(score))
    return table


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> int:
    if len(argv) != 2:
        fail("usage: aimet_amp.py JOB.json")
    job = read_job(argv[1])
    aimet = import_peer()
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    try:
        import fxmpq
        import fxmpq.core.datasets
        import fxmpq.models
    except ImportError as e:
        fail(f"fxmpq is not importable with {sys.executable} ({e}); install it in this venv: pip install -e REPO")

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    np.random.seed(job["seed"] % 2**32)
    warnings.filterwarnings("ignore", module=r"aimet_torch(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning)
    out = Path(job["out"])
    metric, limit = job["budget"]["metric"], float(job["budget"]["limit"])

    # ---- the job's model, data and hardware (fxmpq's side; not timed)
    try:
        model = fxmpq.models.build_model(job["net"], job["net_kwargs"]).eval()
        try:
            model.load_state_dict(torch.load(job["fp32"], weights_only=True, map_location="cpu"))
        except Exception as e:  # a file that is no state dict of this net
            fail(f"fp32 {job['fp32']}: cannot load into {job['net']} ({type(e).__name__}: {str(e).splitlines()[0]})")
        data = (fxmpq.core.datasets.load_digits() if job["data"] == "digits"
                else fxmpq.core.datasets.load_fashion_mnist(job["data_dir"]))
        hw = fxmpq.load_hardware(job["hardware"])
    except fxmpq.FxmpqError as e:
        fail(str(e).splitlines()[0])
    v0, v1 = job["val"]
    if v1 > len(data.train_x):
        fail(f"val {job['val']} runs past the {len(data.train_x)} training images of {job['data']}")
    val_x, val_y = data.train_x[v0:v1], data.train_y[v0:v1]
    calib = val_x[: job["calib_samples"]]
    dummy = val_x[:1].clone()
    if metric not in hw.metrics:
        fail(f"budget metric {metric!r} is not a metric of hardware {hw.name!r} ({', '.join(hw.metrics)})")
    size_budget = metric == "size"
    pairs = [(b, 8) if size_budget else (b, b) for b in job["bits"]]  # fxmpq (w, a)
    bad = [f"W{w}A{a}" for w, a in pairs if not hw.supports(w, a)]
    if bad:
        fail(f"hardware {hw.name!r} does not run candidate(s) {', '.join(bad)}")
    try:
        analysis = fxmpq.analyze(model, dummy, hardware=hw)
    except fxmpq.FxmpqError as e:
        fail(str(e).splitlines()[0])
    out.mkdir(parents=True, exist_ok=True)
    results_dir = out / "aimet"

    # ---- callbacks: calibration, phase 1 (SQNR), phase 2 (top-1); validation split only
    CallbackFunc, Int = aimet["CallbackFunc"], aimet["QuantizationDataType"].int

    def calib_fn(m: Any, images: Any) -> None:
        with torch.no_grad():
            for i in range(0, len(images), 128):
                m(images[i: i + 128])

    p2_x, p2_y = val_x[: job["phase2_samples"]], val_y[: job["phase2_samples"]]

    def top1(m: Any, _args: Any) -> float:
        m.eval()
        with torch.no_grad():
            hits = sum(int((m(p2_x[i: i + 250]).argmax(1) == p2_y[i: i + 250]).sum()) for i in range(0, len(p2_x), 250))
        return hits / len(p2_x)

    def phase1_callback() -> Any:
        loader = DataLoader(TensorDataset(val_x[: job["phase1_samples"]]), batch_size=64, shuffle=False)
        factory = aimet["EvalCallbackFactory"](loader, forward_fn=lambda m, batch: m(batch[0]))
        return factory.sqnr(num_samples=min(job["phase1_samples"], len(val_x)))

    def candidates_of(wa_pairs: list[tuple[int, int]]) -> list[tuple]:
        return [((a, Int), (w, Int)) for w, a in wa_pairs]

    # ---- AIMET's search (timed as search_s)
    say(f"{job['net']} on {job['data']}: {len(analysis.layers)} fxmpq layers, candidates "
        f"{', '.join(f'W{w}A{a}' for w, a in pairs)}, budget {metric} <= {limit:.6g}")
    t0 = time.perf_counter()
    model, written_out = attention_written_out(model, dummy)
    if written_out:
        say(f"{written_out} scaled_dot_product_attention calls written out as matmul-softmax-matmul for AIMET "
            f"(it has no quantized definition of that op)")
    sim = build_sim(aimet, model, dummy, calib_fn, calib)
    groups = quantizer_groups(aimet, sim)
    layout = Layout(sim, groups, analysis, dummy)
    t_sim = time.perf_counter() - t0
    say(f"sim ready in {t_sim:.1f} s: {len(groups)} AIMET quantizer groups")
    candidates = candidates_of(pairs)
    t1 = time.perf_counter()
    with phase1_list(aimet["GreedyMixedPrecisionAlgo"]) as lists:
        pareto = aimet["choose_mixed_precision"](
            sim, dummy, candidates, phase1_callback(), CallbackFunc(top1, None), allowed_accuracy_drop=None,
            results_dir=str(results_dir), clean_start=True, forward_pass_callback=CallbackFunc(calib_fn, calib),
            amp_search_algo=aimet["AMPSearchAlgo"].BruteForce)
    t_amp = time.perf_counter() - t1
    if len(lists) != 1:
        raise RuntimeError(f"AIMET built its phase-1 list {len(lists)} times in one search (expected once)")
    accuracy_list = lists[0]  # (group, candidate, score, bitops), in AIMET's greedy order
    amp_info = {}
    info_path = results_dir / "amp_info_list.json"
    if info_path.is_file():
        amp_info = {k: v for k, v in json.loads(info_path.read_text())}
    pareto = pareto or []
    if len(pareto) != len(accuracy_list) or any(
            (p[2], p[3]) != (g, c) for p, (g, c, _, _) in zip(pareto, accuracy_list)):
        raise RuntimeError(f"AIMET's phase 2 list ({len(pareto)} points) is not its phase-1 greedy order "
                           f"({len(accuracy_list)} points) scored in full, as BruteForce with "
                           f"allowed_accuracy_drop=None should give")

    # the baseline: the one candidate phase 1 never scored (AIMET skips its own baseline)
    scored = {c for _, c, _, _ in accuracy_list}
    missing = [c for c in candidates if c not in scored]
    baseline = missing[0] if len(missing) == 1 else candidates[0]
    base_a, base_w = bits_of(baseline)
    index = {g: i for i, g in enumerate(groups)}
    state = layout.start(base_a, base_w)

    def point(step: int) -> dict[str, Any]:
        pol = state.policy(layout, analysis, fxmpq)
        cost = analysis.cost(pol)
        rel, acc = (1.0, None) if step == 0 else (float(pareto[step - 1][0]), float(pareto[step - 1][1]))
        return {"step": step, "policy": pol, "cost": cost, "peer_rel_bitops": rel, "peer_val_top1": acc}

    walk = [point(0)]
    chosen = walk[0] if walk[0]["cost"][metric] <= limit * (1 + 1e-9) else None
    for step, (group, cand, _, _) in enumerate(accuracy_list, 1):
        if chosen is not None:
            break
        a, w = bits_of(cand)
        state.apply(layout, index[group], a, w)
        walk.append(point(step))
        if walk[-1]["cost"][metric] <= limit * (1 + 1e-9):
            chosen = walk[-1]
    fits = chosen is not None
    if not fits:
        chosen = min(walk, key=lambda p: (p["cost"][metric], p["step"]))
    search_s = time.perf_counter() - t0
    # the walk's model of the groups, checked on the sim: AIMET's own setters replay the chosen point
    with aimet["_mock_v1_quantizers"](sim):
        by_module, _ = aimet["find_quantizer_group"](sim)
        for g in groups:
            g.set_quantizers_to_candidate(by_module, baseline)
        for g, cand, _, _ in accuracy_list[: chosen["step"]]:
            g.set_quantizers_to_candidate(by_module, cand)
    replay = layout.start(base_a, base_w)
    for g, cand, _, _ in accuracy_list[: chosen["step"]]:
        replay.apply(layout, index[g], *bits_of(cand))
    mismatch = layout.check(sim, replay)
    if mismatch:
        say("the walk's model of AIMET's groups disagrees with the sim: " + "; ".join(mismatch[:5]))
    policy = chosen["policy"]
    policy.validate(analysis)
    say(f"AIMET search {search_s:.1f} s (phase 1 {60 * (amp_info.get('Phase1 Time') or 0):.1f} s, phase 2 "
        f"{60 * (amp_info.get('Phase2 Time') or 0):.1f} s); step {chosen['step']} of {len(accuracy_list)}: "
        f"{metric} {chosen['cost'][metric]:.6g} {'<=' if fits else '>'} {limit:.6g}")

    sensitivity = sensitivity_table(accuracy_list, layout)
    sensitivity_input = input_sensitivity(accuracy_list, layout)

    # ---- optional: phase 1 again on the requested (w, a) pairs (not part of search_s)
    sensitivity_s = None
    sens_note = ""
    if job["sensitivity_pairs"]:
        wanted = sorted({(int(w), int(a)) for w, a in job["sensitivity_pairs"]})
        bad = [f"W{w}A{a}" for w, a in wanted if not hw.supports(w, a)]
        if bad:
            sens_note = f" sensitivity pairs the hardware does not run were scored anyway: {', '.join(bad)}."
        t2 = time.perf_counter()
        sim2 = build_sim(aimet, model, dummy, calib_fn, calib)
        sentinel = ((SENTINEL_BITS, Int), (SENTINEL_BITS, Int))
        with aimet["_mock_v1_quantizers"](sim2):
            algo = aimet["GreedyMixedPrecisionAlgo"](
                sim2, dummy, candidates_of(wanted), phase1_callback(), CallbackFunc(top1, None),
                str(out / "aimet_sensitivity"), True, CallbackFunc(calib_fn, calib), phase1_optimize=True)
            extra = algo._create_and_save_accuracy_list(sentinel)
        groups2 = list(algo.quantizer_groups)
        if groups2 != groups:
            sens_note += " the sensitivity run found other quantizer groups than the search (not merged)."
        else:
            for name, scores in sensitivity_table(extra, layout).items():
                sensitivity.setdefault(name, {}).update(scores)
            for name, scores in input_sensitivity(extra, layout).items():
                for a, v in scores.items():
                    sensitivity_input.setdefault(name, {}).setdefault(a, v)
        sensitivity_s = time.perf_counter() - t2
        say(f"sensitivity run: {len(wanted)} pairs x {len(groups2)} groups in {sensitivity_s:.1f} s")

    # ---- outputs
    act_only = sum(1 for g in groups if not g.parameter_quantizers)
    shared = [[n for n, e in layout.mapping.items() if e["w_group"] == i] for i in range(len(groups))]
    shared = [s for s in shared if len(s) > 1]
    notes = [
        f"AIMET AMP greedy order walked from baseline W{base_w}A{base_a} on all {len(groups)} quantizer "
        f"groups ({act_only} activation-only, with no fxmpq layer); {len(accuracy_list)} greedy points, all scored "
        f"in phase 2 on {len(p2_x)} validation images; phase 1 SQNR on {min(job['phase1_samples'], len(val_x))}.",
        f"took step {chosen['step']}: fxmpq {metric} {chosen['cost'][metric]:.6g} "
        + ("<= limit." if fits else f"> limit {limit:.6g}: the budget is out of AIMET's reach; cheapest point kept."),
    ]
    if mismatch:
        notes.append("CHECK FAILED: at the chosen point the walk's model of AIMET's groups disagrees with the sim: "
                     + "; ".join(mismatch) + ".")
    if len(missing) != 1:
        notes.append("could not tell AIMET's baseline candidate from its phase-1 list; assumed the widest.")
    if shared:
        notes.append("layers AIMET can only set together (one quantizer group): "
                     + "; ".join(", ".join(s) for s in shared) + ".")
    if layout.tied:
        blind = [n for n in layout.tied if not layout.mapping[n]["phase1_sees_a"]]
        notes.append(
            f"AIMET's sim ties a depthwise conv's output quantizer to its ReLU's (one object), and its groups hold it "
            f"twice (an activation-only group and the next layer's weight group): the input bits of "
            f"{', '.join(layout.tied)} are those of whichever of the two groups the greedy order changed last "
            f"(followed here, checked on the sim), so a layer's w and a can differ and AIMET's own relative BitOps "
            f"is off." + (f" AIMET's phase 1 scored that quantizer only with the activation-only group, so the "
                          f"'w,a' scores of {', '.join(blind)} do not depend on a; `sensitivity_input` holds that "
                          f"group's score per activation bits." if blind else ""))
    notes += layout.notes
    if sens_note:
        notes.append(sens_note.strip())
    peer = {
        "peer": PEER, "version": aimet["ver"], "search_s": round(search_s, 3), "cost": chosen["cost"],
        "limit": limit, "fits": fits, "peer_cost": chosen["peer_rel_bitops"], "steps": chosen["step"],
        "notes": " ".join(notes), "sensitivity": sensitivity,
        "sensitivity_input": sensitivity_input,
        "sensitivity_s": None if sensitivity_s is None else round(sensitivity_s, 3),
        "metric": metric, "peer_val_top1": chosen["peer_val_top1"],
        "timings": {"sim_s": round(t_sim, 3), "amp_s": round(t_amp, 3),
                    "phase1_s": None if amp_info.get("Phase1 Time") is None else round(60 * amp_info["Phase1 Time"], 3),
                    "phase2_s": None if amp_info.get("Phase2 Time") is None else round(60 * amp_info["Phase2 Time"], 3)},
        "baseline": {"w": base_w, "a": base_a}, "walk_model_checked": not mismatch,
        "groups": [g.to_list() for g in groups],
        "mapping": {n: {k: v for k, v in e.items() if k != "a_key"} for n, e in layout.mapping.items()},
        "walk": [{"step": p["step"], metric: p["cost"][metric], "peer_rel_bitops": p["peer_rel_bitops"],
                  "peer_val_top1": p["peer_val_top1"]} for p in walk],
    }
    policy.to_json(out / "policy.json")
    (out / "peer.json").write_text(json.dumps(peer, indent=1) + "\n")
    say(f"wrote {out / 'policy.json'} and {out / 'peer.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
