"""Hardware descriptions: a strict TOML schema parsed into a frozen HardwareSpec (targets, pins, metrics, provenance).

The cost terms themselves (layer kinds, Term, Metric, the layer view they price) live in fxmpq/hardware/cost_terms.py; this
module re-exports them, so `from fxmpq.hardware.spec import LayerKind, FLOAT, ...` stays the one import users need.
The tables inside the metrics (terms, per-layer entries, format keys) are read by fxmpq/hardware/terms_schema.py."""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..core.cpuinfo import CpuInfo, cpu_info
from ..core.strict_toml import Table
from ..errors import HardwareSpecError, brief, first_line
from .cost_terms import (
    FLOAT,
    FLOAT_BITS,
    FLOAT_KEY,
    MAX_ACT_BITS,
    MAX_BITS,
    MIN_BITS,
    Layer,
    LayerEntry,
    LayerInfo,
    LayerKind,
    LayerSignature,
    Metric,
    Pair,
    Per,
    Term,
    TermType,
    format_name,
    pair_name,
    shape_text,
)
from .terms_schema import bits_list, check_bits, layer_kinds, parse_term

log = logging.getLogger(__name__)

__all__ = ["FLOAT", "FLOAT_BITS", "FLOAT_KEY", "MAX_ACT_BITS", "MAX_BITS", "MIN_BITS", "HardwareSpec", "Layer", "LayerEntry",
           "LayerInfo", "LayerKind", "LayerSignature", "Metric", "Pair", "Per", "Pins", "Provenance", "Term",
           "TermType", "builtin_hardware", "format_name", "load_hardware", "loads_hardware", "pair_name",
           "parse_hardware", "shape_text"]


@dataclass(frozen=True)
class Pins:
    """Which layers keep fixed bits (the paper pins the first conv and the last linear at 8/8)."""

    first_layer: bool = True
    last_layer: bool = True
    w_bits: int = 8
    a_bits: int = 8
    layers: tuple[str, ...] = ()

    @property
    def bits(self) -> tuple[int, int]:
        """The (w_bits, a_bits) every pinned layer runs at."""
        return (self.w_bits, self.a_bits)


@dataclass(frozen=True)
class Provenance:
    """Where a measured hardware file comes from (its optional [provenance] table): what, where and how."""

    tool: str = ""
    command: str = ""
    date: str = ""
    model: str = ""
    input: str = ""  # per-sample shape, "3x224x224"
    batch: int | None = None
    threads: int | None = None
    runtime: str = ""  # "onnxruntime 1.32.0 (CPUExecutionProvider)"
    cpu: str = ""  # /proc/cpuinfo "model name"
    clock: str = ""  # "thread_cpu" or "wall" (fxmpq.export.measure.Clock)
    repeats: int | None = None
    notes: str = ""
    cpu_vendor: str = ""  # /proc/cpuinfo vendor_id, "GenuineIntel"
    cpu_family: int | None = None
    cpu_model: int | None = None
    isa: tuple[str, ...] | None = None  # the int8-relevant features it had (fxmpq.core.cpuinfo.INT8_FEATURES)


