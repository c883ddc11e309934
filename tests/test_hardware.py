"""Tests of the hardware schema: the shipped targets, every HardwareSpecError message, and a TOML fuzz test."""

from __future__ import annotations

import copy
import logging
import math
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxmpq import HardwareSpec, HardwareSpecError, LayerKind, builtin_hardware, load_hardware
from fxmpq.hardware.spec import PER_ISA, LayerInfo, TermType, loads_hardware, parse_hardware

DOCS = Path(__file__).resolve().parents[1] / "docs" / "hardware.md"

BASE: dict[str, Any] = {
    "target": {
        "name": "toy",
        "description": "a toy target",
        "sources": ["made up"],
        "weight_bits": [4, 8],
        "act_bits": [4, 8],
    },
    "pins": {"first_layer": True, "last_layer": True, "w_bits": 8, "a_bits": 8, "layers": []},
    "metrics": {
        "bitops": {"unit": "BitOps", "terms": [{"type": "bitops"}]},
        "lat": {"unit": "us", "terms": [{"type": "table", "per": "mac", "scale": 2.0,
                                         "values": {"4x4": 0.25, "4x8": 0.5, "8x4": 0.5, "8x8": 1.0}}]},
    },
}


def _load(doc: dict[str, Any]) -> HardwareSpec:
    return loads_hardware(tomli_w.dumps(doc), "t.toml")


