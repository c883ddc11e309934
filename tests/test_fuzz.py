"""Fuzzing the four readers of user text: hardware TOML, budget strings, indicators JSON and policy JSON.

Whatever the input (random bytes, random text, or a valid document with random keys and values put in), a reader
either returns its value or raises an FxmpqError subclass: no ValueError, RecursionError, OverflowError,
UnicodeDecodeError or KeyError escapes. The default run tries 50 examples per reader; `-m slow` tries thousands.
"""

from __future__ import annotations

import copy
import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch
from _quant_models import TinyNet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxmpq
from fxmpq import Budget, FxmpqError, Indicators, Policy
from fxmpq.hardware.spec import loads_hardware

ROOT = Path(__file__).resolve().parent.parent
FEW, MANY = 50, 3000
_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}

# --------------------------------------------------------------------------------------------- value strategies
_KEYS = st.sampled_from(["target", "name", "weight_bits", "act_bits", "pairs", "pins", "metrics", "terms", "type",
                         "scale", "kinds", "values", "per", "brick_bits", "unit", "w_bits", "a_bits", "layers",
                         "first_layer", "float_kinds", "4x4", "float", "bitops", "size", "layers", "weight", "act",
                         "candidate_bits", "format", "w", "a", "2", "4", "8", "conv2", "conv3"]) | st.text(max_size=8)
_SCALARS = (st.integers(min_value=-(10**400), max_value=10**400) | st.integers(-3, 40)
            | st.floats(allow_nan=True, allow_infinity=True) | st.booleans() | st.text(max_size=12))
_JSON_SCALARS = (st.none() | st.integers(min_value=-(10**400), max_value=10**400) | st.integers(-3, 40)
                 | st.floats(allow_nan=True, allow_infinity=True) | st.booleans() | st.text(max_size=12))


def _tree(scalars: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
                        max_leaves=12)


TOML_VALUES = _tree(_SCALARS)
JSON_VALUES = _tree(_JSON_SCALARS)


