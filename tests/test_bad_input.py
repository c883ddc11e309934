"""A catalogue of bad inputs: each one raises ONE error of its own fxmpq class, naming the offending thing, and
nothing is printed before it (no traceback, no warning). The Python API is called in-process (capfd: nothing on
stdout or stderr); every command-line tool runs in a subprocess (its stderr: one line, no traceback; the class of
the error it reported is read from a marker the test's runner prints, the tool's own output unchanged)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _quant_models import TinyNet
from models import PlainCNN, UntraceableNet

import fxmpq
from fxmpq import (
    ArgumentError,
    Budget,
    BudgetError,
    CheckpointError,
    DataError,
    ExportError,
    HardwareSpecError,
    IndicatorError,
    ModelSpecError,
    Policy,
    PolicyError,
    TraceError,
)
from fxmpq.core.checkpoint import load_checkpoint
from fxmpq.core.options import LowerOptions, TrainOptions
from fxmpq.hardware.spec import loads_hardware
from fxmpq.models import build_model, parse_model_kwargs

ROOT = Path(__file__).resolve().parent.parent
X = torch.randn(2, 3, 8, 8)  # TinyNet's example input
Y = torch.tensor([0, 1])
GOOD_BATCHES = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))] * 2
HAS_CUDA = torch.cuda.is_available()
NOT_TENSORS_ONLY = "weights_only"  # torch's advice to unpickle (weights_only=False) must never be relayed


# --------------------------------------------------------------------------------------------- shared fixtures
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The bad (and a few good) files the cases read, written once."""
    d = tmp_path_factory.mktemp("bad_input")
    out: dict[str, Path] = {"dir": d}

    def put(name: str, content: bytes | str) -> None:
        p = d / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        out[name] = p

    put("not_utf8.json", b"\xff\xfe{\x00")
    put("big_int.json", '{"candidate_bits": [' + "1" * 5000 + '], "layers": [], "weight": {}}')
    put("deep.json", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    put("inf_bits.json", '{"candidate_bits": [Infinity], "layers": ["conv2"], "weight": {"conv2": {"4": 1}}}')
    put("bool_step.json", '{"candidate_bits": [4], "layers": ["conv2"], "weight": {"conv2": {"4": true}}}')
    put("truncated.json", '{"format": "fxmpq.indicators/1", "candidate_bits": [6, 5')
    put("policy_99.json", '{"format": "fxmpq.policy/1", "layers": {"conv2": {"w": 99, "a": 4}}}')
    put("big_int.toml", "[target]\nname = 'x'\nweight_bits = [" + "1" * 5000 + "]\n")
    put("deep.toml", "a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    put("not_utf8.toml", b"[target]\nname = '\xff'\n")
    bitops = (ROOT / "hardware" / "bitops.toml").read_text()
    put("huge_scale.toml", bitops.replace('type = "bitops"', 'type = "bitops", scale = 1' + "0" * 400, 1))
    put("unknown_key.toml", bitops.replace("[target]", "[target]\ncolour = 'blue'", 1))
    measured = (ROOT / "hardware" / "ort_cpu_resnet18.toml").read_text()
    put("huge_table.toml", re.sub(r'"8x8" = [0-9.]+', '"8x8" = 1' + "0" * 400, measured, count=1))
    (d / "hw_folder.toml").mkdir()
    out["hw_folder.toml"] = d / "hw_folder.toml"
    put("a_file", "not a folder")
    # indicators of TinyNet (good), and of another model (foreign: different layer names)
    torch.manual_seed(0)
    q = fxmpq.prepare(TinyNet(), X, bits=(2, 3, 4))
    fxmpq.indicators_from_model(q).to_json(d / "tiny_ind.json")
    out["tiny_ind.json"] = d / "tiny_ind.json"
    qs = fxmpq.prepare(build_model("small_resnet"), torch.randn(2, 1, 28, 28))
    fxmpq.indicators_from_model(qs).to_json(d / "small_resnet_ind.json")
    out["small_resnet_ind.json"] = d / "small_resnet_ind.json"
    # torch files: a pickled Python object (not tensors only), a truncated one, a state_dict with wrong keys
    torch.save({"model": torch.nn.Linear(2, 2)}, d / "object.pt")
    out["object.pt"] = d / "object.pt"
    put("truncated.pt", (d / "object.pt").read_bytes()[:200])
    torch.save({"conv.weight": torch.ones(1), "head.bias": torch.ones(1)}, d / "wrong_keys.pt")
    out["wrong_keys.pt"] = d / "wrong_keys.pt"
    return out


@pytest.fixture(scope="module")
def tiny() -> fxmpq.QuantModel:
    torch.manual_seed(0)
    return fxmpq.prepare(TinyNet(), X, bits=(2, 3, 4))


@pytest.fixture(scope="module")
def fixed() -> fxmpq.QuantModel:
    torch.manual_seed(0)
    q = fxmpq.prepare(TinyNet(), X, bits=(2, 3, 4))
    fxmpq.apply_policy(q, {n: (4, 4) for n in q.searchable_names}, X)
    return q.eval()


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[dict[str, object]], object]  # gets {"files", "tiny", "fixed"}
    error: type[fxmpq.FxmpqError]
    names: tuple[str, ...]  # each must appear in the message: the offending thing


def _q(model: torch.nn.Module | None = None, **kw: object) -> fxmpq.QuantizedModel:
    """quantize() on TinyNet with arguments that are fine unless a case overrides them (fails before training)."""
    args: dict[str, object] = {"budget": "w4a4", "data": GOOD_BATCHES, "example_inputs": X, "bits": (2, 3, 4),
                               "progress": False, "max_steps": 1}
    args.update(kw)
    return fxmpq.quantize(model if model is not None else TinyNet(), **args)


def _work_dir_with(ctx: dict, name: str, indicators: Path | str, *, ckpt: bytes | None = None) -> Path:
    d = ctx["files"]["dir"] / f"wd_{name}"
    d.mkdir(exist_ok=True)
    (d / "indicators.json").write_text(Path(indicators).read_text() if isinstance(indicators, Path) else indicators)
    if ckpt is not None:
        (d / "indicators.ckpt").write_bytes(ckpt)
    return d


def _gen():
    yield from GOOD_BATCHES


def _search(ctx: dict, ind: Indicators_ | None = None, budget: object = "w4a4") -> object:
    q = ctx["tiny"]
    return fxmpq.search(q.analysis, ind or fxmpq.indicators_from_model(q), budget)


Indicators_ = fxmpq.Indicators
F = "files"

API_CASES = [
    # hardware descriptions
    Case("hw-unknown-name", lambda c: fxmpq.load_hardware("tpu9"), HardwareSpecError, ("tpu9",)),
    Case(
        "hw-missing-file",
        lambda c: fxmpq.load_hardware("/nonexistent/x.toml"),
        HardwareSpecError,
        ("x.toml",),
    ),
    Case("hw-not-a-name", lambda c: fxmpq.load_hardware(5), HardwareSpecError, ("int",)),
    Case(
        "hw-int-4300-digits",
        lambda c: fxmpq.load_hardware(c[F]["big_int.toml"]),
        HardwareSpecError,
        ("big_int.toml", "4300"),
    ),
    Case(
        "hw-deep-nesting",
        lambda c: fxmpq.load_hardware(c[F]["deep.toml"]),
        HardwareSpecError,
        ("deep.toml", "nested"),
    ),
    Case(
        "hw-not-utf8",
        lambda c: fxmpq.load_hardware(c[F]["not_utf8.toml"]),
        HardwareSpecError,
        ("not_utf8.toml", "UTF-8"),
    ),
    Case(
        "hw-float-overflow",
        lambda c: fxmpq.load_hardware(c[F]["huge_scale.toml"]),
        HardwareSpecError,
        ("huge_scale.toml", "scale"),
    ),
    Case(
        "hw-unknown-key",
        lambda c: fxmpq.load_hardware(c[F]["unknown_key.toml"]),
        HardwareSpecError,
        ("target", "'colour'"),
    ),
    Case(
        "hw-layer-table-int-overflows-float",
        lambda c: fxmpq.load_hardware(c[F]["huge_table.toml"]),
        HardwareSpecError,
        ("huge_table.toml", "metrics.latency.terms[1].layers.conv1.8x8", "finite"),
    ),
    Case(
        "hw-a-directory",
        lambda c: fxmpq.load_hardware(c[F]["hw_folder.toml"]),
        HardwareSpecError,
        ("hw_folder.toml", "is a directory"),
    ),
    Case("hw-text-not-str", lambda c: loads_hardware(3.5), HardwareSpecError, ("float",)),
    # budgets
    Case("budget-ratio-below-1", lambda c: Budget.parse("c0.5"), BudgetError, ("c0.5", "below 1")),
    Case("budget-metric-self", lambda c: _search(c, budget="self<=5"), BudgetError, ("'self'",)),
    Case(
        "budget-huge-bits",
        lambda c: Budget.parse("w" + "9" * 5000 + "a4"),
        BudgetError,
        ("w999", "bit-widths"),
    ),
    Case(
        "budget-infinite-limit",
        lambda c: Budget.parse("bitops<=1e999"),
        BudgetError,
        ("bitops<=1e999", "finite"),
    ),
    Case("budget-empty", lambda c: Budget.parse("  "), BudgetError, ("non-empty",)),
    Case("budget-bad-term", lambda c: Budget.parse("w3a4 & zz"), BudgetError, ("'zz'",)),
    Case("budget-negative", lambda c: Budget(bitops=-1), BudgetError, ("bitops=-1",)),
    Case("budget-an-int", lambda c: _q(budget=5), BudgetError, ("int 5", "bitops<=5")),
    Case(
        "budget-infeasible",
        lambda c: _search(c, budget="bitops<=1"),
        fxmpq.InfeasibleBudget,
        ("bitops <= 1", "smallest achievable"),
    ),
    # indicators JSON
    Case(
        "ind-not-utf8",
        lambda c: Indicators_.from_json(c[F]["not_utf8.json"]),
        IndicatorError,
        ("not_utf8.json", "UTF-8"),
    ),
    Case(
        "ind-int-4300-digits",
        lambda c: Indicators_.from_json(c[F]["big_int.json"]),
        IndicatorError,
        ("big_int.json", "4300"),
    ),
    Case(
        "ind-deep-nesting",
        lambda c: Indicators_.from_json(c[F]["deep.json"]),
        IndicatorError,
        ("deep.json", "nested"),
    ),
    Case(
        "ind-infinite-bits",
        lambda c: Indicators_.from_json(c[F]["inf_bits.json"]),
        IndicatorError,
        ("inf_bits.json", "candidate_bits"),
    ),
    Case(
        "ind-boolean-step",
        lambda c: Indicators_.from_json(c[F]["bool_step.json"]),
        IndicatorError,
        ("bool_step.json", "conv2", "True"),
    ),
    Case(
        "ind-truncated",
        lambda c: Indicators_.from_json(c[F]["truncated.json"]),
        IndicatorError,
        ("truncated.json", "not valid JSON"),
    ),
    Case(
        "ind-missing-file",
        lambda c: Indicators_.from_json(Path("/nonexistent/i.json")),
        IndicatorError,
        ("/nonexistent/i.json",),
    ),
    Case(
        "ind-missing-key",
        lambda c: Indicators_.from_json('{"candidate_bits": [4], "weight": {}}'),
        IndicatorError,
        ("'layers'",),
    ),
    Case(
        "ind-foreign-format",
        lambda c: Indicators_.from_json(
            '{"format": "x/2", "candidate_bits": [4], "layers": [], "weight": {}}'
        ),
        IndicatorError,
        ("'x/2'",),
    ),
    Case(
        "ind-other-model",
        lambda c: _search(c, Indicators_.from_json(c[F]["small_resnet_ind.json"])),
        IndicatorError,
        ("conv2",),
    ),
    # policies
    Case(
        "policy-not-utf8", lambda c: Policy.from_json(c[F]["not_utf8.json"]), PolicyError, ("not_utf8.json",)
    ),
    Case(
        "policy-bits-99",
        lambda c: Policy.from_json(c[F]["policy_99.json"]),
        PolicyError,
        ("policy_99.json", "conv2", "99"),
    ),
    Case("policy-a-folder", lambda c: Policy.from_json(c[F]["dir"]), PolicyError, ("policy file",)),
    Case(
        "policy-unknown-layer",
        lambda c: Policy({"ghost": (4, 4)}).validate(c["tiny"].analysis),
        PolicyError,
        ("ghost",),
    ),
    Case(
        "prepare-bits-not-ints", lambda c: fxmpq.prepare(TinyNet(), X, bits=("a",)), ArgumentError, ("'a'",)
    ),
    Case(
        "quantize-no-quantizable-layers",
        lambda c: _q(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.ReLU())),
        ArgumentError,
        ("no quantizable layers",),
    ),
    # data
    Case(
        "data-label-out-of-range-batch-1",
        lambda c: fxmpq.train_indicators(
            c["tiny"],
            [GOOD_BATCHES[0], (GOOD_BATCHES[0][0], torch.tensor([0, 1, 10, 2]))],
            TrainOptions(progress=False),
        ),
        DataError,
        ("batch 1", "[0, 10]", "10 outputs"),
    ),
    Case(
        "data-label-out-of-range-batch-0",
        lambda c: _q(data=[(GOOD_BATCHES[0][0], torch.tensor([0, 1, 99, 2]))]),
        DataError,
        ("[0, 99]",),
    ),
    Case("data-one-shot-generator", lambda c: _q(data=_gen()), DataError, ("one-shot", "generator", "list")),
    Case(
        "data-uint8",
        lambda c: _q(data=[(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), Y.repeat(2))]),
        DataError,
        ("floating point", "uint8"),
    ),
    Case(
        "data-float64",
        lambda c: _q(data=[(torch.randn(4, 3, 8, 8, dtype=torch.float64), Y.repeat(2))]),
        DataError,
        ("float64",),
    ),
    Case(
        "data-wrong-shape",
        lambda c: _q(data=[(torch.randn(4, 1, 8, 8), Y.repeat(2))]),
        DataError,
        ("(4, 1, 8, 8)", "[N, 3, 8, 8]"),
    ),
    Case("data-not-iterable", lambda c: _q(data=3), DataError, ("int",)),
    Case(
        "data-empty",
        lambda c: fxmpq.train_indicators(c["tiny"], [], TrainOptions(progress=False)),
        DataError,
        ("no batch",),
    ),
    Case(
        "data-float-targets",
        lambda c: _q(data=[(GOOD_BATCHES[0][0], torch.zeros(4))]),
        DataError,
        ("class indices",),
    ),
    # example inputs and models
    Case(
        "example-wrong-shape",
        lambda c: fxmpq.prepare(TinyNet(), torch.randn(2, 5, 8, 8)),
        TraceError,
        ("module conv1 (Conv2d)", "%conv1", "5 channels"),
    ),
    Case(
        "example-uint8",
        lambda c: fxmpq.prepare(TinyNet(), torch.zeros(2, 3, 8, 8, dtype=torch.uint8)),
        TraceError,
        ("uint8", "floating point"),
    ),
    Case(
        "example-float64",
        lambda c: fxmpq.analyze(PlainCNN(), torch.randn(2, 3, 16, 16, dtype=torch.float64)),
        TraceError,
        ("float64", "float32"),
    ),
    Case("example-not-a-tensor", lambda c: fxmpq.trace(TinyNet(), {"x": X}), TraceError, ("dict",)),
    Case("model-on-meta", lambda c: _q(TinyNet().to("meta")), TraceError, ("meta", "to_empty")),
    Case(
        "model-untraceable",
        lambda c: fxmpq.analyze(UntraceableNet(), torch.randn(1, 3, 8, 8)),
        TraceError,
        ("gate", "leaf_modules"),
    ),
    Case(
        "model-already-quantized",
        lambda c: fxmpq.prepare(c["tiny"], X),
        ArgumentError,
        ("already quantized", "QuantModel"),
    ),
    Case(
        "graph-module-with-quantizers",
        lambda c: _q(c["tiny"].graph_module),
        ArgumentError,
        ("already quantized", "weight_quantizer"),
    ),
    Case(
        "apply-example-wrong-shape",
        lambda c: fxmpq.apply_policy(c["fixed"], c["fixed"].policy, torch.randn(2, 3, 8)),
        DataError,
        ("example_inputs", "(2, 3, 8)"),
    ),
    # arguments
    Case("device-gpu-word", lambda c: _q(device="gpu0"), ArgumentError, ("gpu0", "not a device")),
    Case(
        "device-meta",
        lambda c: fxmpq.train_indicators(
            c["tiny"], GOOD_BATCHES, TrainOptions(device="meta", progress=False)
        ),
        ArgumentError,
        ("meta",),
    ),
    Case("work-dir-is-a-file", lambda c: _q(work_dir=c[F]["a_file"]), ArgumentError, ("a_file", "is a file")),
    Case(
        "work-dir-under-a-file",
        lambda c: _q(work_dir=c[F]["a_file"] / "sub"),
        ArgumentError,
        ("a_file", "cannot create"),
    ),
    Case(
        "epochs-negative",
        lambda c: fxmpq.train_indicators(
            c["tiny"], GOOD_BATCHES, TrainOptions(indicator_epochs=-1, progress=False)
        ),
        ArgumentError,
        ("epochs", "-1"),
    ),
    Case(
        "checkpoint-every-0",
        lambda c: fxmpq.train_indicators(
            c["tiny"], GOOD_BATCHES, TrainOptions(checkpoint_every=0, progress=False)
        ),
        ArgumentError,
        ("checkpoint_every",),
    ),
    Case(
        "batch-size-0",
        lambda c: fxmpq.finetune(c["fixed"], GOOD_BATCHES, TrainOptions(batch_size=0, progress=False)),
        ArgumentError,
        ("batch_size",),
    ),
    Case(
        "checkpoint-under-a-file",
        lambda c: fxmpq.train_indicators(
            c["tiny"], GOOD_BATCHES, TrainOptions(progress=False), checkpoint=c[F]["a_file"] / "x.ckpt"
        ),
        ArgumentError,
        ("a_file",),
    ),
    Case(
        "lower-path-is-a-folder",
        lambda c: fxmpq.lower(c["fixed"], c[F]["dir"], X),
        ArgumentError,
        ("is a folder",),
    ),
    Case(
        "lower-samples-0",
        lambda c: fxmpq.lower(c["fixed"], c[F]["dir"] / "m.onnx", X, LowerOptions(samples=0)),
        ArgumentError,
        ("samples", "0"),
    ),
    Case(
        "lower-inputs-wrong-shape",
        lambda c: fxmpq.lower(c["fixed"], c[F]["dir"] / "m.onnx", X, inputs=torch.randn(4, 3, 9)),
        DataError,
        ("(4, 3, 9)",),
    ),
    Case(
        "lower-unquantized",
        lambda c: fxmpq.lower(fxmpq.prepare(TinyNet(), X), c[F]["dir"] / "m.onnx", X),
        ExportError,
        ("apply a policy",),
    ),
    Case(
        "lower-storage-int3",
        lambda c: fxmpq.lower(c["fixed"], c[F]["dir"] / "m.onnx", X, LowerOptions(storage="int3")),
        ArgumentError,
        ("storage", "'int3'", "'packed'"),
    ),
    Case(
        "ort-session-missing-file",
        lambda c: fxmpq.ort_session(c[F]["dir"] / "missing.onnx"),
        ArgumentError,
        ("ort_session: path", "missing.onnx"),
    ),
    Case(
        "ort-session-not-onnx",
        lambda c: fxmpq.ort_session(c[F]["not_utf8.json"]),
        ArgumentError,
        ("ort_session: path", "not_utf8.json", "not a readable ONNX model"),
    ),
    # checkpoints and work directories
    Case(
        "checkpoint-pickled-object",
        lambda c: load_checkpoint(c[F]["object.pt"]),
        CheckpointError,
        ("object.pt", "pickled Python object"),
    ),
    Case(
        "checkpoint-truncated",
        lambda c: load_checkpoint(c[F]["truncated.pt"]),
        CheckpointError,
        ("truncated.pt",),
    ),
    Case(
        "resume-foreign-checkpoint",
        lambda c: fxmpq.train_indicators(
            c["tiny"], GOOD_BATCHES, TrainOptions(progress=False), checkpoint=c[F]["object.pt"], resume=True
        ),
        CheckpointError,
        ("object.pt",),
    ),
    Case(
        "work-dir-truncated-indicators",
        lambda c: _q(work_dir=_work_dir_with(c, "trunc", c[F]["truncated.json"])),
        IndicatorError,
        ("indicators.json", "delete"),
    ),
    Case(
        "work-dir-foreign-indicators",
        lambda c: _q(work_dir=_work_dir_with(c, "foreign", c[F]["small_resnet_ind.json"])),
        IndicatorError,
        ("wd_foreign/indicators.json", "conv2", "delete"),
    ),
    Case(
        "work-dir-corrupt-joint-state",
        lambda c: _q(work_dir=_work_dir_with(c, "ckpt", c[F]["tiny_ind.json"], ckpt=b"garbage")),
        CheckpointError,
        ("indicators.ckpt", "delete"),
    ),
    # model specs
    Case("model-unknown-name", lambda c: build_model("nosuchnet"), ModelSpecError, ("nosuchnet",)),
    Case(
        "model-kwargs-deep",
        lambda c: parse_model_kwargs('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        ModelSpecError,
        ("model kwargs",),
    ),
]
if not HAS_CUDA:
    API_CASES.append(Case("device-cuda-without-cuda", lambda c: _q(device="cuda"), ArgumentError,
                          ("'cuda'", "CUDA is not available")))


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_api_bad_input(case: Case, files, tiny, fixed, capfd) -> None:
    capfd.readouterr()
    with pytest.raises(fxmpq.FxmpqError) as exc:
        case.call({"files": files, "tiny": tiny, "fixed": fixed})
    assert type(exc.value) is case.error, f"{type(exc.value).__name__}: {exc.value}"
    msg = str(exc.value)
    for name in case.names:
        assert name in msg, f"{name!r} not in: {msg}"
    assert NOT_TENSORS_ONLY + "=False" not in msg
    out, err = capfd.readouterr()
    assert out == "" and err == "", f"printed before the error: {out!r} {err!r}"