@dataclass(frozen=True)
class HardwareSpec:
    """A target: the bit-widths and (w, a) pairs it runs, its pins and its cost metrics."""

    name: str
    description: str
    sources: tuple[str, ...]
    weight_bits: tuple[int, ...]
    act_bits: tuple[int, ...]
    pairs: tuple[tuple[int, int], ...]
    pins: Pins
    metrics: Mapping[str, Metric]
    share_input_quantizer: bool = False
    float_kinds: frozenset[LayerKind] = frozenset()  # layer kinds the search may leave in float
    # weight-only formats (w, None) linear layers may run as (ONNX Runtime's MatMulNBits), and its accuracy_level
    weight_only_bits: tuple[int, ...] = ()
    matmul_nbits_accuracy_level: int = 4
    path: str = "<memory>"
    provenance: Provenance | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> HardwareSpec:
        return self  # an immutable value: copies of a model share it

    def supports(self, w: int, a: int) -> bool:
        """Whether the target runs `w`-bit weights with `a`-bit activations."""
        return (w, a) in self.pairs

    def formats(self, kind: LayerKind) -> tuple[Pair, ...]:
        """What a layer of `kind` may run as: every supported (w, a) pair, the weight-only (w, None) formats (linear
        layers) and FLOAT, where the target offers them."""
        return _offered(self.pairs, self.float_kinds, self.weight_only_bits, {kind})

    def runs(self, kind: LayerKind, w: int | None, a: int | None) -> bool:
        """Whether a layer of `kind` may run at (w, a) ((None, None): in float) on this target."""
        return (w, a) in self.formats(kind)

    def layer_cost(self, layer: Layer, w: int | None, a: int | None) -> dict[str, float]:
        """Every metric's value for one layer at (w, a) ((None, None): in float): the one evaluation path."""
        return {name: m.evaluate(layer, w, a) for name, m in self.metrics.items()}

    def chain_cost(self, layer: Layer, fmt: Pair, after: Pair) -> dict[str, float]:
        """Every metric's change for `layer` in `fmt` when the layer it reads back to back runs in `after`."""
        return {name: m.chain_delta(layer, fmt, after) for name, m in self.metrics.items()}

    @property
    def chained(self) -> bool:
        """Whether a layer's cost depends on the format of the layer it reads (some layer table has `chain`s)."""
        return any(m.chained for m in self.metrics.values())

    def model_cost(self) -> dict[str, float]:
        """Every metric's model-level constant (0 without CONSTANT terms), added once to a model's total."""
        return {name: m.constant for name, m in self.metrics.items()}

    def check_layers(self, layers: Iterable[Layer]) -> None:
        """Check that the per-layer tables describe exactly these layers (names and signatures).

        HardwareSpecError naming the file when a table lacks one of the layers, was measured on other shapes, or
        lists layers the model does not have (a file profiled on another model).
        """
        layers = list(layers)
        names = {layer.name for layer in layers}
        for m in self.metrics.values():
            for t in m.terms:
                if t.type is not TermType.LAYER_TABLE:
                    continue
                for layer in layers:
                    if layer.kind in t.kinds:
                        t.check_layer(layer)
                extra = [n for n in t.layers if n not in names]
                if extra:
                    shown = ", ".join(map(repr, extra[:5])) + (f", ... ({len(extra) - 5} more)" if len(extra) > 5
                                                               else "")
                    raise HardwareSpecError(
                        f"{t.origin}.layers: entries for {len(extra)} layer(s) this model does not have ({shown}): "
                        f"the file was measured on another model; profile this one (fxmpq profile)")


# --------------------------------------------------------------------------------------------- loading

_PACKAGE = "fxmpq.hardware_specs"


WEIGHT_ONLY_BITS = (2, 4, 8)  # the bit-widths the MatMulNBits lowering emits
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute


def _offered(pairs: tuple[Pair, ...], float_kinds: frozenset[LayerKind], weight_only_bits: tuple[int, ...],
             kinds: Iterable[LayerKind]) -> tuple[Pair, ...]:
    """The formats a layer of one of `kinds` may run as: the pairs, weight-only for linear layers, then float."""
    kinds = set(kinds)
    wo = tuple((w, None) for w in weight_only_bits) if LayerKind.LINEAR in kinds else ()
    return tuple(pairs) + wo + ((FLOAT,) if kinds & float_kinds else ())


