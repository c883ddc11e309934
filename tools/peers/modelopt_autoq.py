"""NVIDIA ModelOpt's auto_quantize as a peer in the side-by-side benchmark (tools/bench_peers.py).

Runs inside ModelOpt's own virtual environment (tools/peers/make_env.sh modelopt VENV):

    VENV/bin/python tools/peers/modelopt_autoq.py JOB.json

JOB.json (paths absolute):
    {"net": "small_mobilenet", "net_kwargs": {"in_channels": 1, "num_classes": 10},
     "fp32": ".../fp32.pt", "data": "fashion-mnist" | "digits", "data_dir": null,
     "val": [55000, 60000], "calib_samples": 256, "hardware": ".../bench.toml",
     "bits": [2, 3, 4, 5, 6, 8], "budget": {"metric": "bitops" | "size", "limit": 1.23e7},
     "seed": 0, "out": ".../outdir"}
optional: "batch_size" (32), "threads" (torch.set_num_threads; untouched by default),
          "allow_no_quant" (false: see below), "size_weight_bits" ([8, 4, 2]).

What it does, as a ModelOpt user would:
- the data loader holds only `calib_samples` images drawn (seeded) from the validation slice `val` of the train
  split; auto_quantize calibrates (max) and scores on it (num_calib_steps = num_score_steps = its batches),
  method="gradient", loss = cross-entropy;
- size budget: formats INT8_DEFAULT_CFG (W8A8) and copies of it with weight num_bits 4 and 2 (W4A8, W2A8).
  ModelOpt's constraint, effective_bits, is the weight-numel-weighted mean weight bits, so fxmpq's size limit
  (params incl. biases x weight bits) is converted to effective bits; the result is priced by fxmpq and, while
  over the limit, effective_bits is lowered by bisection;
- bitops budget: ModelOpt cannot express it. Formats with weight bits = activation bits (every bit of `bits` the
  hardware runs; fake quantization of each is checked on CPU first) and a bisection over effective_bits for the
  largest one whose fxmpq-measured BitOps fit. When no such format works, exit 3 with the reason in peer.json;
- bisection steps re-solve ModelOpt's LP on the scores of the one auto_quantize run
  (mtq.get_auto_quantize_config(search_state, {"effective_bits": B}): no recalibration, no rescoring);
- layers pinned by the hardware file are fixed at their pin format through module_search_spaces (a
  single-format entry with allow_no_quant=False), so their weights stay in ModelOpt's effective-bits budget;
- ModelOpt always adds "do not quantize" (16-bit) to every layer's choices. fxmpq's targets run no float layer,
  so the searchable layers get allow_no_quant=False (module_search_spaces) unless the job says
  "allow_no_quant": true. Layers ModelOpt leaves unquantized (that choice, or ops it does not quantize at all,
  such as attention's matmuls) are mapped to 8/8 and named in the notes.

Outputs in `out`: policy.json (complete fxmpq Policy) and peer.json. Exit 0 (result written, `fits` says whether
it fits), 2 (bad job file or missing package), 3 (budget ModelOpt cannot express), 1 (anything else).
"""

from __future__ import annotations

import copy
import fnmatch
import glob
import json
import math
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

PEER = "modelopt"
DEFAULT_BATCH = 32
SIZE_WEIGHT_BITS = (8, 4, 2)
BISECT_TOL = 0.002  # effective bits
MAX_TRIES = 40


class JobError(Exception):
    """A bad job file or a missing package: exit 2 with one line."""


class Unsupported(Exception):
    """A budget ModelOpt cannot express: exit 3, the reason in peer.json."""