# --------------------------------------------------------------------------------------------- command lines
# One interpreter per tool runs that tool's cases one after another (importing torch 33 times would cost a
# minute of the suite); each case gets its own stdout/stderr files at the file-descriptor level, its exit status,
# and a traceback written to its stderr if the tool lets an exception escape. Warnings are shown every time.
_RUNNER = """
import json, os, runpy, sys, traceback, warnings
from pathlib import Path
import fxmpq.cli as cli
_fail = cli.fail
def fail(error, code, *, prog=None):
    print(f"@@error-class={type(error).__name__}", flush=True)
    return _fail(error, code, prog=prog)
cli.fail = fail
warnings.simplefilter("always")
out = Path(sys.argv[1])
for cid, tool, argv in json.loads(Path(sys.argv[2]).read_text()):
    sys.path.insert(0, str(Path(tool).parent))
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fo = os.open(out / f"{cid}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    fe = os.open(out / f"{cid}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fo, 1); os.dup2(fe, 2)
    code = 0
    try:
        sys.argv = [tool, *argv]
        runpy.run_path(tool, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2)
        for fd in (fo, fe, *saved):
            os.close(fd)
        sys.path.remove(str(Path(tool).parent))
    (out / f"{cid}.code").write_text(str(code))
"""


SMALL = ["--model", "fxmpq.models:small_resnet", "--input", "1x28x28"]