def _weight_only_bits(t: Table, wbits: tuple[int, ...]) -> tuple[int, ...]:
    """[target] weight_only_bits: a subset of WEIGHT_ONLY_BITS and of weight_bits (the quantizer has their steps)."""
    values = t.take("weight_only_bits", list, [])
    for i, b in enumerate(values):
        check_bits(t, f"weight_only_bits[{i}]", b)
        if b not in WEIGHT_ONLY_BITS:
            raise t.fail(f"weight_only_bits[{i}]", f"{b}-bit weight-only layers have no lowering; MatMulNBits is "
                         f"emitted at {', '.join(map(str, WEIGHT_ONLY_BITS))} bits")
        if b not in wbits:
            raise t.fail(f"weight_only_bits[{i}]", f"{b} is not one of weight_bits {list(wbits)}")
    if len(set(values)) != len(values):
        raise t.fail("weight_only_bits", f"duplicate bit-widths in {values}")
    return tuple(sorted(values))




_PROVENANCE_STR = ("tool", "command", "date", "model", "input", "runtime", "cpu", "clock", "notes", "cpu_vendor")
_PROVENANCE_INT = ("batch", "threads", "repeats", "cpu_family", "cpu_model")


def _parse_provenance(p: Table) -> Provenance:
    kwargs: dict[str, Any] = {k: p.take(k, str, "") for k in _PROVENANCE_STR}
    for k in _PROVENANCE_INT:
        v = p.take(k, int, None)
        if v is not None and v < (0 if k.startswith("cpu_") else 1):
            raise p.fail(k, f"expected a {'non-negative' if k.startswith('cpu_') else 'positive'} integer, found {v}")
        kwargs[k] = v
    isa = p.take("isa", list, None)
    if isa is not None:
        bad = [i for i, f in enumerate(isa) if not isinstance(f, str)]
        if bad:
            raise p.fail(f"isa[{bad[0]}]", f"expected a feature name such as \"avx512_vnni\", found {brief(isa[bad[0]])}")
        kwargs["isa"] = tuple(isa)
    p.finish()
    return Provenance(**kwargs)


_WARNED: set[str] = set()


def _check_cpu(spec: HardwareSpec) -> None:
    """Warn once per file when it was profiled on a CPU whose int8 features differ from this machine's."""
    pv = spec.provenance
    if pv is None or pv.isa is None or spec.path in _WARNED:
        return
    here = cpu_info()
    if set(pv.isa) == set(here.features) and (not pv.cpu_vendor or pv.cpu_vendor == here.vendor):
        return
    _WARNED.add(spec.path)
    there = CpuInfo(pv.cpu_vendor or "?", pv.cpu_family, pv.cpu_model, pv.cpu or "?", tuple(pv.isa))
    log.warning("hardware %s was profiled on %s; this machine is %s: its measured latencies (int8 against float "
                "above all) may not hold here; `fxmpq profile` measures this one", spec.path, there.describe(),
                here.describe())