# ------------------------------------------------------------------------------------------------ job file
def read_job(path: str) -> dict[str, Any]:
    try:
        job = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise JobError(f"job file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"job file {path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise JobError(f"job file {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(job, dict):
        raise JobError(f"job file {path}: expected a JSON object")

    def need(key: str, types: tuple[type, ...], what: str) -> Any:
        if key not in job:
            raise JobError(f"job file {path}: missing key {key!r} ({what})")
        v = job[key]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise JobError(f"job file {path}: {key!r} must be {what}, found {v!r}"[:300])
        return v

    need("net", (str,), "a model name")
    if not isinstance(job.setdefault("net_kwargs", {}), dict):
        raise JobError(f"job file {path}: 'net_kwargs' must be an object")
    need("fp32", (str,), "the FP32 state_dict path")
    if need("data", (str,), '"fashion-mnist" or "digits"') not in ("fashion-mnist", "digits"):
        raise JobError(f"job file {path}: 'data' must be \"fashion-mnist\" or \"digits\", found {job['data']!r}")
    if job.setdefault("data_dir", None) is not None and not isinstance(job["data_dir"], str):
        raise JobError(f"job file {path}: 'data_dir' must be a path or null")
    val = need("val", (list,), "[start, stop] of the train split")
    if len(val) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in val) or not 0 <= val[0] < val[1]:
        raise JobError(f"job file {path}: 'val' must be [start, stop] with 0 <= start < stop, found {val!r}")
    if need("calib_samples", (int,), "a positive integer") < 1:
        raise JobError(f"job file {path}: 'calib_samples' must be positive")
    need("hardware", (str,), "a hardware file path")
    bits = need("bits", (list,), "a list of bit-widths")
    if not bits or not all(isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 16 for b in bits):
        raise JobError(f"job file {path}: 'bits' must be a non-empty list of integers 2..16, found {bits!r}")
    budget = need("budget", (dict,), '{"metric": ..., "limit": ...}')
    if budget.get("metric") not in ("bitops", "size"):
        raise JobError(f"job file {path}: budget.metric must be \"bitops\" or \"size\", found {budget.get('metric')!r}")
    lim = budget.get("limit")
    if not isinstance(lim, int | float) or isinstance(lim, bool) or not math.isfinite(lim) or lim <= 0:
        raise JobError(f"job file {path}: budget.limit must be a positive number, found {lim!r}")
    need("seed", (int,), "an integer")
    need("out", (str,), "an output folder")
    if job.setdefault("batch_size", DEFAULT_BATCH) < 1:
        raise JobError(f"job file {path}: 'batch_size' must be positive")
    if not isinstance(job.setdefault("allow_no_quant", False), bool):
        raise JobError(f"job file {path}: 'allow_no_quant' must be true or false")
    swb = job.setdefault("size_weight_bits", list(SIZE_WEIGHT_BITS))
    if not isinstance(swb, list) or not swb or not all(isinstance(b, int) and 2 <= b <= 8 for b in swb):
        raise JobError(f"job file {path}: 'size_weight_bits' must be a list of integers 2..8")
    for key in ("fp32", "hardware"):
        if not Path(job[key]).is_file():
            raise JobError(f"job file {path}: {key} file {job[key]} not found")
    return job


def import_packages() -> dict[str, Any]:
    """torch, fxmpq and ModelOpt, or JobError naming the missing package (ModelOpt's import warnings muted)."""
    mods: dict[str, Any] = {}
    try:
        import torch

        mods["torch"] = torch
    except ImportError as e:
        raise JobError(f"missing package: torch ({e}); run inside the ModelOpt venv (tools/peers/make_env.sh)") from None
    try:
        import fxmpq
        import fxmpq.core.datasets
        import fxmpq.models

        mods["fxmpq"] = fxmpq
    except ImportError as e:
        raise JobError(f"missing package: fxmpq ({e}); install it in this venv: pip install -e /path/to/fxmpq") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import modelopt
            import modelopt.torch.quantization as mtq
            from modelopt.torch.opt.utils import named_hparams
            from modelopt.torch.quantization.algorithms import QuantRecipe, QuantRecipeHparam
            from modelopt.torch.quantization.nn import TensorQuantizer
    except ImportError as e:
        raise JobError(f"missing package: nvidia-modelopt or one of its imports ({e}); "
                       f"tools/peers/make_env.sh modelopt VENV installs it") from None
    mods.update(modelopt=modelopt, mtq=mtq, named_hparams=named_hparams, QuantRecipe=QuantRecipe,
                QuantRecipeHparam=QuantRecipeHparam, TensorQuantizer=TensorQuantizer)
    return mods


# ------------------------------------------------------------------------------------------------ formats
def make_format(mtq: Any, w_bits: int, a_bits: int) -> dict[str, Any]:
    """INT8_DEFAULT_CFG (per-channel weights, per-tensor inputs, max calibration) with other num_bits."""
    cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    if (w_bits, a_bits) == (8, 8):
        return cfg
    seen = set()
    for entry in cfg["quant_cfg"]:
        name = entry.get("quantizer_name")
        if name == "*weight_quantizer" and entry.get("cfg") is not None:
            entry["cfg"]["num_bits"] = w_bits
            seen.add("w")
        elif name == "*input_quantizer" and entry.get("cfg") is not None:
            entry["cfg"]["num_bits"] = a_bits
            seen.add("a")
    if seen != {"w", "a"}:
        raise RuntimeError("INT8_DEFAULT_CFG has no '*weight_quantizer'/'*input_quantizer' entries to change "
                           "(this adapter targets nvidia-modelopt 0.47)")
    return cfg


def format_works(mods: dict[str, Any], w_bits: int, a_bits: int) -> str | None:
    """None when ModelOpt fake-quantizes a conv + linear at (w_bits, a_bits) on this machine, else why not."""
    torch, mtq = mods["torch"], mods["mtq"]
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x = torch.randn(4, 2, 4, 4)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = mtq.quantize(net, make_format(mtq, w_bits, a_bits), forward_loop=lambda m: m(x))
            y = q(x)
        bits = {n: m.num_bits for n, m in q.named_modules()
                if isinstance(m, mods["TensorQuantizer"]) and m.is_enabled}
        if not torch.isfinite(y).all():
            return "non-finite output"
        if sorted(set(bits.values())) != sorted({w_bits, a_bits}):
            return f"quantizers came out at {bits}"
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def format_bits(recipe: Any) -> tuple[int | None, int | None]:
    """(weight num_bits, input num_bits) a QuantRecipe sets (its entries in order, later ones win); None for a
    quantizer it leaves disabled."""
    found: dict[str, int | None] = {"weight_quantizer": None, "input_quantizer": None}
    for entry in recipe.config.quant_cfg:
        if entry.get("parent_class") is not None:
            continue
        for attr in found:
            if not fnmatch.fnmatch(attr, entry["quantizer_name"]):
                continue
            if not entry.get("enable", True):
                found[attr] = None
                continue
            cfg = entry.get("cfg")
            nb = cfg.get("num_bits") if isinstance(cfg, dict) else getattr(cfg, "num_bits", None)
            if nb is not None:
                found[attr] = nb
    return found["weight_quantizer"], found["input_quantizer"]


# ------------------------------------------------------------------------------------------------ mapping
def quantizer_bits(mods: dict[str, Any], model: Any) -> dict[str, tuple[int, int | None] | None]:
    """Module name -> (weight bits, input bits) of its enabled TensorQuantizers; None when its weight is float."""
    tq = mods["TensorQuantizer"]
    out: dict[str, tuple[int, int | None] | None] = {}
    for name, m in model.named_modules():
        wq, iq = getattr(m, "weight_quantizer", None), getattr(m, "input_quantizer", None)
        if not isinstance(wq, tq):
            continue
        a = iq.num_bits if isinstance(iq, tq) and iq.is_enabled else None
        out[name] = (wq.num_bits, a) if wq.is_enabled else None
    return out


def config_bits(config: dict[str, Any], modules: list[str]) -> dict[str, tuple[int, int | None] | None]:
    """Module name -> (weight bits, input bits) that a get_auto_quantize_config config sets (later entries win)."""
    out: dict[str, list[Any]] = {m: [None, None] for m in modules}
    for entry in config["quant_cfg"]:
        name = entry["quantizer_name"]
        module, _, attr = name.rpartition(".")
        if module not in out or attr not in ("weight_quantizer", "input_quantizer"):
            continue
        slot = 0 if attr == "weight_quantizer" else 1
        cfg = entry.get("cfg") or {}
        nb = cfg.get("num_bits") if isinstance(cfg, dict) else getattr(cfg, "num_bits", None)
        out[module][slot] = nb if entry.get("enable", True) else None
    return {m: ((w, a) if w is not None else None) for m, (w, a) in out.items()}


class Mapper:
    """fxmpq layers <-> the modules ModelOpt quantizes; turns ModelOpt's per-module bits into a complete Policy."""

    def __init__(self, fxmpq: Any, analysis: Any, weight_numel: dict[str, int], search_modules: list[str]):
        self.fxmpq, self.a = fxmpq, analysis
        self.weight_numel = weight_numel
        self.search_modules = search_modules  # every module in ModelOpt's cost model (searched or fixed)
        self.by_module: dict[str, list[str]] = {}
        for m in analysis.layers:
            if m.module is not None and m.module in set(search_modules) and m.weight:
                self.by_module.setdefault(m.module, []).append(m.name)
        covered = {n for names in self.by_module.values() for n in names}
        self.uncovered = [m for m in analysis.layers if m.name not in covered]
        # hardware that quantizes a tensor once for all its readers (fxmpq's search gives them one a_bits)
        self.shared = analysis.shared_input_groups() if analysis.hardware.share_input_quantizer else []

    def policy(self, module_bits: dict[str, tuple[int, int | None] | None]) -> tuple[Any, list[str]]:
        """The complete policy and the searchable layers ModelOpt left unquantized (mapped to 8/8)."""
        bits, float_layers = {}, []
        for module, names in self.by_module.items():
            b = module_bits.get(module)
            for n in names:
                if b is None:
                    float_layers.append(n)
                    bits[n] = (8, 8)
                else:
                    bits[n] = (b[0], b[1] if b[1] is not None else 8)
        for m in self.uncovered:
            bits[m.name] = (8, 8)
        bits = {m.name: (m.pin_bits if m.pinned else bits[m.name]) for m in self.a.layers}
        hw = self.a.hardware
        for group in self.shared:  # one input quantizer per tensor: its readers take the group's largest a_bits
            a = max(bits[n][1] for n in group)
            for n in group:
                rec = self.a.layer(n)
                if rec.pinned:
                    continue
                w = bits[n][0]
                if not hw.runs(rec.kind, w, a):  # (w, a) is no pair of the target: the next weight bits that is
                    w = min((w2 for w2, a2 in hw.pairs if a2 == a and w2 >= w), default=w)
                bits[n] = (w, a)
        pol = self.fxmpq.Policy(bits)
        return pol.complete(self.a), [n for n in float_layers if self.a.layer(n).searchable]

    def effective_bits(self, module_bits: dict[str, tuple[int, int | None] | None]) -> float:
        """ModelOpt's effective bits: weight-numel-weighted min(w, a) bits (16 for an unquantized module)."""
        num = den = 0.0
        for module in self.search_modules:
            b = module_bits.get(module)
            eff = 16 if b is None else min(x for x in b if x is not None)
            num += self.weight_numel[module] * eff
            den += self.weight_numel[module]
        return num / den


# ------------------------------------------------------------------------------------------------ the run
def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print("usage: modelopt_autoq.py JOB.json  (run with the ModelOpt venv's python)", file=sys.stderr)
        return 2
    t_process = time.perf_counter()
    out_dir: Path | None = None
    version = None
    try:
        job = read_job(argv[1])
        out_dir = Path(job["out"])
        for stale in ("policy.json", "peer.json"):  # a failed run must not leave an earlier run's pair behind
            (out_dir / stale).unlink(missing_ok=True)
        mods = import_packages()
        version = mods["modelopt"].__version__
        return run(job, mods, out_dir, t_process)
    except JobError as e:
        print(f"modelopt_autoq: {e}", file=sys.stderr)
        _write_failure(out_dir, version, str(e))
        return 2
    except Unsupported as e:
        print(f"modelopt_autoq: {e}", file=sys.stderr)
        _write_failure(out_dir, version, str(e), skipped=True)
        return 3
    except Exception as e:
        line = str(e).splitlines()[0] if str(e) else ""
        print(f"modelopt_autoq: failed: {type(e).__name__}: {line}", file=sys.stderr)
        traceback.print_exc()
        _write_failure(out_dir, version, f"{type(e).__name__}: {line}")
        return 1


def _write_failure(out_dir: Path | None, version: str | None, reason: str, skipped: bool = False) -> None:
    if out_dir is None:
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        doc = {"peer": PEER, "version": version, "error": None if skipped else reason,
               "skipped": reason if skipped else None, "notes": reason}
        (out_dir / "peer.json").write_text(json.dumps(doc, indent=1) + "\n")
    except OSError:
        pass


def run(job: dict[str, Any], mods: dict[str, Any], out_dir: Path, t_process: float) -> int:
    torch, fxmpq, mtq = mods["torch"], mods["fxmpq"], mods["mtq"]
    if "threads" in job:
        torch.set_num_threads(int(job["threads"]))
    warnings.filterwarnings("ignore", module=r"modelopt\..*")
    warnings.filterwarnings("ignore", message=r".*(custom quantization formats|get_auto_quantize_config).*")
    metric, limit = job["budget"]["metric"], float(job["budget"]["limit"])
    notes: list[str] = []

    # --- data, model, fxmpq's analysis (all before ModelOpt converts the model in place)
    try:
        data = (fxmpq.core.datasets.load_fashion_mnist(job["data_dir"]) if job["data"] == "fashion-mnist"
                else fxmpq.core.datasets.load_digits())
    except fxmpq.FxmpqError as e:
        raise JobError(f"data {job['data']!r}: {e}") from None
    lo, hi = job["val"]
    if hi > len(data.train_y):
        raise JobError(f"val {job['val']} is outside the {job['data']} train split ({len(data.train_y)} samples)")
    vx, vy = data.train_x[lo:hi], data.train_y[lo:hi]
    g = torch.Generator().manual_seed(job["seed"])
    pick = torch.randperm(len(vy), generator=g)[: job["calib_samples"]]
    bs = job["batch_size"]
    batches = [(vx[pick[i:i + bs]], vy[pick[i:i + bs]]) for i in range(0, len(pick), bs)]
    steps = len(batches)
    torch.manual_seed(job["seed"])
    try:
        model = fxmpq.models.build_model(job["net"], job["net_kwargs"])
        state = torch.load(job["fp32"], weights_only=True, map_location="cpu")
        model.load_state_dict(state)
    except fxmpq.FxmpqError as e:
        raise JobError(str(e)) from None
    except (RuntimeError, OSError, ValueError) as e:
        raise JobError(f"fp32 {job['fp32']}: cannot load it into {job['net']} ({str(e).splitlines()[0]})") from None
    model.eval()
    try:
        analysis = fxmpq.analyze(model, vx[:1], hardware=job["hardware"])
    except fxmpq.HardwareSpecError as e:
        raise JobError(str(e)) from None
    hw = analysis.hardware
    fp32_model = copy.deepcopy(model)

    # --- candidate formats
    bits = sorted(set(job["bits"]))
    if metric == "size":
        pairs = [(w, 8) for w in sorted(set(job["size_weight_bits"]), reverse=True)]
        dropped = [p for p in pairs if p[0] not in bits or 8 not in bits or not hw.supports(*p)]
        pairs = [p for p in pairs if p not in dropped]
        if dropped:
            notes.append(f"formats {', '.join(f'W{w}A{a}' for w, a in dropped)} dropped (not in job bits or "
                         f"hardware {hw.name!r})")
        if not pairs:
            raise Unsupported("no W{8,4,2}A8 format is among the job's bits and the hardware's pairs")
    else:
        pairs, refused = [], []
        for b in sorted(bits, reverse=True):
            if not hw.supports(b, b):
                refused.append(f"W{b}A{b}: hardware {hw.name!r} does not run it")
                continue
            why = format_works(mods, b, b)
            if why is None:
                pairs.append((b, b))
            else:
                refused.append(f"W{b}A{b}: {why}")
        if refused:
            notes.append("formats refused: " + "; ".join(refused))
        if not pairs:
            raise Unsupported("bitops budget: ModelOpt only budgets weight bits (effective_bits) and no format "
                              "with equal weight and activation bits works here (" + "; ".join(refused) + ")")
        notes.append("bitops budget: ModelOpt's constraint is weight size (effective_bits); formats with weight "
                     "bits = activation bits, effective_bits bisected until fxmpq-measured BitOps fit")
    formats = {p: make_format(mtq, *p) for p in pairs}

    # --- which modules ModelOpt will search; pinned ones fixed at their pins
    quantizable = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    mo_modules = [n for n, m in model.named_modules() if isinstance(m, quantizable)]
    weight_numel = {n: model.get_submodule(n).weight.numel() for n in mo_modules}
    layer_of_module: dict[str, list[Any]] = {}
    for m in analysis.layers:
        if m.module is not None:
            layer_of_module.setdefault(m.module, []).append(m)
    pinned_modules, pin_bits = [], set()
    for n in mo_modules:
        recs = layer_of_module.get(n, [])
        if recs and any(r.pinned for r in recs):
            pinned_modules.append(n)
            pin_bits |= {r.pin_bits for r in recs if r.pinned}
    searched = [n for n in mo_modules if n not in pinned_modules]
    spaces: list[dict[str, Any]] = []
    if pinned_modules:
        if len(pin_bits) != 1:
            raise Unsupported(f"pinned layers at several formats {sorted(pin_bits)}")
        pin = next(iter(pin_bits))
        spaces.append({"module_name_patterns": [glob.escape(n) for n in pinned_modules],
                       "quantization_formats": [make_format(mtq, *pin)], "allow_no_quant": False})
        notes.append(f"pinned layers fixed at W{pin[0]}A{pin[1]} in ModelOpt (module_search_spaces): "
                     + ", ".join(pinned_modules))
    if not job["allow_no_quant"] and searched:
        spaces.append({"module_name_patterns": [glob.escape(n) for n in searched],
                       "quantization_formats": list(formats.values()), "allow_no_quant": False})
    elif job["allow_no_quant"]:
        notes.append("allow_no_quant: ModelOpt may leave layers unquantized (16 bits in its budget)")

    # --- the start point
    p_fx = {n: sum(r.params for r in layer_of_module.get(n, [])) for n in mo_modules}
    w_all = sum(weight_numel.values())
    w_pin = sum(weight_numel[n] for n in pinned_modules)
    w_s = w_all - w_pin
    pin_eff = min(next(iter(pin_bits))) if pinned_modules else 0
    lo_bits, hi_bits = min(min(p) for p in pairs), max(min(p) for p in pairs)
    b_min = (pin_eff * w_pin + lo_bits * w_s) / w_all
    b_max = (pin_eff * w_pin + (16 if job["allow_no_quant"] else hi_bits) * w_s) / w_all
    # fxmpq's cost of everything the search does not change: constants, pinned layers, layers ModelOpt misses
    searched_layers = {r.name for n in searched for r in layer_of_module.get(n, [])}
    fixed_policy = {m.name: (m.pin_bits if m.pinned else (8, 8)) for m in analysis.layers}
    per_layer = analysis.policy_costs(fxmpq.Policy(fixed_policy))
    fixed_cost = analysis.hardware.model_cost()[metric] + sum(
        c[metric] for name, c in per_layer.items() if name not in searched_layers)
    if metric == "size":
        p_s = sum(p_fx[n] for n in searched)
        avg = (limit - fixed_cost) / p_s if p_s else hi_bits
        b_start = (pin_eff * w_pin + avg * w_s) / w_all
        notes.append(f"size limit {limit:.6g} bit -> {avg:.4f} bits per searchable parameter (fxmpq counts biases; "
                     f"ModelOpt weights only) -> effective_bits {b_start:.4f} (weight-weighted, pins included)")
    else:
        macs_s = sum(r.macs for r in analysis.layers if r.name in searched_layers)
        avg = math.sqrt(max(limit - fixed_cost, 0.0) / macs_s) if macs_s else hi_bits
        b_start = (pin_eff * w_pin + avg * w_s) / w_all
    if b_start < b_min:
        notes.append(f"the converted effective_bits {b_start:.4f} is below ModelOpt's minimum {b_min:.4f} "
                     f"(every searchable layer at its lowest format)")
    b_start = min(max(b_start, b_min), b_max)

    # --- auto_quantize (the one calibration + scoring run)
    def forward_step(m: Any, batch: Any) -> Any:
        return m(batch[0])

    def loss_func(output: Any, batch: Any) -> Any:
        return torch.nn.functional.cross_entropy(output, batch[1])

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel, search_state = mtq.auto_quantize(
            model, constraints={"effective_bits": b_start}, quantization_formats=list(formats.values()),
            data_loader=batches, forward_step=forward_step, loss_func=loss_func, method="gradient",
            num_calib_steps=steps, num_score_steps=steps, verbose=False,
            module_search_spaces=spaces or None)
    t_autoq = time.perf_counter() - t0

    cost_modules = [n for st in search_state["candidate_stats"].values() for n in st["module_names"]]
    missing = [n for n in cost_modules if n not in weight_numel]
    if missing:
        raise RuntimeError(f"ModelOpt searched modules the adapter does not know: {missing}")
    mapper = Mapper(fxmpq, analysis, weight_numel, cost_modules)
    not_searched = [n for n in mo_modules if n not in cost_modules]
    if not_searched:
        notes.append("conv/linear modules ModelOpt did not search (mapped 8/8): " + ", ".join(not_searched))
    if mapper.shared:
        notes.append("hardware shares one input quantizer per tensor: layers reading one tensor get the largest "
                     "a_bits ModelOpt gave any of them (" + "; ".join(", ".join(g) for g in mapper.shared) + ")")
    if mapper.uncovered:
        kinds = sorted({m.kind.value for m in mapper.uncovered})
        notes.append(f"fxmpq layers ModelOpt does not quantize ({', '.join(kinds)}; mapped to 8/8"
                     f"{' or their pins' if any(m.pinned for m in mapper.uncovered) else ''}): "
                     + ", ".join(m.name for m in mapper.uncovered))

    # --- tries: try 0 is auto_quantize's own result, read from the quantized model's TensorQuantizers
    tries: list[dict[str, Any]] = []
    results: list[tuple[float, Any, dict[str, Any] | None]] = []  # (B, policy, config or None for try 0)

    def record(b: float, module_bits: dict[str, Any], config: dict[str, Any] | None, source: str) -> bool:
        pol, float_layers = mapper.policy(module_bits)
        cost = analysis.cost(pol)
        fits = cost[metric] <= limit * (1 + 1e-12)
        tries.append({"effective_bits": round(b, 6), "peer_effective_bits": round(mapper.effective_bits(module_bits), 6),
                      "fxmpq_cost": cost[metric], "fits": bool(fits), "source": source,
                      "unquantized": float_layers, "t_s": round(time.perf_counter() - t0, 3)})
        results.append((b, pol, config))
        return fits

    bits0 = {n: quantizer_bits(mods, qmodel).get(n) for n in cost_modules}
    reported = search_state["best"]["constraints"].get("effective_bits")
    if reported is not None and abs(reported - mapper.effective_bits(bits0)) > 1e-6:
        notes.append(f"ModelOpt reports effective bits {reported:.4f}, its quantizers give "
                     f"{mapper.effective_bits(bits0):.4f}")
    if not search_state["best"].get("is_satisfied", True):
        notes.append("ModelOpt's LP reported its constraint unsatisfied at the first try")
    fit0 = record(b_start, bits0, None, "auto_quantize")

    def resolve(b: float) -> bool:
        config = mtq.get_auto_quantize_config(search_state, {"effective_bits": b})
        return record(b, config_bits(config, cost_modules), config, "re-solve")

    # try 0 must agree with a re-solve at the same effective_bits (the scores are reused for every other try)
    cfg0 = mtq.get_auto_quantize_config(search_state, {"effective_bits": b_start})
    if config_bits(cfg0, cost_modules) != bits0:
        notes.append("re-solving at the first effective_bits gave another recipe than auto_quantize's own")

    # the largest effective_bits whose fxmpq-measured cost fits, by bisection (size: only when the converted
    # budget is over; bitops: always). A first guess scales the start by how far over the searchable part is.
    best = 0 if fit0 else None

    def last() -> int:
        return len(results) - 1

    if not (metric == "size" and fit0):
        lo_b, hi_b = (b_start, None) if fit0 else (None, b_start)
        if fit0 and b_start < b_max - BISECT_TOL:  # bitops: look above the start point too
            if resolve(b_max):
                lo_b, best, hi_b = b_max, last(), None
            else:
                hi_b = b_max
        if not fit0 and b_start > b_min + BISECT_TOL:
            over = (limit - fixed_cost) / max(tries[0]["fxmpq_cost"] - fixed_cost, 1e-30)
            guess = b_start * (over if metric == "size" else math.sqrt(max(over, 0.0)))
            guess = min(max(guess, b_min), b_start - BISECT_TOL)
            if resolve(guess):
                lo_b, best = guess, last()
            else:
                hi_b = guess
                if guess > b_min + BISECT_TOL and resolve(b_min):
                    lo_b, best = b_min, last()
        while lo_b is not None and hi_b is not None and hi_b - lo_b > BISECT_TOL and len(tries) < MAX_TRIES:
            mid = (lo_b + hi_b) / 2
            if resolve(mid):
                lo_b, best = mid, last()
            else:
                hi_b = mid
    t_search = time.perf_counter() - t0

    if best is None:  # nothing fits: report the cheapest try
        best = min(range(len(tries)), key=lambda i: tries[i]["fxmpq_cost"])
        notes.append(f"no try fits the {metric} limit; reporting the cheapest (lowest effective_bits "
                     f"{b_min:.4f} ModelOpt allows)")
    _, policy, config = results[best]
    if config is None:
        config = cfg0

    # --- check: the final config applied with mtq.quantize to a fresh FP32 copy gives the policy's bits
    t1 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = mtq.quantize(fp32_model, config, forward_loop=lambda m: [forward_step(m, b) for b in batches])
    fresh_bits = quantizer_bits(mods, fresh)
    mismatch = []
    shared_layers = {n for g in mapper.shared for n in g}
    for module, names in mapper.by_module.items():
        qb = fresh_bits.get(module)
        for n in names:
            if analysis.layer(n).pinned:
                continue
            want = policy[n]
            got = (qb[0], qb[1] if qb[1] is not None else 8) if qb is not None else (8, 8)
            raised = n in shared_layers and want[0] >= got[0] and want[1] >= got[1]
            if want != got and not raised:
                mismatch.append(f"{n}: policy {want}, ModelOpt quantizers {qb}")
    stray = sorted({n.rpartition(".")[0] for n, m in fresh.named_modules()
                    if isinstance(m, mods["TensorQuantizer"]) and m.is_enabled}
                   - {n for n in mapper.by_module if fresh_bits.get(n) is not None})
    if mismatch:
        raise RuntimeError("mapped policy disagrees with ModelOpt's quantizers: " + "; ".join(mismatch[:5]))
    if stray:
        notes.append("ModelOpt quantized modules fxmpq has no layer for: " + ", ".join(stray))
    with torch.no_grad():
        correct = sum(int((fresh(vx[i:i + 256]).argmax(-1) == vy[i:i + 256]).sum()) for i in range(0, len(vy), 256))
    t_verify = time.perf_counter() - t1

    # --- sensitivity: ModelOpt's raw gradient scores per layer and format (before its monotone clamp)
    sensitivity: dict[str, dict[str, float]] = {}
    for _, hp in mods["named_hparams"](qmodel, unique=True):
        if not isinstance(hp, mods["QuantRecipeHparam"]) or not hp.is_configurable:
            continue
        scores = {}
        for recipe in hp.choices:
            if recipe == mods["QuantRecipe"](quant_cfg=None):
                continue
            w, a = format_bits(recipe)
            scores[f"{w},{a}"] = float(hp.get_score(recipe))
        for module in hp.quant_module_names:
            for n in mapper.by_module.get(module, []):
                sensitivity[n] = dict(sorted(scores.items(), key=lambda kv: -int(kv[0].split(",")[0])))

    # --- outputs
    out_dir.mkdir(parents=True, exist_ok=True)
    policy.to_json(out_dir / "policy.json")
    final = tries[best]
    if final["unquantized"]:
        notes.append("layers ModelOpt left unquantized (mapped to 8/8): " + ", ".join(final["unquantized"]))
    doc = {
        "peer": PEER,
        "version": mods["modelopt"].__version__,
        "search_s": round(t_search, 3),
        "cost": analysis.cost(policy),
        "limit": limit,
        "metric": metric,
        "fits": bool(final["fits"]),
        "peer_cost": final["peer_effective_bits"],
        "peer_cost_unit": "effective_bits (ModelOpt: weight-numel-weighted mean bits of its searched modules)",
        "effective_bits": final["effective_bits"],
        "tries": tries,
        "formats": [f"W{w}A{a}" for w, a in pairs],
        "format_counts": policy.format_counts(),
        "notes": "; ".join(notes),
        "sensitivity": sensitivity,
        "sensitivity_note": "ModelOpt's per-module gradient scores sum((grad_out * (Q(y) - y))^2) over the score "
                            "batches, before the monotone clamp its LP uses; key 'w,a'",
        "peer_val_acc": correct / len(vy),
        "peer_val_acc_note": "ModelOpt's own fake-quant PTQ model (max calibration) on the val slice",
        "timing": {"auto_quantize_s": round(t_autoq, 3), "resolves_s": round(t_search - t_autoq, 3),
                   "verify_s": round(t_verify, 3), "process_s": round(time.perf_counter() - t_process, 3),
                   "calib_steps": steps, "score_steps": steps, "batch_size": bs,
                   "note": "search_s = auto_quantize (calibration of every format + gradient scoring + LP) + every "
                           "re-solve and its fxmpq pricing; not imports, data loading, fxmpq.analyze, the format "
                           "probe, or verify_s (mtq.quantize of the final config on a fresh copy + val accuracy)"},
    }
    (out_dir / "peer.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"modelopt_autoq: {job['net']} {metric} <= {limit:.6g}: {'fits' if doc['fits'] else 'OVER'} at "
          f"{doc['cost'][metric]:.6g} (effective_bits {final['effective_bits']:.4f}, {len(tries)} tries, "
          f"search {t_search:.1f} s) -> {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