@dataclass(frozen=True)
class CliCase:
    id: str
    tool: str
    argv: tuple[str, ...]  # "{name}" is replaced by the path of files[name]
    error: str  # the fxmpq class the tool reported
    names: tuple[str, ...]


CLI_CASES = [
    CliCase("analyze-unknown-model", "analyze.py", ("nosuchnet",), "ModelSpecError", ("nosuchnet",)),
    CliCase("analyze-hw-4300-digits", "analyze.py", ("small_resnet", "--input", "1x28x28", "--hardware",
                                                     "{big_int.toml}"), "HardwareSpecError", ("big_int.toml",)),
    CliCase("analyze-policy-not-utf8", "analyze.py", ("small_resnet", "--input", "1x28x28", "--policy",
                                                      "{not_utf8.json}"), "PolicyError", ("not_utf8.json",)),
    CliCase("analyze-uniform", "analyze.py", ("small_resnet", "--uniform", "w4/a4"), "ArgumentError",
            ("--uniform",)),
    CliCase("analyze-input-zero", "analyze.py", ("small_resnet", "--input", "0x28"), "ArgumentError", ("--input",)),
    CliCase("analyze-num-classes-0", "analyze.py", ("small_resnet", "--num-classes", "0"), "ArgumentError",
            ("--num-classes",)),
    CliCase("analyze-wrong-input-channels", "analyze.py", ("small_resnet", "--input", "3x28x28"), "TraceError",
            ("node", "channels")),
    CliCase("train-samples-negative", "train_indicators.py", ("small_resnet", "--samples", "-5", "--out", "{dir}"),
            "ArgumentError", ("--samples -5",)),
    CliCase("train-batch-size-0", "train_indicators.py", ("small_resnet", "--batch-size", "0", "--out", "{dir}"),
            "ArgumentError", ("--batch-size 0",)),
    CliCase("train-epochs-negative", "train_indicators.py", ("small_resnet", "--epochs", "-1", "--out", "{dir}"),
            "ArgumentError", ("--epochs -1",)),
    CliCase("train-out-is-a-file", "train_indicators.py", ("small_resnet", "--out", "{a_file}"), "ArgumentError",
            ("--out", "a_file")),
    CliCase("train-bits", "train_indicators.py", ("small_resnet", "--bits", "2,x", "--out", "{dir}"),
            "ArgumentError", ("--bits",)),
    CliCase("train-device-word", "train_indicators.py", ("small_resnet", "--device", "gpu0", "--out", "{dir}"),
            "ArgumentError", ("gpu0",)),
    CliCase("train-weights-wrong-keys", "train_indicators.py", ("small_resnet", "--weights", "{wrong_keys.pt}",
                                                                "--out", "{dir}"), "CheckpointError",
            ("wrong_keys.pt", "missing", "unexpected 2 key(s): conv.weight, head.bias")),
    CliCase("train-weights-pickled-object", "train_indicators.py", ("small_resnet", "--weights", "{object.pt}",
                                                                    "--out", "{dir}"), "CheckpointError",
            ("object.pt", "pickled Python object")),
    CliCase("train-hw-deep", "train_indicators.py", ("small_resnet", "--hardware", "{deep.toml}", "--out", "{dir}"),
            "HardwareSpecError", ("deep.toml",)),
    CliCase("train-model-kwargs-digits", "train_indicators.py", ("small_resnet", "--model-kwargs",
                                                                 '{"width": ' + "1" * 5000 + "}", "--out", "{dir}"),
            "ModelSpecError", ("model kwargs",)),
    CliCase("search-out-is-a-folder", "search.py", ("--indicators", "{small_resnet_ind.json}", *SMALL, "--budget",
                                                    "w4a4", "--out", "{dir}"), "ArgumentError", ("--out", "folder")),
    CliCase("search-out-under-a-file", "search.py", ("--indicators", "{small_resnet_ind.json}", *SMALL, "--budget",
                                                     "w4a4", "--out", "{a_file}/p.json"), "ArgumentError",
            ("--out", "a_file")),
    CliCase("search-budget-ratio", "search.py", ("--indicators", "{small_resnet_ind.json}", *SMALL, "--budget",
                                                 "c0.5"), "BudgetError", ("c0.5",)),
    CliCase("search-budget-self", "search.py", ("--indicators", "{small_resnet_ind.json}", *SMALL, "--budget",
                                                "self<=5"), "BudgetError", ("'self'",)),
    CliCase("search-indicators-not-utf8", "search.py", ("--indicators", "{not_utf8.json}", *SMALL, "--budget",
                                                        "w4a4"), "IndicatorError", ("not_utf8.json",)),
    CliCase("search-indicators-infinite-bits", "search.py", ("--indicators", "{inf_bits.json}", *SMALL, "--budget",
                                                             "w4a4"), "IndicatorError", ("candidate_bits",)),
    CliCase("search-indicators-other-model", "search.py", ("--indicators", "{tiny_ind.json}", *SMALL, "--budget",
                                                           "w4a4"), "IndicatorError", ("indicators",)),
    CliCase("lower-cli-samples-0", "lower.py", ("{object.pt}", "--out", "{dir}/m.onnx", "--samples", "0"),
            "ArgumentError", ("--samples 0",)),
    CliCase("lower-cli-storage-int3", "lower.py", ("{object.pt}", "--out", "{dir}/m.onnx", "--storage", "int3"),
            "ArgumentError", ("--storage", "'int3'")),
    CliCase("lower-pickled-checkpoint", "lower.py", ("{object.pt}", "--out", "{dir}/m.onnx"), "CheckpointError",
            ("object.pt", "pickled Python object")),
    CliCase("lower-truncated-checkpoint", "lower.py", ("{truncated.pt}", "--out", "{dir}/m.onnx"), "CheckpointError",
            ("truncated.pt",)),
    CliCase("lower-out-is-a-folder", "lower.py", ("{object.pt}", "--out", "{dir}"), "ArgumentError",
            ("--out", "folder")),
    CliCase("lower-missing-checkpoint", "lower.py", ("/nonexistent/ft.pt", "--out", "{dir}/m.onnx"),
            "CheckpointError", ("/nonexistent/ft.pt",)),
    CliCase("demo-budget-ratio", "demo.py", ("--budget", "c0.5", "--out", "{dir}/demo"), "BudgetError", ("c0.5",)),
    CliCase("demo-out-is-a-file", "demo.py", ("--out", "{a_file}"), "ArgumentError", ("--out", "a_file")),
    CliCase("demo-epochs-negative", "demo.py", ("--finetune-epochs", "-1", "--out", "{dir}/demo"), "ArgumentError",
            ("--finetune-epochs -1",)),
]
if not HAS_CUDA:
    CLI_CASES.append(CliCase("train-device-cuda", "train_indicators.py", ("small_resnet", "--device", "cuda",
                                                                          "--out", "{dir}"), "ArgumentError",
                             ("CUDA is not available",)))