def parse_hardware(data: Mapping[str, Any], file: str = "<memory>") -> HardwareSpec:
    """Build a HardwareSpec from a parsed TOML document; any defect raises HardwareSpecError."""
    top = Table(data, "", file)
    tg = top.table("target")
    name = tg.take("name", str)
    description = tg.take("description", str, "")
    sources = tg.take("sources", list, [])
    for i, s in enumerate(sources):
        if not isinstance(s, str):
            raise tg.fail(f"sources[{i}]", f"expected a string, found {brief(s)}")
    wbits = bits_list(tg, "weight_bits")
    abits = bits_list(tg, "act_bits", MAX_ACT_BITS)
    raw_pairs = tg.take("pairs", list, None)
    if raw_pairs is None:
        pairs = tuple((w, a) for w in wbits for a in abits)
    else:
        parsed = []
        for i, p in enumerate(raw_pairs):
            key = f"pairs[{i}]"
            if not isinstance(p, list) or len(p) != 2:
                raise tg.fail(key, f"expected a [w_bits, a_bits] array, found {brief(p)}")
            w, a = check_bits(tg, key, p[0]), check_bits(tg, key, p[1], MAX_ACT_BITS)
            if w not in wbits or a not in abits:
                raise tg.fail(key, f"unsupported pair [{w}, {a}]: weight bits must be in {list(wbits)} "
                              f"and activation bits in {list(abits)}")
            parsed.append((w, a))
        if not parsed:
            raise tg.fail("pairs", "expected at least one [w_bits, a_bits] pair")
        if len(set(parsed)) != len(parsed):
            raise tg.fail("pairs", "duplicate pairs")
        pairs = tuple(sorted(parsed))
    share = tg.take("share_input_quantizer", bool, False)
    float_kinds = layer_kinds(tg, "float_kinds", tg.take("float_kinds", list, []))
    wo_bits = _weight_only_bits(tg, wbits)
    level = tg.take("matmul_nbits_accuracy_level", int, 4)
    if level not in ACCURACY_LEVELS:
        raise tg.fail("matmul_nbits_accuracy_level", f"expected one of {list(ACCURACY_LEVELS)} (ONNX Runtime's "
                      f"MatMulNBits accuracy_level), found {brief(level)}")
    tg.finish()

    def offer(kinds: Iterable[LayerKind]) -> tuple[Pair, ...]:
        return _offered(pairs, float_kinds, wo_bits, kinds)


    pt = top.table("pins", {})
    pins = Pins(
        first_layer=pt.take("first_layer", bool, True),
        last_layer=pt.take("last_layer", bool, True),
        w_bits=check_bits(pt, "w_bits", pt.take("w_bits", int, 8)),
        a_bits=check_bits(pt, "a_bits", pt.take("a_bits", int, 8), MAX_ACT_BITS),
        layers=tuple(pt.take("layers", list, [])),
    )
    for i, layer in enumerate(pins.layers):
        if not isinstance(layer, str):
            raise pt.fail(f"layers[{i}]", f"expected a layer name (string), found {brief(layer)}")
    pt.finish()
    pins_anything = pins.first_layer or pins.last_layer or bool(pins.layers)
    if pins_anything and pins.bits not in pairs:
        raise pt.fail(None, f"pinned bits w_bits = {pins.w_bits}, a_bits = {pins.a_bits} are not a supported "
                      f"pair; supported pairs: {', '.join(pair_name(p) for p in pairs)}")

    mt = top.table("metrics")
    if not mt.data:
        raise mt.fail(None, "expected at least one metric, e.g. [metrics.bitops]")
    metrics = {}
    for mname in mt.data:
        if not mname.isidentifier():
            raise mt.fail(mname, "a metric name must be an identifier (letters, digits, underscores), "
                          "since budgets name it: Budget(<metric>=...)")
        m = mt.table(mname)
        unit = m.take("unit", str, "")
        mdesc = m.take("description", str, "")
        raw_terms = m.take("terms", list)
        if not raw_terms:
            raise m.fail("terms", "expected a non-empty array of terms")
        terms = []
        for i, rt in enumerate(raw_terms):
            if not isinstance(rt, dict):
                raise m.fail(f"terms[{i}]", f"expected a table such as {{ type = \"bitops\" }}, found {brief(rt)}")
            terms.append(parse_term(Table(rt, f"{m.path}.terms[{i}]", file), offer))
        m.finish()
        metrics[mname] = Metric(name=mname, unit=unit, description=mdesc, terms=tuple(terms))
    pv = top.take("provenance", dict, None)
    provenance = _parse_provenance(Table(pv, "provenance", file)) if pv is not None else None
    top.finish()
    return HardwareSpec(name=name, description=description, sources=tuple(sources), weight_bits=wbits,
                        act_bits=abits, pairs=pairs, pins=pins, metrics=MappingProxyType(metrics),
                        share_input_quantizer=share, float_kinds=float_kinds, weight_only_bits=wo_bits,
                        matmul_nbits_accuracy_level=level, path=file, provenance=provenance)


# A generic target fitted per CPU: its name loads the variant fitted on a CPU with this machine's int8 features
# (else the nearest, with the warning any file measured on another CPU gives). Each variant is also a name.
PER_ISA = {"ort_cpu": ("ort_cpu_avx512_vnni_amx", "ort_cpu_avx512_vnni")}