def _with(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """`base` (default BASE) with the value at dotted `path` replaced (or removed when value is DROP)."""
    doc = copy.deepcopy(BASE if base is None else base)
    *parents, last = _split(path)
    node = doc
    for p in parents:
        node = node[p]
    if value is DROP:
        del node[last]
    else:
        node[last] = value
    return doc


def _split(path: str) -> list[Any]:
    out: list[Any] = []
    for part in path.split("."):
        m = re.fullmatch(r"(\w+)\[(\d+)\]", part)
        out.extend([m[1], int(m[2])] if m else [part])
    return out


DROP = object()


# ------------------------------------------------------------------------------------------ shipped targets


def test_builtin_targets_are_listed_and_load():
    names = builtin_hardware()
    assert {"bitops", "bitfusion", "a100_int", "cortex_m"} <= set(names)
    for name in names:
        hw = load_hardware(name)
        file = min(PER_ISA.get(name, ()), key=lambda v: v != hw.name, default=name)  # a per-CPU name: its variant
        assert hw.name == file
        assert hw.sources, f"{name} cites no sources"
        assert hw.path == f"{file}.toml (shipped)"
        assert hw.supports(*hw.pins.bits)


def test_bitops_target():
    hw = load_hardware("bitops")
    assert hw.weight_bits == hw.act_bits == (2, 3, 4, 5, 6, 7, 8)
    assert len(hw.pairs) == 49
    assert hw.layer_cost(LayerInfo(LayerKind.CONV, 1000, 10), 3, 5) == {"bitops": 15000, "size": 30}


def test_bitfusion_target_follows_power_of_two_fusion():
    hw = load_hardware("bitfusion")
    us_per_mac = 1 / (512 * 500e6) * 1e6  # 512 Fusion Units at 500 MHz, one 8x8 MAC per unit per cycle
    lat = {pair: hw.layer_cost(LayerInfo(LayerKind.CONV, 1, 0), *pair)["latency"] for pair in hw.pairs}
    assert lat[(8, 8)] == pytest.approx(us_per_mac)
    for w, a in hw.pairs:  # the authors' simulator: perf factor int(8 / w) * int(8 / a)
        assert lat[(w, a)] == pytest.approx(us_per_mac / (int(8 / w) * int(8 / a)))
    assert lat[(2, 2)] == pytest.approx(us_per_mac / 16)
    assert lat[(3, 3)] == lat[(4, 4)] and lat[(5, 8)] == lat[(8, 8)]
    bricks = hw.layer_cost(LayerInfo(LayerKind.LINEAR, 10, 0), 3, 5)["bricks"]
    assert bricks == 10 * 2 * 3  # ceil(3/2) x ceil(5/2)
    assert hw.share_input_quantizer


def test_a100_target_runs_int4_and_int8_only():
    hw = load_hardware("a100_int")
    assert hw.pairs == ((4, 4), (8, 8))
    assert not hw.supports(4, 8) and not hw.supports(8, 4)
    c8 = hw.layer_cost(LayerInfo(LayerKind.CONV, 1e9, 1000), 8, 8)
    c4 = hw.layer_cost(LayerInfo(LayerKind.CONV, 1e9, 1000), 4, 4)
    assert c8["latency"] == pytest.approx(1e9 * 2 / 624e12 * 1e6)  # 624 dense INT8 TOPS
    assert c4["latency"] == pytest.approx(1e9 * 2 / 1248e12 * 1e6)  # 1248 dense INT4 TOPS
    assert c8["size"] == 1000 and c4["size"] == 500  # bytes


def test_cortex_m_target_is_weight_only():
    hw = load_hardware("cortex_m")
    assert hw.act_bits == (8,)
    assert hw.pairs == ((4, 8), (8, 8))
    assert hw.layer_cost(LayerInfo(LayerKind.DEPTHWISE_CONV, 5000, 1001), 4, 8) == {"flash": 1001 * 4 / 8, "macs": 5000}


def test_docs_examples_parse():
    text = DOCS.read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/hardware.md has no ```toml example"
    for i, block in enumerate(blocks):
        hw = loads_hardware(block, f"docs/hardware.md example {i}")
        assert hw.metrics


def test_base_document_is_valid():
    hw = _load(BASE)
    assert hw.pairs == ((4, 4), (4, 8), (8, 4), (8, 8))
    assert hw.layer_cost(LayerInfo(LayerKind.CONV, 10, 3), 4, 8) == {"bitops": 320, "lat": 10.0}
    assert hw.path == "t.toml"


def test_kinds_restrict_a_term_and_table_per_param_and_layer():
    doc = _with("metrics", {"m": {"terms": [
        {"type": "macs", "kinds": ["depthwise_conv"], "scale": 3},
        {"type": "params", "kinds": ["linear"]},
        {"type": "table", "per": "layer", "values": {"4x4": 1, "4x8": 2, "8x4": 3, "8x8": 4}},
        {"type": "table", "per": "param", "values": {"4x4": 0, "4x8": 0, "8x4": 0, "8x8": 10}},
    ]}})
    hw = _load(doc)
    assert hw.layer_cost(LayerInfo(LayerKind.DEPTHWISE_CONV, 100, 7), 4, 8)["m"] == 300 + 2
    assert hw.layer_cost(LayerInfo(LayerKind.LINEAR, 100, 7), 8, 8)["m"] == 7 + 4 + 70
    assert hw.layer_cost(LayerInfo(LayerKind.CONV, 100, 7), 4, 4)["m"] == 1


def test_table_per_activation_counts_the_input_elements_per_sample():
    """per = "activation": the layer's input elements per sample (batch excluded), what Q/DQ and layout ops touch."""
    doc = _with("metrics", {"m": {"terms": [{"type": "table", "per": "activation",
                                             "values": {"4x4": 1, "4x8": 2, "8x4": 3, "8x8": 4}}]}})
    hw = _load(doc)
    conv = LayerInfo(LayerKind.CONV, 100, 7, in_shape=(2, 3, 4, 5))
    assert hw.layer_cost(conv, 8, 8)["m"] == 4 * 60
    assert hw.layer_cost(LayerInfo(LayerKind.CONV, 100, 7), 4, 8)["m"] == 2  # no shapes given: 1 element


def test_table_chain_prices_a_format_boundary_per_input_element():
    """A table term's `chain[f][g]`: added per unit when the layer runs as f and the layer it reads back to back
    as g (a generic target's dequantize/quantize between float and integer layers); pairs not listed add 0."""
    doc = _with("metrics", {"m": {"terms": [{"type": "table", "per": "activation",
                                             "values": {"4x4": 1, "4x8": 2, "8x4": 3, "8x8": 4},
                                             "chain": {"8x8": {"4x4": 0.5, "8x4": -0.25}}}]}})
    hw = _load(doc)
    assert hw.chained and not _load(_with("metrics", {"m": {"terms": [{"type": "bitops"}]}})).chained
    conv2 = LayerInfo(LayerKind.CONV, 100, 7, name="conv2", in_shape=(1, 3, 4, 5), input_layer="conv1")
    assert hw.chain_cost(conv2, (8, 8), (4, 4)) == {"m": 0.5 * 60}
    assert hw.chain_cost(conv2, (8, 8), (8, 4)) == {"m": -0.25 * 60}
    assert hw.chain_cost(conv2, (8, 8), (8, 8)) == {"m": 0.0}  # not listed
    assert hw.chain_cost(conv2, (4, 8), (4, 4)) == {"m": 0.0}
    assert hw.layer_cost(conv2, 8, 8) == {"m": 4 * 60}  # the layer's own cost is unchanged
    bad = copy.deepcopy(doc)
    bad["metrics"]["m"]["terms"][0]["chain"] = {"2x2": {"8x8": 1}}
    with pytest.raises(HardwareSpecError, match=r"t.toml: metrics.m.terms\[0\].chain.2x2: format 2x2 has no value in "
                                                r"`values`: a chain prices a format the term prices"):
        _load(bad)
    bad["metrics"]["m"]["terms"][0]["chain"] = {"8x8": {"4x4": "slow"}}
    with pytest.raises(HardwareSpecError, match=r"chain.8x8.4x4: expected a number, found a string 'slow'"):
        _load(bad)


def test_ort_cpu_loads_the_variant_fitted_on_this_cpus_int8_features(monkeypatch, caplog):
    """`ort_cpu` is fitted per CPU: the name loads the variant whose recorded int8 features are this machine's,
    else the nearest one, with the warning any file measured on another CPU gives."""
    import fxmpq.hardware.spec as spec_mod
    from fxmpq.core.cpuinfo import CpuInfo

    variants = {v: load_hardware(v) for v in spec_mod.PER_ISA["ort_cpu"]}
    assert "ort_cpu" in builtin_hardware() and all(v in builtin_hardware() for v in variants)
    for name, hw in variants.items():
        pv = hw.provenance
        here = CpuInfo(pv.cpu_vendor, pv.cpu_family, pv.cpu_model, pv.cpu, tuple(pv.isa))
        monkeypatch.setattr(spec_mod, "cpu_info", lambda here=here: here)
        picked = load_hardware("ort_cpu")
        assert picked.path == f"{name}.toml (shipped)" and picked.name == name and picked.chained
    zen1 = CpuInfo("AuthenticAMD", 23, 1, "AMD EPYC 7571", ("avx2",))  # AVX2 only: the nearest is without AMX
    monkeypatch.setattr(spec_mod, "cpu_info", lambda: zen1)
    spec_mod._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="fxmpq.hardware.spec"):
        picked = load_hardware("ort_cpu")
    assert picked.path == "ort_cpu_avx512_vnni.toml (shipped)"
    assert "this machine is AMD EPYC 7571 (AuthenticAMD family 23 model 1; avx2)" in caplog.text
    spec_mod._WARNED.clear()


def test_explicit_pairs_and_pins_off():
    doc = _with("target.pairs", [[8, 8], [4, 8]])
    doc["pins"] = {"first_layer": False, "last_layer": False, "w_bits": 2, "a_bits": 2}
    del doc["metrics"]["lat"]
    hw = _load(doc)
    assert hw.pairs == ((4, 8), (8, 8))  # sorted
    assert not hw.pins.first_layer and hw.pins.bits == (2, 2)  # pins unused, so any bits are accepted


# ------------------------------------------------------------------------------------------ every message

ALLOWED_TARGET = ("act_bits, description, float_kinds, matmul_nbits_accuracy_level, name, pairs, share_input_quantizer, "
                  "sources, weight_bits, weight_only_bits")

CASES = [
    ("target", DROP, "t.toml: target: missing required field"),
    ("target.name", DROP, "t.toml: target.name: missing required field"),
    ("target.name", 3, "t.toml: target.name: expected a string, found an integer 3"),
    ("target.weight_bits", "4", "t.toml: target.weight_bits: expected an array, found a string '4'"),
    ("target.share_input_quantizer", 1,
     "t.toml: target.share_input_quantizer: expected a boolean, found an integer 1"),
    ("target.colour", "red",
     f"t.toml: target: unknown key(s) 'colour'; allowed: {ALLOWED_TARGET}"),
    ("extra", {"a": 1}, "t.toml: <top level>: unknown key(s) 'extra'; allowed: metrics, pins, provenance, target"),
    ("target.weight_bits", [], "t.toml: target.weight_bits: expected a non-empty array of bit-widths"),
    ("target.act_bits", [4, 4], "t.toml: target.act_bits: duplicate bit-widths in [4, 4]"),
    ("target.weight_bits", [4, 2.5], "t.toml: target.weight_bits[1]: expected an integer bit-width, found 2.5"),
    ("target.weight_bits", [4, True], "t.toml: target.weight_bits[1]: expected an integer bit-width, found True"),
    ("target.weight_bits", [4, 9], "t.toml: target.weight_bits[1]: bit-width 9 outside 1..8"),
    ("target.act_bits", [0, 8], "t.toml: target.act_bits[0]: bit-width 0 outside 1..16"),
    ("target.sources", ["ok", 5], "t.toml: target.sources[1]: expected a string, found 5"),
    ("target.pairs", [[4, 4], [8]], "t.toml: target.pairs[1]: expected a [w_bits, a_bits] array, found [8]"),
    ("target.pairs", [[4, 4], 8], "t.toml: target.pairs[1]: expected a [w_bits, a_bits] array, found 8"),
    ("target.pairs", [[4, 4], [8, 17]], "t.toml: target.pairs[1]: bit-width 17 outside 1..16"),
    ("target.pairs", [[4, 4], [16, 8]], "t.toml: target.pairs[1]: bit-width 16 outside 1..8"),
    ("target.pairs", [[4, 4], [2, 8]],
     "t.toml: target.pairs[1]: unsupported pair [2, 8]: weight bits must be in [4, 8] and activation bits in [4, 8]"),
    ("target.pairs", [], "t.toml: target.pairs: expected at least one [w_bits, a_bits] pair"),
    ("target.pairs", [[4, 4], [4, 4], [8, 8]], "t.toml: target.pairs: duplicate pairs"),
    ("pins", "yes", "t.toml: pins: expected a table, found a string 'yes'"),
    ("pins.w_bits", 12, "t.toml: pins.w_bits: bit-width 12 outside 1..8"),
    ("pins.a_bits", "8", "t.toml: pins.a_bits: expected an integer, found a string '8'"),
    ("pins.first_layer", "true", "t.toml: pins.first_layer: expected a boolean, found a string 'true'"),
    ("pins.layers", ["conv1", 2], "t.toml: pins.layers[1]: expected a layer name (string), found 2"),
    ("pins.last", True,
     "t.toml: pins: unknown key(s) 'last'; allowed: a_bits, first_layer, last_layer, layers, w_bits"),
    ("pins.w_bits", 2,
     "t.toml: pins: pinned bits w_bits = 2, a_bits = 8 are not a supported pair; supported pairs: "
     "4x4, 4x8, 8x4, 8x8"),
    ("metrics", DROP, "t.toml: metrics: missing required field"),
    ("metrics", {}, "t.toml: metrics: expected at least one metric, e.g. [metrics.bitops]"),
    ("metrics", {"my-metric": {"terms": [{"type": "macs"}]}},
     "t.toml: metrics.my-metric: a metric name must be an identifier (letters, digits, underscores), "
     "since budgets name it: Budget(<metric>=...)"),
    ("metrics.bitops", 5, "t.toml: metrics.bitops: expected a table, found an integer 5"),
    ("metrics.bitops.terms", DROP, "t.toml: metrics.bitops.terms: missing required field"),
    ("metrics.bitops.terms", [], "t.toml: metrics.bitops.terms: expected a non-empty array of terms"),
    ("metrics.bitops.terms", ["bitops"],
     't.toml: metrics.bitops.terms[0]: expected a table such as { type = "bitops" }, found \'bitops\''),
    ("metrics.bitops.formula", "w*a",
     "t.toml: metrics.bitops: unknown key(s) 'formula'; allowed: description, terms, unit"),
    ("metrics.bitops.unit", 1, "t.toml: metrics.bitops.unit: expected a string, found an integer 1"),
    ("metrics.bitops.terms[0].type", "w*a*macs",
     "t.toml: metrics.bitops.terms[0].type: unknown term type 'w*a*macs'; expected one of "
     "bitops, weight_bits, bricks, table, macs, params, layer_table, constant"),
    ("metrics.bitops.terms[0].type", DROP, "t.toml: metrics.bitops.terms[0].type: missing required field"),
    ("metrics.bitops.terms[0].scale", -1, "t.toml: metrics.bitops.terms[0].scale: expected a finite "
                                          "non-negative number, found -1.0"),
    ("metrics.bitops.terms[0].scale", math.inf, "t.toml: metrics.bitops.terms[0].scale: expected a finite "
                                                "non-negative number, found inf"),
    ("metrics.bitops.terms[0].scale", "2", "t.toml: metrics.bitops.terms[0].scale: expected a number, "
                                           "found a string '2'"),
    ("metrics.bitops.terms[0].kinds", ["conv", "lstm"],
     "t.toml: metrics.bitops.terms[0].kinds[1]: unknown layer kind 'lstm'; expected one of "
     "conv, depthwise_conv, linear, matmul"),
    ("metrics.bitops.terms[0].eval", "1+1",
     "t.toml: metrics.bitops.terms[0]: unknown key(s) 'eval'; allowed: kinds, scale, type"),
    ("metrics.bitops.terms[0]", {"type": "bricks"},
     "t.toml: metrics.bitops.terms[0].brick_bits: missing required field"),
    ("metrics.bitops.terms[0]", {"type": "bricks", "brick_bits": 0},
     "t.toml: metrics.bitops.terms[0].brick_bits: brick width 0 outside 1..8"),
    ("metrics.bitops.terms[0]", {"type": "bitops", "brick_bits": 2},
     "t.toml: metrics.bitops.terms[0]: unknown key(s) 'brick_bits'; allowed: kinds, scale, type"),
    ("metrics.lat.terms[0].per", "tile",
     "t.toml: metrics.lat.terms[0].per: expected one of mac, param, layer, activation, found 'tile'"),
    ("metrics.lat.terms[0].values", DROP, "t.toml: metrics.lat.terms[0].values: missing required field"),
    ("metrics.lat.terms[0].values", {"4x4": 1, "4x8": 1, "8x4": 1, "8by8": 1},
     't.toml: metrics.lat.terms[0].values.8by8: expected a pair key "WxA" such as "4x8" '
     "(weight bits x activation bits)"),
    ("metrics.lat.terms[0].values", {"4x4": 1, "4x8": 1, "8x4": 1, "²x8": 1},
     't.toml: metrics.lat.terms[0].values.²x8: expected a pair key "WxA" such as "4x8" '
     "(weight bits x activation bits)"),
    ("metrics.lat.terms[0].values", {"4x4": 1, "4x8": 1, "8x4": 1, "8x8": 1, "16x8": 1},
     "t.toml: metrics.lat.terms[0].values.16x8: bit-width 16 outside 1..8"),
    ("metrics.lat.terms[0].values", {"4x4": 1, "4x8": 1, "8x4": 1, "8x8": -2},
     "t.toml: metrics.lat.terms[0].values.8x8: expected a finite non-negative number, found -2.0"),
    ("metrics.lat.terms[0].values", {"4x4": 1, "4x8": 1, "8x4": 1, "8x8": "fast"},
     "t.toml: metrics.lat.terms[0].values.8x8: expected a number, found a string 'fast'"),
    ("metrics.lat.terms[0].values", {"4x4": 1, "8x8": 1},
     "t.toml: metrics.lat.terms[0].values: no value for supported pair(s) 4x8, 8x4"),
]


@pytest.mark.parametrize(("path", "value", "message"), CASES, ids=[c[2][7:60] for c in CASES])
def test_every_schema_error_names_file_and_key_path(path, value, message):
    with pytest.raises(HardwareSpecError) as exc:
        _load(_with(path, value))
    assert str(exc.value) == message


def test_invalid_toml_and_encoding():
    with pytest.raises(HardwareSpecError, match=r"^t\.toml: invalid TOML: Expected '=' after a key"):
        loads_hardware("[target]\nname 'x'\n", "t.toml")
    with pytest.raises(HardwareSpecError) as exc:
        loads_hardware(b"\xff\xfe[target]", "t.toml")
    assert str(exc.value) == "t.toml: not UTF-8 text (invalid start byte at byte 0)"


def test_load_hardware_by_path_and_errors(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(tomli_w.dumps(BASE))
    assert load_hardware(f).name == "toy"
    assert load_hardware(str(f)).path == str(f)
    hw = load_hardware("bitops")
    assert load_hardware(hw) is hw
    with pytest.raises(HardwareSpecError) as exc:
        load_hardware(tmp_path / "missing.toml")
    assert str(exc.value) == f"{tmp_path / 'missing.toml'}: no such hardware description file"
    with pytest.raises(HardwareSpecError) as exc:
        load_hardware("tpu9000")
    assert str(exc.value) == (f"unknown hardware 'tpu9000': shipped targets are {', '.join(builtin_hardware())}; "
                              f"or give the path of a .toml file")
    with pytest.raises(HardwareSpecError) as exc:
        load_hardware(42)  # type: ignore[arg-type]
    assert str(exc.value) == "hardware must be a name, a path or a HardwareSpec, found int"
    bad = tmp_path / "bad.toml"
    bad.write_text(tomli_w.dumps(_with("target.act_bits", [17])))
    with pytest.raises(HardwareSpecError) as exc:
        load_hardware(bad)
    assert str(exc.value) == f"{bad}: target.act_bits[0]: bit-width 17 outside 1..16"


def test_spec_is_frozen():
    hw = load_hardware("bitops")
    with pytest.raises(AttributeError):
        hw.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        hw.metrics["x"] = None  # type: ignore[index]
    assert hw.metrics["bitops"].terms[0].type is TermType.BITOPS


def test_metric_defined_at_tables_only_for_listed_pairs():
    hw = _load(BASE)
    assert hw.metrics["bitops"].defined_at(32, 32)
    assert hw.metrics["lat"].defined_at(4, 8)
    assert not hw.metrics["lat"].defined_at(32, 32)


# ------------------------------------------------------------------------------------------ fuzzing

SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-3, max_value=40),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["conv", "linear", "depthwise_conv", "bitops", "bricks", "table", "mac", "param", "layer",
                     "4x8", "8x8", "x", "weight_bits", "macs", "params"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)),
    max_leaves=8,
)
KEYS = st.one_of(
    st.sampled_from(["name", "weight_bits", "act_bits", "pairs", "pins", "metrics", "terms", "type", "scale",
                     "kinds", "brick_bits", "per", "values", "w_bits", "a_bits", "layers", "first_layer",
                     "unit", "4x4", "8x8", "2x2"]),
    st.text(max_size=6),
)
SHIPPED = Path(__file__).resolve().parents[1] / "hardware"
SEEDS = [BASE, *(tomllib.loads(f.read_text()) for f in sorted(SHIPPED.glob("*.toml")))]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_documents(draw) -> dict[str, Any]:
    doc = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        parent: Any = doc
        for p in path[:-1]:
            parent = parent[p]
        node = parent[path[-1]] if path else doc
        action = draw(st.sampled_from(["drop", "replace", "add", "bits"]))
        if action == "drop" and path:
            del parent[path[-1]]
        elif action == "replace" and path:
            parent[path[-1]] = draw(VALUES)
        elif action == "add" and isinstance(node, dict):
            node[draw(KEYS)] = draw(VALUES)
        elif action == "add" and isinstance(node, list):
            node.append(draw(VALUES))
        elif action == "bits" and path:
            parent[path[-1]] = draw(st.one_of(st.integers(-2, 12), st.lists(st.integers(-2, 12), max_size=4),
                                              st.lists(st.lists(st.integers(-2, 12), max_size=3), max_size=3)))
    return doc


def _render(doc: dict[str, Any]) -> str | None:
    try:
        return tomli_w.dumps(doc)
    except (TypeError, ValueError):  # e.g. a top-level value that TOML cannot express
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_documents())
def test_fuzz_mutated_documents_load_or_raise_hardware_spec_error(doc):
    text = _render(doc)
    if text is None:
        result = None
        try:
            result = parse_hardware(doc, "fuzz.toml")
        except HardwareSpecError:
            return
        assert isinstance(result, HardwareSpec)
        return
    try:
        hw = loads_hardware(text, "fuzz.toml")
    except HardwareSpecError as e:
        assert str(e).startswith("fuzz.toml: ")
        return
    assert isinstance(hw, HardwareSpec)
    for w, a in hw.pairs:  # a valid spec prices every pair it claims to support
        for layer in _priced_layers(hw):
            try:
                cost = hw.layer_cost(layer, w, a)
            except HardwareSpecError as e:  # a layer one per-layer table has and another lacks
                assert str(e).startswith("fuzz.toml: ")
                continue
            for name, value in cost.items():
                assert value >= 0 and math.isfinite(value), name


def _priced_layers(hw: HardwareSpec) -> list[LayerInfo]:
    """A generic conv, or the layers a per-layer table describes (its names and signatures)."""
    entries = {n: e for m in hw.metrics.values() for t in m.terms if t.type is TermType.LAYER_TABLE
               for n, e in t.layers.items()}
    if not entries:
        return [LayerInfo(LayerKind.CONV, 100, 10)]

    def dims(text: str) -> tuple[int, ...]:
        return tuple(int(d) for d in text.split("x"))

    out = []
    for n, e in entries.items():
        i, o = e.signature.shape.split("->")
        out.append(LayerInfo(e.signature.kind, 100, 10, name=n, weight_shape=dims(e.signature.weight),
                             in_shape=dims(i), out_shape=dims(o)))
    return out


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=64), st.text(max_size=64)))
def test_fuzz_raw_text_loads_or_raises_hardware_spec_error(raw):
    try:
        hw = loads_hardware(raw, "raw.toml")
    except HardwareSpecError:
        return
    assert isinstance(hw, HardwareSpec)


# ------------------------------------------------------------------------------------------ measured terms

MEASURED: dict[str, Any] = {
    "target": {"name": "ort", "weight_bits": [8], "act_bits": [8], "pairs": [[8, 8]], "float_kinds": ["conv"]},
    "pins": {"first_layer": False, "last_layer": False},
    "metrics": {"latency": {"unit": "ms", "terms": [
        {"type": "constant", "value": -0.5},
        {"type": "layer_table", "layers": {
            "conv1": {"kind": "conv", "shape": "1x3x16x16->1x8x16x16", "weight": "8x3x3x3", "8x8": 1.0, "float": 2.0},
            "conv2": {"kind": "conv", "shape": "1x8x16x16->1x16x8x8", "weight": "16x8x3x3", "8x8": 0.5, "float": 1.0,
                      "after": "conv1", "chain": {"8x8": {"8x8": -0.125, "float": 0.0},
                                                  "float": {"8x8": 0.01, "float": -0.0625}}},
            "fc": {"kind": "linear", "shape": "1x16->1x10", "weight": "10x16", "8x8": 0.25}}},
    ]}},
    "provenance": {"tool": "tools/profile_hw.py", "model": "toy", "input": "3x16x16", "batch": 1, "threads": 1,
                   "clock": "thread_cpu", "repeats": 20},
}
CONV1 = LayerInfo(LayerKind.CONV, 3456, 224, name="conv1", weight_shape=(8, 3, 3, 3), in_shape=(1, 3, 16, 16),
                  out_shape=(1, 8, 16, 16))


def _measured(path: str, value: Any) -> dict[str, Any]:
    return _with(path, value, MEASURED)


def test_layer_table_and_constant_terms():
    hw = _load(MEASURED)
    lat = hw.metrics["latency"]
    assert lat.constant == -0.5 and hw.model_cost() == {"latency": -0.5}
    assert hw.layer_cost(CONV1, 8, 8) == {"latency": 1.0}
    assert hw.layer_cost(CONV1, None, None) == {"latency": 2.0}
    assert not lat.defined_at(32, 32)  # measured per layer: no 32-bit reference
    assert hw.provenance.threads == 1 and hw.provenance.clock == "thread_cpu" and hw.provenance.model == "toy"
    t = lat.terms[1]
    assert t.type is TermType.LAYER_TABLE and t.origin == "t.toml: metrics.latency.terms[1]"


def test_layer_table_refuses_other_shapes_missing_layers_and_formats():
    hw = _load(MEASURED)
    other = LayerInfo(LayerKind.CONV, 1, 1, name="conv1", weight_shape=(8, 3, 3, 3), in_shape=(1, 3, 32, 32),
                      out_shape=(1, 8, 32, 32))
    with pytest.raises(HardwareSpecError) as exc:
        hw.layer_cost(other, 8, 8)
    assert str(exc.value).startswith(
        "t.toml: metrics.latency.terms[1].layers.conv1: measured on conv 1x3x16x16->1x8x16x16, weight 8x3x3x3, but "
        "this model's layer is conv 1x3x32x32->1x8x32x32, weight 8x3x3x3: the file was profiled on another model or "
        "input shape")
    with pytest.raises(HardwareSpecError, match=r"t.toml: metrics.latency.terms\[1\].layers: no entry for layer "
                                                r"'layer9.conv' \(conv 1x3x16x16->1x8x16x16"):
        hw.layer_cost(LayerInfo(**{**CONV1.__dict__, "name": "layer9.conv"}), 8, 8)
    with pytest.raises(HardwareSpecError, match=r"layers.conv1: no value for layer 'conv1' as W4A8; the file prices "
                                                r"W8A8, float"):
        hw.layer_cost(CONV1, 4, 8)
    with pytest.raises(HardwareSpecError, match=r"layers: entries for 2 layer\(s\) this model does not have "
                                                r"\('conv2', 'fc'\)"):
        hw.check_layers([CONV1])


def test_layer_table_chain_applies_when_the_layer_read_runs_in_the_same_format():
    hw = _load(MEASURED)
    assert hw.chained and not load_hardware("bitops").chained
    conv2 = LayerInfo(LayerKind.CONV, 1, 1, name="conv2", weight_shape=(16, 8, 3, 3), in_shape=(1, 8, 16, 16),
                      out_shape=(1, 16, 8, 8), input_layer="conv1")
    int8, flt = (8, 8), (None, None)
    assert hw.chain_cost(conv2, int8, int8) == {"latency": -0.125}
    assert hw.chain_cost(conv2, flt, flt) == {"latency": -0.0625}
    assert hw.chain_cost(conv2, flt, int8) == {"latency": 0.01}  # [own format][format of the layer it reads]
    assert hw.chain_cost(CONV1, int8, int8) == {"latency": 0.0}
    with pytest.raises(HardwareSpecError) as exc:
        hw.layer_cost(LayerInfo(**{**conv2.__dict__, "input_layer": None}), 8, 8)
    assert str(exc.value).startswith("t.toml: metrics.latency.terms[1].layers.conv2.after: measured reading layer "
                                     "'conv1' back to back, but in this model it reads no layer back to back")


MEASURED_CASES = [
    ("metrics.latency.terms[0].value", DROP, "t.toml: metrics.latency.terms[0].value: missing required field"),
    ("metrics.latency.terms[0].value", math.nan,
     "t.toml: metrics.latency.terms[0].value: expected a finite number, found nan"),
    ("metrics.latency.terms[0].kinds", ["conv"],
     "t.toml: metrics.latency.terms[0]: unknown key(s) 'kinds'; allowed: scale, type, value"),
    ("metrics.latency.terms[1].layers", DROP, "t.toml: metrics.latency.terms[1].layers: missing required field"),
    ("metrics.latency.terms[1].layers", {},
     "t.toml: metrics.latency.terms[1].layers: expected at least one layer entry"),
    ("metrics.latency.terms[1].per", "mac",
     "t.toml: metrics.latency.terms[1]: unknown key(s) 'per'; allowed: layers, scale, type"),
    ("metrics.latency.terms[1].layers.conv1.float", DROP,
     "t.toml: metrics.latency.terms[1].layers.conv1: no value for format(s) float, which the target offers a conv "
     "layer"),
    ("metrics.latency.terms[1].layers.fc.8x8", DROP,
     "t.toml: metrics.latency.terms[1].layers.fc: no value for format(s) 8x8, which the target offers a linear layer"),
    ("metrics.latency.terms[1].layers.conv1.shape", "3x16x16",
     't.toml: metrics.latency.terms[1].layers.conv1.shape: expected "INPUT->OUTPUT" shapes with the batch first, '
     "such as \"1x64x56x56->1x64x56x56\", found '3x16x16'"),
    ("metrics.latency.terms[1].layers.conv1.shape", 3,
     "t.toml: metrics.latency.terms[1].layers.conv1.shape: expected a string, found an integer 3"),
    ("metrics.latency.terms[1].layers.conv1.weight", "8x3x3xk",
     't.toml: metrics.latency.terms[1].layers.conv1.weight: expected the weight shape such as "64x64x3x3", found '
     "'8x3x3xk'"),
    ("metrics.latency.terms[1].layers.conv1.kind", "lstm",
     "t.toml: metrics.latency.terms[1].layers.conv1.kind: unknown layer kind 'lstm'; expected one of conv, "
     "depthwise_conv, linear, matmul"),
    ("metrics.latency.terms[1].layers.conv1.kind", DROP,
     "t.toml: metrics.latency.terms[1].layers.conv1.kind: missing required field"),
    ("metrics.latency.terms[1].layers.conv1.8x8", "fast",
     "t.toml: metrics.latency.terms[1].layers.conv1.8x8: expected a number, found a string 'fast'"),
    ("metrics.latency.terms[1].layers.conv1.8x8", -1,
     "t.toml: metrics.latency.terms[1].layers.conv1.8x8: expected a finite non-negative number, found -1.0"),
    ("metrics.latency.terms[1].layers.conv1.colour", "red",
     "t.toml: metrics.latency.terms[1].layers.conv1: unknown key(s) 'colour'; allowed: 8x8, after, chain, float, "
     "kind, shape, weight"),
    ("metrics.latency.terms[1].layers.fc.chain", {"8x8": -0.1},
     "t.toml: metrics.latency.terms[1].layers.fc.chain: a chain needs `after`, the layer this one reads back to back"),
    ("metrics.latency.terms[1].layers.fc.after", 3,
     "t.toml: metrics.latency.terms[1].layers.fc.after: expected a string, found an integer 3"),
    ("metrics.latency.terms[1].layers.conv2.chain", {"8x8": {"8x8": -0.1, "float": 0}},
     "t.toml: metrics.latency.terms[1].layers.conv2.chain: no value for format(s) float, which the target offers a "
     "conv layer"),
    ("metrics.latency.terms[1].layers.conv2.chain", {"8x8": {"8x8": -0.1}, "float": {"8x8": 0, "float": 0}},
     "t.toml: metrics.latency.terms[1].layers.conv2.chain.8x8: no value for format(s) float of 'conv1', the layer "
     "it reads"),
    ("metrics.latency.terms[1].layers.conv2.chain", {"8x8": {"8x8": -0.1, "float": math.inf}, "float": {}},
     "t.toml: metrics.latency.terms[1].layers.conv2.chain.8x8.float: expected a finite number, found inf"),
    ("metrics.latency.terms[1].layers.conv2.chain", {"8x8": -0.1},
     "t.toml: metrics.latency.terms[1].layers.conv2.chain.8x8: expected a table, found a number -0.1"),
    ("metrics.latency.terms[1].layers.conv2.chain", {"fp16": {}},
     't.toml: metrics.latency.terms[1].layers.conv2.chain.fp16: expected a pair key "WxA" such as "4x8" (weight bits '
     "x activation bits)"),
    ("metrics.latency.terms[1].layers.conv2.after", "stem",
     "t.toml: metrics.latency.terms[1].layers.conv2.after: names no layer of this table ('stem')"),
    ("metrics.latency.terms[1].layers.conv1", 1.0,
     "t.toml: metrics.latency.terms[1].layers.conv1: expected a table, found a number 1.0"),
    ("provenance.threads", 0, "t.toml: provenance.threads: expected a positive integer, found 0"),
    ("provenance.threads", "1", "t.toml: provenance.threads: expected an integer, found a string '1'"),
    ("provenance.host", "x",
     "t.toml: provenance: unknown key(s) 'host'; allowed: batch, clock, command, cpu, cpu_family, cpu_model, "
     "cpu_vendor, date, input, isa, model, notes, repeats, runtime, threads, tool"),
    ("provenance.isa", ["avx2", 3], 't.toml: provenance.isa[1]: expected a feature name such as "avx512_vnni", '
     "found 3"),
]


@pytest.mark.parametrize(("path", "value", "message"), MEASURED_CASES, ids=[c[2][7:60] for c in MEASURED_CASES])
def test_every_measured_term_error_names_file_and_key_path(path, value, message):
    with pytest.raises(HardwareSpecError) as exc:
        _load(_measured(path, value))
    assert str(exc.value) == message


@pytest.mark.parametrize("path", ["metrics.latency.terms[1].layers.conv1.8x8", "metrics.latency.terms[0].value",
                                  "metrics.latency.terms[1].layers.conv2.chain.8x8.float"])
def test_an_integer_too_large_for_a_float_names_file_and_key_path(path):
    """10**400 is a valid TOML integer that float() refuses (OverflowError): a HardwareSpecError naming the key."""
    with pytest.raises(HardwareSpecError) as exc:
        _load(_measured(path, 10**400))
    assert str(exc.value).startswith(f"t.toml: {path}: expected a finite "), str(exc.value)
    assert str(exc.value).endswith("found an integer of about 401 digits")


def test_a_profile_from_another_cpu_warns_once_naming_both(monkeypatch, caplog):
    """A measured file records the CPU's int8 features; used where they differ, it warns (once per file), naming
    both CPUs; on the same CPU, or a file without them (hand-written), it stays quiet."""
    import logging

    from fxmpq.core.cpuinfo import CpuInfo
    from fxmpq.hardware import spec

    here = CpuInfo("AuthenticAMD", 23, 1, "AMD EPYC 7571", ("avx2",))
    monkeypatch.setattr(spec, "cpu_info", lambda: here)
    monkeypatch.setattr(spec, "_WARNED", set())
    prov = {**MEASURED["provenance"], "cpu": "Intel Xeon", "cpu_vendor": "GenuineIntel", "cpu_family": 6,
            "cpu_model": 143, "isa": ["avx2", "avx512f", "avx512_vnni", "amx_int8"]}
    with caplog.at_level(logging.WARNING, logger="fxmpq.hardware.spec"):
        hw = _load(_with("provenance", prov, MEASURED))
        _load(_with("provenance", prov, MEASURED))
    assert hw.provenance.isa == ("avx2", "avx512f", "avx512_vnni", "amx_int8") and hw.provenance.cpu_model == 143
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1
    assert ("profiled on Intel Xeon (GenuineIntel family 6 model 143; avx2, avx512f, avx512_vnni, amx_int8); this "
            "machine is AMD EPYC 7571 (AuthenticAMD family 23 model 1; avx2)") in warned[0]
    caplog.clear()
    monkeypatch.setattr(spec, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="fxmpq.hardware.spec"):
        _load(_with("provenance", {**prov, "cpu_vendor": "AuthenticAMD", "isa": ["avx2"]}, MEASURED))
        _load(MEASURED)
    assert not caplog.records