@pytest.fixture(scope="module")
def cli_results(files, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every command-line case run once: the cases of one tool in one subprocess, two tools at a time."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    out = tmp_path_factory.mktemp("cli_runs")

    def run(tool: str) -> None:
        cases = [(c.id, str(ROOT / "tools" / c.tool),
                  [re.sub(r"\{([\w.]+)\}", lambda m: str(files[m[1]]), a) for a in c.argv])
                 for c in CLI_CASES if c.tool == tool]
        spec = out / f"{tool}.json"
        spec.write_text(json.dumps(cases))
        proc = subprocess.run([sys.executable, "-c", _RUNNER, str(out), str(spec)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(run, sorted({c.tool for c in CLI_CASES})))
    return {c.id: subprocess.CompletedProcess(c.argv, int((out / f"{c.id}.code").read_text()),
                                              (out / f"{c.id}.out").read_text(), (out / f"{c.id}.err").read_text())
            for c in CLI_CASES}


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_bad_input(case: CliCase, cli_results) -> None:
    proc = cli_results[case.id]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and "error: " in lines[0], proc.stderr[-3000:]
    for name in case.names:
        assert name in lines[0], f"{name!r} not in: {lines[0]}"
    assert NOT_TENSORS_ONLY + "=False" not in proc.stderr
    assert f"@@error-class={case.error}" in proc.stdout.splitlines(), proc.stdout[-1000:]


def test_the_catalogue_is_large_enough() -> None:
    assert len(API_CASES) + len(CLI_CASES) >= 60
    assert {c.tool for c in CLI_CASES} == {"analyze.py", "train_indicators.py", "search.py", "lower.py", "demo.py"}
    assert json.loads(json.dumps([c.id for c in API_CASES + CLI_CASES]))  # unique, printable ids
    assert len({c.id for c in API_CASES + CLI_CASES}) == len(API_CASES) + len(CLI_CASES)