def builtin_hardware() -> list[str]:
    """Names of the hardware descriptions shipped with fxmpq."""
    files = resources.files(_PACKAGE).iterdir()
    return sorted([f.name[:-5] for f in files if f.name.endswith(".toml")] + list(PER_ISA))


def _shipped(name: str) -> HardwareSpec:
    ref = resources.files(_PACKAGE) / f"{name}.toml"
    if not ref.is_file():
        raise HardwareSpecError(f"unknown hardware {name!r}: shipped targets are "
                                f"{', '.join(builtin_hardware())}; or give the path of a .toml file")
    return loads_hardware(ref.read_bytes(), f"{name}.toml (shipped)", check_cpu=False)


def _for_this_cpu(name: str) -> HardwareSpec:
    """The variant of a per-CPU target (PER_ISA) fitted on this machine's int8 features, else the nearest one
    (fewest features differing, then most shared)."""
    here = set(cpu_info().features)

    def distance(spec: HardwareSpec) -> tuple[int, int]:
        isa = set(spec.provenance.isa or ()) if spec.provenance else set()
        return len(isa ^ here), -len(isa & here)

    spec = min((_shipped(v) for v in PER_ISA[name]), key=distance)
    _check_cpu(spec)
    return spec


def load_hardware(name_or_path: str | Path | HardwareSpec) -> HardwareSpec:
    """Load a shipped description by name ("bitops") or a user's TOML file by path; strict schema."""
    if isinstance(name_or_path, HardwareSpec):
        return name_or_path
    if not isinstance(name_or_path, str | Path):
        raise HardwareSpecError(f"hardware must be a name, a path or a HardwareSpec, found {type(name_or_path).__name__}")
    text_path = str(name_or_path)
    p = Path(text_path)
    if p.suffix == ".toml" or p.exists() or "/" in text_path or "\\" in text_path:
        if p.is_dir():
            raise HardwareSpecError(f"{text_path}: is a directory, not a hardware description file (.toml)")
        if not p.is_file():
            raise HardwareSpecError(f"{text_path}: no such hardware description file")
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise HardwareSpecError(f"{text_path}: cannot read the hardware description file "
                                    f"({e.strerror or type(e).__name__})") from None
        file = str(p)
    elif text_path in PER_ISA:
        return _for_this_cpu(text_path)
    else:
        spec = _shipped(text_path)
        _check_cpu(spec)
        return spec
    return loads_hardware(raw, file)


def loads_hardware(raw: bytes | str, file: str = "<memory>", *, check_cpu: bool = True) -> HardwareSpec:
    """Parse the text of a hardware description; `file` names it in error messages. A file measured on a CPU
    whose int8 features differ from this machine's is warned about once (unless `check_cpu` is False)."""
    if not isinstance(raw, bytes | str):
        raise HardwareSpecError(f"{file}: expected the text of a TOML file (str or bytes), found {type(raw).__name__}")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        data = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise HardwareSpecError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise HardwareSpecError(f"{file}: invalid TOML: {e}") from None
    except RecursionError:
        raise HardwareSpecError(f"{file}: invalid TOML: arrays or tables nested too deeply") from None
    except (ValueError, OverflowError) as e:  # an integer of more than 4300 digits, a surrogate, ...
        reason = ("an integer has more digits than Python converts (4300)" if "digits" in str(e)
                  else first_line(e) or type(e).__name__)
        raise HardwareSpecError(f"{file}: invalid TOML: {reason}") from None
    try:
        spec = parse_hardware(data, file)
    except RecursionError:  # a value nested deep enough that printing it in a message recurses too far
        raise HardwareSpecError(f"{file}: a value is nested too deeply to be a hardware description") from None
    if check_cpu:
        _check_cpu(spec)
    return spec