def _mutate(doc: Any, data: st.DataObject, values: st.SearchStrategy[Any], rounds: int = 3) -> Any:
    """`doc` with a few random edits: a value replaced, a key added, a key deleted (at random paths)."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, rounds), label="edits")):
        node, path = doc, []
        while isinstance(node, dict | list) and node and data.draw(st.booleans(), label="deeper"):
            key = data.draw(st.sampled_from(sorted(node, key=str) if isinstance(node, dict) else range(len(node))))
            if not isinstance(node[key], dict | list):
                break
            node, path = node[key], [*path, key]
        edit = data.draw(st.sampled_from(["replace", "add", "delete"]), label="edit")
        if isinstance(node, dict):
            if edit == "add" or not node:
                node[data.draw(_KEYS, label="new key")] = data.draw(values, label="new value")
            else:
                key = data.draw(st.sampled_from(sorted(node, key=str)), label="key")
                if edit == "delete":
                    del node[key]
                else:
                    node[key] = data.draw(values, label="value")
        elif isinstance(node, list):
            if edit == "add" or not node:
                node.append(data.draw(values, label="new item"))
            else:
                i = data.draw(st.integers(0, len(node) - 1), label="index")
                if edit == "delete":
                    node.pop(i)
                else:
                    node[i] = data.draw(values, label="item")
    return doc


def _only_fxmpq_errors(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except FxmpqError:
        pass


def _both(prop: Callable[..., None], *strategies: st.SearchStrategy[Any]) -> tuple[Any, Any]:
    """The property as a default-run test (FEW examples) and as a slow test (MANY examples)."""
    few = settings(max_examples=FEW, **_SETTINGS)(given(*strategies)(prop))
    many = pytest.mark.slow(settings(max_examples=MANY, **_SETTINGS)(given(*strategies)(prop)))
    return few, many


# --------------------------------------------------------------------------------------------- hardware TOML
_HARDWARE = {p.stem: tomllib.loads(p.read_text()) for p in sorted((ROOT / "hardware").glob("*.toml"))}


def _toml_text(doc: Any) -> str | None:
    try:
        return tomli_w.dumps(doc)
    except (TypeError, ValueError):  # not a TOML document (a top-level list, a null, an unserialisable key)
        return None


def _hardware_doc(data: st.DataObject) -> None:
    base = _HARDWARE[data.draw(st.sampled_from(sorted(_HARDWARE)), label="hardware")]
    text = _toml_text(_mutate(base, data, TOML_VALUES))
    if text is not None:
        _only_fxmpq_errors(lambda: loads_hardware(text, "fuzz.toml"))
        _only_fxmpq_errors(lambda: loads_hardware(text.encode(), "fuzz.toml"))


def _hardware_bytes(raw: bytes) -> None:
    _only_fxmpq_errors(lambda: loads_hardware(raw, "fuzz.toml"))


def _hardware_text(text: str) -> None:
    _only_fxmpq_errors(lambda: loads_hardware(text, "fuzz.toml"))


_TOML_LIKE = st.lists(st.sampled_from(["[target]", "[pins]", "[metrics.x]", "name = ", "'a'", "[", "]", "{", "}",
                                       " = ", "1" * 5000, "1e999", "inf", "nan", "\n", ",", "[[", "]]", "\"", "x",
                                       "true", "[" * 300, "\udcff"]), max_size=30).map("".join)

test_hardware_documents, test_hardware_documents_many = _both(_hardware_doc, st.data())
test_hardware_bytes, test_hardware_bytes_many = _both(_hardware_bytes, st.binary(max_size=300))
test_hardware_text, test_hardware_text_many = _both(_hardware_text, st.text(max_size=200) | _TOML_LIKE)


# --------------------------------------------------------------------------------------------- budget strings
_ANALYSIS: list[Any] = []


def _analysis() -> fxmpq.Analysis:
    if not _ANALYSIS:
        torch.manual_seed(0)
        _ANALYSIS.append(fxmpq.analyze(TinyNet(), torch.randn(2, 3, 8, 8)))
    return _ANALYSIS[0]


_NUMBER = st.sampled_from(["0", "1", "0.5", "12.2", "1e3", "1e999", "-1", "nan", "inf", ".", "1" * 5000, "+",
                           "3e", "0x10", "9" * 30])
_TERM = st.one_of(
    st.tuples(st.sampled_from(["w", "W"]), _NUMBER, st.sampled_from(["a", "A"]), _NUMBER).map("".join),
    st.tuples(st.sampled_from(["c", "C"]), _NUMBER).map("".join),
    st.tuples(st.sampled_from(["bitops", "size", "self", "latency", "x", "_", "é"]), st.sampled_from(["<=", " <= ", "<"]),
              _NUMBER, st.sampled_from(["", "k", "M", "G", "T", "B", "KB", "MB", "GiB", "Q", "kb"])).map("".join),
    st.text(max_size=10),
)
BUDGETS = st.lists(_TERM, min_size=1, max_size=4).map(lambda ts: "&".join(ts)) | st.text(max_size=40)


def _budget(text: str) -> None:
    def parse_and_resolve() -> None:
        Budget.parse(text).resolve(_analysis())

    _only_fxmpq_errors(parse_and_resolve)


def _budget_values(value: Any) -> None:
    _only_fxmpq_errors(lambda: Budget.coerce(value).resolve(_analysis()))


test_budget_strings, test_budget_strings_many = _both(_budget, BUDGETS)
test_budget_values, test_budget_values_many = _both(
    _budget_values, JSON_VALUES | st.dictionaries(st.sampled_from(["bitops", "size", "self", "x"]), _JSON_SCALARS))


# --------------------------------------------------------------------------------------------- indicators JSON
_IND = json.loads((ROOT / "tests" / "data" / "limpq_resnet50_indicators.json").read_text())
_IND_SMALL = {"format": "fxmpq.indicators/1", "candidate_bits": [4, 3, 2], "layers": ["conv2", "conv3"],
              "weight": {"conv2": {"4": 0.1, "3": 0.2, "2": 0.4}, "conv3": {"4": 0.1, "3": 0.2, "2": 0.3}},
              "act": {"conv2": {"4": 0.1, "3": 0.2, "2": 0.4}, "conv3": {"4": 0.1, "3": 0.2, "2": 0.3}}}


def _json_text(doc: Any, data: st.DataObject) -> str:
    text = json.dumps(doc, allow_nan=True)
    if data.draw(st.booleans(), label="truncate"):
        text = text[: data.draw(st.integers(0, len(text)), label="cut")]
    return text


def _indicators_doc(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from([_IND_SMALL, _IND]), label="indicators")
    text = _json_text(_mutate(base, data, JSON_VALUES), data)

    def read() -> None:
        ind = Indicators.from_json(text if text.lstrip().startswith("{") else Path("/nonexistent") / "x.json")
        ind.check_covers(["conv2", "conv3"], (2, 3, 4), (2, 3, 4))
        ind.cleaned("paper")
        ind.cleaned("isotonic")
        Indicators.from_json(ind.to_json())

    _only_fxmpq_errors(read)


def _indicators_file(raw: bytes, tmp: Path) -> None:
    p = tmp / "fuzz_indicators.json"
    p.write_bytes(raw)
    _only_fxmpq_errors(lambda: Indicators.from_json(p))


# --------------------------------------------------------------------------------------------- policy JSON
_POLICY = {"format": "fxmpq.policy/1", "layers": {"conv1": {"w": 8, "a": 8}, "conv2": {"w": 4, "a": 3},
                                                  "conv3": {"w": None, "a": None}, "fc": {"w": 8, "a": 8}}}


def _policy_doc(data: st.DataObject) -> None:
    text = _json_text(_mutate(_POLICY, data, JSON_VALUES), data)

    def read() -> None:
        p = Policy.from_json(text if text.lstrip().startswith("{") else Path("/nonexistent") / "p.json")
        p.validate(_analysis())
        _analysis().cost(p.complete(_analysis()))
        Policy.from_json(p.to_json())
        repr(p)

    _only_fxmpq_errors(read)


def _policy_file(raw: bytes, tmp: Path) -> None:
    p = tmp / "fuzz_policy.json"
    p.write_bytes(raw)
    _only_fxmpq_errors(lambda: Policy.from_json(p))


_FILE_BYTES = (st.binary(max_size=200) | JSON_VALUES.map(lambda v: json.dumps(v).encode())
               | st.sampled_from([b"\xff\xfe{}", b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                  b'{"candidate_bits": [' + b"1" * 5000 + b"]}", b"\xef\xbb\xbf{}", b"{\"layers\": {"]))

test_indicators_documents, test_indicators_documents_many = _both(_indicators_doc, st.data())
test_policy_documents, test_policy_documents_many = _both(_policy_doc, st.data())


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=FEW, **_SETTINGS)
@given(raw=_FILE_BYTES)
def test_indicator_and_policy_files(fuzz_dir: Path, raw: bytes) -> None:
    _indicators_file(raw, fuzz_dir)
    _policy_file(raw, fuzz_dir)


@pytest.mark.slow
@settings(max_examples=MANY, **_SETTINGS)
@given(raw=_FILE_BYTES)
def test_indicator_and_policy_files_many(fuzz_dir: Path, raw: bytes) -> None:
    _indicators_file(raw, fuzz_dir)
    _policy_file(raw, fuzz_dir)
