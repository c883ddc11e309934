"""Tests of tools/analyze.py: a subprocess run on a small model, a policy file, and one-line errors with exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxmpq import Policy, analyze
from fxmpq.models import small_mobilenet

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "analyze.py"
sys.path.insert(0, str(ROOT / "tools"))
import analyze as tool  # noqa: E402


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env, timeout=300)


def test_subprocess_small_model_uniform():
    r = _run("small_mobilenet", "--input", "1x28x28", "--hardware", "bitops", "--uniform", "w4a4")
    assert r.returncode == 0, r.stderr
    a = analyze(small_mobilenet(), torch.randn(1, 1, 28, 28))
    cost = a.cost(Policy.uniform(a, 4, 4))
    out = r.stdout
    assert "model     small_mobilenet  input 1x1x28x28  (12 quantizable layers, 10 searchable)" in out
    assert "policy    uniform W4A4" in out
    for name in a.names:
        assert f"\n{name} " in out
    assert f"MACs      {sum(m.macs for m in a.layers):,} in quantizable layers" in out
    bitops_line = next(line for line in out.splitlines() if line.startswith("bitops "))
    assert float(bitops_line.split()[1]) == pytest.approx(cost["bitops"], rel=1e-5)


def test_subprocess_model_factory_and_policy_file(tmp_path):
    policy = tmp_path / "policy.json"
    Policy({"conv2": (2, 6)}).to_json(policy)
    r = _run("--model-factory", "models:PlainCNN", "--input", "3x16x16", "--hardware", "bitfusion",
             "--policy", str(policy))
    assert r.returncode == 0, r.stderr
    conv2 = next(line for line in r.stdout.splitlines() if line.startswith("conv2 "))
    assert "W2A6" in conv2
    assert "latency" in r.stdout and "bricks" in r.stdout


@pytest.mark.parametrize(("argv", "message"), [
    (["nosuchnet"], "analyze.py: error: unknown model 'nosuchnet': expected a torchvision model name"),
    (["resnet18", "--input", "3x224xx"], "analyze.py: error: --input '3x224xx': expected the per-sample shape"),
    (["resnet18", "--input", "0x4"], "analyze.py: error: --input '0x4': every dimension must be positive"),
    (["resnet18", "--hardware", "tpu9"], "analyze.py: error: unknown hardware 'tpu9': shipped targets are"),
    (["resnet18", "--hardware", "missing/x.toml"], "analyze.py: error: missing/x.toml: no such hardware"),
    (["resnet18", "--uniform", "4/4"], "analyze.py: error: --uniform '4/4': expected wNaM"),
    (["nosuchpkg.mod:fn"], "analyze.py: error: model 'nosuchpkg.mod:fn': cannot import 'nosuchpkg.mod'"),
    (["fxmpq.models:nothing"], "analyze.py: error: model 'fxmpq.models:nothing': fxmpq.models has no callable"),
    ([], "analyze.py: error: give a model name (positional) or --model-factory"),
    (["resnet18", "--policy", "/nonexistent/p.json"], "analyze.py: error: cannot read policy file"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert tool.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message), err
    assert err.count("\n") == 1


def test_policy_that_does_not_fit_exits_2(tmp_path, capsys):
    policy = tmp_path / "p.json"
    Policy({"conv2": (2, 6), "ghost": (4, 4)}).to_json(policy)
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        rc = tool.main(["models:PlainCNN", "--input", "3x16x16", "--policy", str(policy)])
    finally:
        sys.path.remove(str(ROOT / "tests"))
    assert rc == 2
    assert capsys.readouterr().err == ("analyze.py: error: policy does not fit the model: unknown layer(s): ghost\n")


def test_untraceable_model_exits_1_with_leaf_hint(capsys):
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        assert tool.main(["models:UntraceableNet", "--input", "3x8x8"]) == 1
        assert "leaf_modules=['gate']" in capsys.readouterr().err
        assert tool.main(["models:UntraceableNet", "--input", "3x8x8", "--leaf", "gate", "--uniform", "w8a8"]) == 0
    finally:
        sys.path.remove(str(ROOT / "tests"))
    assert "not quantized" in capsys.readouterr().out  # gate.proj's parameters are reported as left out


def test_parsers():
    assert tool.parse_input_size("3x224x224") == (1, 3, 224, 224)
    assert tool.parse_input_size("4x32") == (1, 4, 32)
    assert tool.parse_uniform("W8A4") == (8, 4)
