"""Smoke runs of every benchmark script at tiny sizes (so they cannot rot) and the policy benchmark's baselines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fxmpq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import bench_export  # noqa: E402
import bench_int8  # noqa: E402
import bench_policy  # noqa: E402
import bench_search  # noqa: E402
import bench_train_step  # noqa: E402
import bench_zoo  # noqa: E402


def _tool(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def _indicators() -> fxmpq.Indicators:
    layers = ("a", "b", "c")
    weight = {"a": {2: 9.0, 4: 3.0}, "b": {2: 5.0, 4: 2.0}, "c": {2: 1.0, 4: 0.5}}
    act = {"a": {2: 1.0, 4: 0.1}, "b": {2: 4.0, 4: 0.4}, "c": {2: 2.0, 4: 0.2}}
    return fxmpq.Indicators(layers=layers, bits=(2, 4), weight=weight, act=act)


def test_inverted_indicators_reverse_the_sensitivity_order():
    inv = bench_policy.inverted_indicators(_indicators())
    assert inv.weight["a"] == {2: 1.0, 4: 0.5} and inv.weight["c"] == {2: 9.0, 4: 3.0}
    assert inv.weight["b"] == {2: 5.0, 4: 2.0}
    assert inv.act["b"] == {2: 1.0, 4: 0.1} and inv.act["a"] == {2: 4.0, 4: 0.4}


def test_random_indicators_are_seeded_and_decrease_with_bits():
    one = bench_policy.random_indicators(("a", "b"), (2, 3, 4), seed=7)
    assert one == bench_policy.random_indicators(("a", "b"), (2, 3, 4), seed=7)
    assert one != bench_policy.random_indicators(("a", "b"), (2, 3, 4), seed=8)
    for table in (one.weight, one.act):
        for row in table.values():
            assert row[2] > row[3] > row[4] > 0


def test_bench_policy_smoke(tmp_path):
    proc = _tool("bench_policy.py", "--smoke", "--nets", "small_mobilenet", "--budgets", "3", "--seeds", "1",
                 "--workers", "2", "--out", str(tmp_path / "bp"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "bp/results.json").read_text())
    assert {r["method"] for r in rows} == set(bench_policy.METHODS)
    assert all(r["bitops"] <= r["limit"] * (1 + 1e-9) for r in rows)
    assert all(0.0 <= r["mean"] <= 1.0 for r in rows)
    report = (tmp_path / "bp/results.md").read_text()
    assert "depthwise" in report and "one ILP search" in report
    assert (tmp_path / "bp/accuracy_vs_bitops.png").is_file()
    assert (tmp_path / "bp/bits_small_mobilenet_w3a3.png").is_file()
    # resumable: a second invocation finds every run done
    again = _tool("bench_policy.py", "--smoke", "--nets", "small_mobilenet", "--budgets", "3", "--seeds", "1",
                  "--workers", "1", "--out", str(tmp_path / "bp"), cwd=tmp_path)
    assert again.returncode == 0 and "0 fine-tuning runs to do" in again.stdout, again.stdout[-2000:]


def test_bench_zoo_smoke_and_resume(tmp_path):
    out = tmp_path / "zoo"
    proc = _tool("bench_zoo.py", "--models", "squeezenet1_1", "--samples", "4", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    row = json.loads((out / "squeezenet1_1.json").read_text())
    assert row["ok"] and row["input"] == 32 and row["fused"] == row["quantized"] > 0
    assert set(row["stages"]) == set(bench_zoo.STAGES)
    assert "1 of 1 torchvision classification models pass" in (out / "results.md").read_text()
    again = _tool("bench_zoo.py", "--models", "squeezenet1_1", "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0 and "[1/1]" not in again.stdout  # skipped: the result was kept


def test_bench_zoo_rejects_unknown_models(capsys):
    assert bench_zoo.main(["--models", "resnet18,not_a_model"]) == 2
    assert "not_a_model" in capsys.readouterr().err


def test_bench_zoo_render_lists_failures():
    rows = [{"model": "a", "ok": True, "stages": {"trace": {"ok": True, "seconds": 0.5}}, "input": 32, "layers": 3,
             "searchable": 1, "macs": 1e6, "search_ms": 1.0, "max_diff_steps": 0.0, "rel_l2": 0.0,
             "top1_agreement": 1.0, "fused": 3, "quantized": 3},
            {"model": "b", "ok": False, "stages": {}, "failed_stage": "trace", "reason": "TraceError: boom"}]
    text = bench_zoo.render(rows)
    assert "1 of 2" in text and "| b |" in text and "**b** at trace: TraceError: boom" in text
    amplified = {**rows[0], "model": "c", "strict_parity": False, "forced_max_steps": 1.0}
    text = bench_zoo.render([*rows, amplified])
    assert "2 of 3" in text and "1 with end-to-end parity" in text and "1 (c) faithful at every quantizer" in text
    assert "| ok, amplified (stage by stage 1.00 steps) |" in text and "| a |" in text


def test_bench_search_smoke(capsys):
    assert bench_search.main(["--sizes", "1", "--repeats", "1", "--time-limit", "30"]) == 0
    out = capsys.readouterr().out
    assert "| x1 | 52 |" in out and "Optimal solution found" in out


def test_bench_train_step_smoke(capsys):
    bench_train_step.main(["--models", "small_cnn", "--repeats", "1", "--bits", "2", "4"])
    out = capsys.readouterr().out
    assert "small_cnn" in out and "fq/fp32" in out


@pytest.mark.filterwarnings("ignore")
def test_bench_export_smoke(capsys):
    bench_export.main(["--models", "resnet18", "--batches", "1", "--size", "32", "--repeats", "1", "--warmup", "0",
                       "--threads", "1"])
    out = capsys.readouterr().out
    assert "21/21 layers as integer kernels, parity PASS" in out
    row = next(line for line in out.splitlines() if line.startswith("| resnet18 | 1 |"))
    fp32, qdq, ratio = (c.strip() for c in row.strip("|").split("|")[2:5])
    assert float(fp32) > 0 and float(qdq) > 0 and ratio.endswith("x")


@pytest.mark.filterwarnings("ignore")
def test_bench_int8_smoke(capsys, tmp_path):
    bench_int8.main(["--models", "resnet18", "--size", "32", "--repeats", "2", "--warmup", "0", "--calib", "2",
                     "--profile", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "resnet18: fxmpq W8A8 parity PASS" in out and "21/21 layers as integer kernels" in out
    rows = {line.split("|")[2].strip(): line for line in out.splitlines() if line.startswith("| resnet18 |")}
    assert set(rows) == {"fp32", "ort", "fxmpq"}
    assert "QLinearConv 20" in rows["ort"] and "QLinearConv 21" in rows["fxmpq"]
    assert "| QLinearConv |" in out  # the per-op-type profile
    assert (tmp_path / "resnet18_ort.onnx").is_file()
