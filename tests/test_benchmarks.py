"""Smoke runs of every benchmark script at tiny sizes, as subprocesses, so that they cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import PlainCNN, TinyAttention

import fxmpq
from fxmpq.hardware.spec import LayerKind

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"uniform", "fxmpq", "hessian", "random-1", "random-2", "random-3", "inverted"}  # bench_policy's
STAGES = {"input", "trace", "prepare", "indicators", "search", "apply", "lower", "validate"}  # bench_zoo's


def _tool(name: str, *args: str, cwd: Path, tiny_models: bool = False, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    if tiny_models:  # "models:PlainCNN" names the tests' tiny models
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bench_policy_smoke(tmp_path):
    proc = _tool("bench_policy.py", "--smoke", "--nets", "small_mobilenet", "--budgets", "3", "--seeds", "1",
                 "--workers", "2", "--out", str(tmp_path / "bp"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "bp/results.json").read_text())
    assert {r["method"] for r in rows} == METHODS
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
    assert set(row["stages"]) == STAGES
    assert "1 of 1 torchvision classification models pass" in (out / "results.md").read_text()
    again = _tool("bench_zoo.py", "--models", "squeezenet1_1", "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0 and "[1/1]" not in again.stdout  # skipped: the result was kept


def test_bench_zoo_rejects_unknown_models(tmp_path):
    proc = _tool("bench_zoo.py", "--models", "resnet18,not_a_model", cwd=tmp_path)
    assert proc.returncode == 2 and "not_a_model" in proc.stderr, proc.stderr[-2000:]


def test_bench_zoo_report_lists_failures(tmp_path):
    """The report is rendered from the kept per-model results (the models are not run again)."""
    ok = {"model": "alexnet", "ok": True, "stages": {"trace": {"ok": True, "seconds": 0.5}}, "input": 32, "layers": 3,
          "searchable": 1, "macs": 1e6, "search_ms": 1.0, "max_diff_steps": 0.0, "rel_l2": 0.0,
          "top1_agreement": 1.0, "fused": 3, "quantized": 3}
    rows = [ok, {"model": "vgg11", "ok": False, "stages": {}, "failed_stage": "trace", "reason": "TraceError: boom"},
            {**ok, "model": "vgg13", "strict_parity": False, "forced_max_steps": 1.0}]
    out = tmp_path / "zoo"
    out.mkdir()
    for r in rows:
        (out / f"{r['model']}.json").write_text(json.dumps(r))
    proc = _tool("bench_zoo.py", "--models", "alexnet,vgg11", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]  # a failure among the results
    text = (out / "results.md").read_text()
    assert "1 of 2" in text and "| vgg11 |" in text and "**vgg11** at trace: TraceError: boom" in text
    proc = _tool("bench_zoo.py", "--models", "alexnet,vgg11,vgg13", "--out", str(out), cwd=tmp_path)
    text = (out / "results.md").read_text()
    assert "[1/3]" not in proc.stdout and text in proc.stdout + "\n"
    assert "2 of 3" in text and "1 with end-to-end parity" in text and "1 (vgg13) faithful at every quantizer" in text
    assert "| ok, amplified (stage by stage 1.00 steps) |" in text and "| alexnet |" in text
    # a row judged by lower()'s noise-floor criterion shows ONNX Runtime's figure and the floor's side by side
    faithful = {**ok, "model": "vgg16", "strict_parity": False, "forced_max_steps": 1.0, "max_diff_steps": 13.0,
                "criterion": "faithful: within PyTorch's own noise floor", "floor_steps": 18.0}
    (out / "vgg16.json").write_text(json.dumps(faithful))
    proc = _tool("bench_zoo.py", "--models", "alexnet,vgg16", "--out", str(out), cwd=tmp_path)
    text = (out / "results.md").read_text()
    assert proc.returncode == 0 and "1 (vgg16) faithful at every quantizer" in text, proc.stderr[-2000:]
    assert "no further than PyTorch's own noise floor allows" in text
    assert "| ok, faithful (ONNX Runtime 13.00 steps, PyTorch's own noise floor 18.00) |" in text


def test_bench_search_smoke(tmp_path):
    proc = _tool("bench_search.py", "--sizes", "1", "--repeats", "1", "--time-limit", "30", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| x1 | 52 |" in proc.stdout and "Optimal solution found" in proc.stdout


def test_bench_train_step_smoke(tmp_path):
    proc = _tool("bench_train_step.py", "--models", "small_cnn", "--repeats", "1", "--bits", "2", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "small_cnn" in proc.stdout and "fq/fp32" in proc.stdout and "sandw/joint" in proc.stdout


def test_bench_export_smoke(tmp_path):
    proc = _tool("bench_export.py", "--models", "resnet18", "--batches", "1", "--size", "32", "--repeats", "1",
                 "--warmup", "0", "--threads", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "21/21 layers as integer kernels, parity PASS" in out
    row = next(line for line in out.splitlines() if line.startswith("| resnet18 | 1 |"))
    fp32, qdq, ratio = (c.strip() for c in row.strip("|").split("|")[2:5])
    assert float(fp32) > 0 and float(qdq) > 0 and ratio.endswith("x")


def test_profile_hw_smoke_writes_a_measured_hardware_file(tmp_path):
    """tools/profile_hw.py on a tiny model: the file parses, matches the model and prices every layer and format
    (no assertion on the timings themselves)."""
    out = tmp_path / "hw.toml"
    proc = _tool("profile_hw.py", "models:PlainCNN", "--input", "3x16x16", "--repeats", "3", "--quiet", "--out",
                 str(out), cwd=tmp_path, tiny_models=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "rest of the model" in proc.stdout and f"wrote {out}" in proc.stdout
    hw = fxmpq.load_hardware(out)
    assert set(hw.metrics) == {"latency", "bytes", "packed_bytes"} and hw.metrics["latency"].unit == "ms"
    assert hw.pairs == ((2, 8), (4, 8), (8, 8), (8, 16)) and hw.weight_only_bits == (2, 4, 8)
    prov = hw.provenance
    assert (prov.model, prov.input, prov.batch, prov.threads, prov.repeats) == ("models:PlainCNN", "3x16x16", 1, 1, 3)
    assert prov.runtime.startswith("onnxruntime ") and prov.cpu and prov.clock == "thread_cpu"
    assert "profile_hw.py models:PlainCNN --input 3x16x16" in prov.command
    a = fxmpq.analyze(PlainCNN(), torch.randn(1, 3, 16, 16), hardware=out)
    for m in a.layers:
        extra = {(2, None), (4, None), (8, None)} if m.kind.value == "linear" else set()
        assert set(m.costs) == {(2, 8), (4, 8), (8, 8), (8, 16), (None, None)} | extra
        assert m.costs[(8, 16)]["latency"] > 0 and m.costs[(8, 8)]["bytes"] > 0  # W8A16 measured
        assert m.costs[(4, 8)]["latency"] == m.costs[(8, 8)]["latency"]  # the same kernel
        assert m.costs[(4, 8)]["packed_bytes"] < m.costs[(4, 8)]["bytes"] == m.costs[(8, 8)]["bytes"]
    assert a.layer("conv2").chain_costs  # conv2 reads conv1 back to back: the pair was measured
    assert a.cost({n: (8, 8) for n in a.names})["latency"] > 0
    bad = _tool("profile_hw.py", "small_resnet", "--input", "1x16", "--out", str(tmp_path / "x.toml"), cwd=tmp_path)
    assert bad.returncode == 1 and "error:" in bad.stderr


def test_profile_hw_times_the_attention_matmuls(tmp_path):
    """Attention's two matmuls are timed alone in every format (W8A8 as MatMulIntegerToFloat, W8A16, float) and
    priced in the file, with no weight bytes; the file offers them float."""
    out = tmp_path / "hw.toml"
    proc = _tool("profile_hw.py", "models:TinyAttention", "--input", "4x8", "--repeats", "3", "--quiet", "--out",
                 str(out), cwd=tmp_path, tiny_models=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    hw = fxmpq.load_hardware(out)
    assert LayerKind.MATMUL in hw.float_kinds
    a = fxmpq.analyze(TinyAttention(), torch.randn(1, 4, 8), hardware=out)
    matmuls = [m for m in a.layers if m.kind is LayerKind.MATMUL]
    assert [m.name for m in matmuls] == ["matmul", "matmul#1"]
    for m in matmuls:
        assert set(m.costs) == {(2, 8), (4, 8), (8, 8), (8, 16), (None, None)}
        assert all(c["latency"] > 0 and c["bytes"] == 0 for c in m.costs.values())
        assert not m.chain_costs


def test_bench_measured_smoke(tmp_path):
    out = tmp_path / "bm"
    proc = _tool("bench_measured.py", "--smoke", "--quiet", "--models", "models:PlainCNN", "--input", "3x16x16",
                 "--budgets", "2", "--out", str(out), cwd=tmp_path, tiny_models=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in rows] == ["models:PlainCNN"] and len(rows[0]["rows"]) == 2
    assert set(rows[0]["spread"]) == {"layers_median", "layers_p90", "layers_max", "float_model", "int8_model"}
    for r in rows[0]["rows"]:
        assert r["measured"] > 0 and r["predicted"] > 0 and isinstance(r["parity"], bool)
    text = (out / "results.md").read_text()
    assert "measured/predicted" in text and "Profiled twice" in text
    assert len(list(out.glob("*_profile[12].toml"))) == 2
def test_bench_int8_smoke(tmp_path):
    proc = _tool("bench_int8.py", "--models", "resnet18", "--size", "32", "--repeats", "2", "--warmup", "0",
                 "--calib", "2", "--profile", "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "resnet18: fxmpq W8A8 parity PASS" in out and "21/21 layers as integer kernels" in out
    rows = {line.split("|")[2].strip(): line for line in out.splitlines() if line.startswith("| resnet18 |")}
    assert set(rows) == {"fp32", "ort", "fxmpq"}
    assert "QLinearConv 20" in rows["ort"] and "QLinearConv 21" in rows["fxmpq"]
    assert "| QLinearConv |" in out  # the per-op-type profile
    assert (tmp_path / "resnet18_ort.onnx").is_file()


def test_bench_latency_policy_smoke(tmp_path):
    """Fashion-MNIST (or digits) under a measured-latency budget: the tool runs end to end and every policy it
    searched stays within its predicted budget (no assertion on accuracy or timings)."""
    out = tmp_path / "blp"
    proc = _tool("bench_latency_policy.py", "--smoke", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [r["policy"] for r in res["rows"]] == ["uniform-int8", "fxmpq@0.5", "random@0.5"]
    for r in res["rows"]:
        assert r["measured"] > 0 and 0.0 <= r["acc"][0] <= 1.0
        assert r["budget"] is None or r["predicted"] <= r["budget"] * (1 + 1e-9)
    assert "measured/budget" in (out / "results.md").read_text()


@pytest.mark.slow  # a profile and four fine-tunes: ~70 s on an idle machine, and the latency run covers the tool
def test_bench_latency_policy_size_run_smoke(tmp_path):
    """The file-size run: budgets on packed_bytes, packed exports, the bytes in the file next to the prediction."""
    out = tmp_path / "bsp"
    proc = _tool("bench_latency_policy.py", "--smoke", "--metric", "packed_bytes", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [r["policy"] for r in res["rows"]] == ["uniform-int8", "uniform-W4A8", "fxmpq@0.5", "random@0.5"]
    rows = {r["policy"]: r for r in res["rows"]}
    for r in res["rows"]:
        assert r["budget"] is None or r["predicted"] <= r["budget"] * (1 + 1e-9)
        assert r["measured"] == r["layer_bytes"] > 0 and r["parity"]
    # the file carries the bytes the profile predicts (weights, bias, scales as stored), within 5 %; uniform-int8
    # is the calibration point of what belongs to no layer
    assert all(abs(r["measured"] / r["predicted"] - 1) < 0.05 for r in res["rows"][1:]), res["rows"]
    assert rows["uniform-W4A8"]["measured"] < rows["uniform-int8"]["measured"]
    assert "file/budget" in (out / "results.md").read_text()


def test_bench_formats_smoke(tmp_path):
    proc = _tool("bench_formats.py", "--smoke", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): [c.strip() for c in line.strip("|").split("|")]
            for line in proc.stdout.splitlines() if line.startswith(("| conv |", "| linear |"))}
    assert rows[("conv", "W8A8")][3] == "QLinearConv (integer)"
    assert rows[("conv", "W4A8 packed, fxmpq.ort_session")][3] == "QLinearConv (integer)"
    assert rows[("conv", "W8A16")][3] == "Conv" and rows[("linear", "W4 weight-only")][3] == "MatMulNBits"
    assert all(r[-1] == "pass" for r in rows.values())


def test_bench_checkpoint_smoke(tmp_path):
    proc = _tool("bench_checkpoint.py", "--steps", "3", "--batch-size", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "one checkpoint" in proc.stdout and "of the training time" in proc.stdout


def test_bench_storage_smoke(tmp_path):
    proc = _tool("bench_storage.py", "--smoke", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "resnet18 int8: parity PASS" in out and "resnet18 packed: parity PASS" in out
    rows = {r[1]: r for r in (line.strip("|").split("|") for line in out.splitlines()
                              if line.startswith("| resnet18 |"))}
    rows = {k.strip(): [c.strip() for c in v] for k, v in rows.items()}
    int8, plain, widened = rows["int8 file"], rows["packed, plain session"], rows["packed, fxmpq.ort_session"]
    assert float(plain[2]) < 0.6 * float(int8[2])  # 19 of 21 layers at 4 bits: about half the file
    assert plain[3] == plain[4]  # the packed file's weights take the policy's packed bytes (all <= 4 or 8 bits)
    assert int8[7] == widened[7] == "21/21" and plain[7] != "21/21"


def test_bench_weight_only_smoke(tmp_path):
    proc = _tool("bench_weight_only.py", "--smoke", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| FP32 MatMul |" in proc.stdout
    assert all(f"| MatMulNBits {b}-bit, accuracy_level 4 |" in proc.stdout for b in (2, 4, 8))


PEER_FREE = {"uniform", "fxmpq", "fxmpq-sandwich", "fxmpq-verify", "measured", "blend", "kl", "hessian", "random-1", "random-2", "inverted"}


def test_bench_peers_smoke_without_peers(tmp_path):
    """The side-by-side benchmark's peer-free path: every method priced within its budget, fxmpq's policy
    exported with parity, the rank study's sources, the report and plot; a second run has nothing to do."""
    args = ("--smoke", "--nets", "small_mobilenet", "--budgets", "bitops-w4a4,size-w3", "--seeds", "1",
            "--workers", "1", "--peers", "", "--out", str(tmp_path / "bp"))
    proc = _tool("bench_peers.py", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "bp/results.json").read_text())
    plan = res["plan"]
    main = {e["method"] for e in plan if not (e["method"].startswith("random-") and int(e["method"][7:]) > 2)}
    assert main == PEER_FREE
    assert {e["budget"] for e in plan} == {"bitops-w4a4", "size-w3"}
    assert all(e["cost"] <= e["limit"] * (1 + 1e-9) for e in plan)
    runs = {(r["key"], r["seed"]): r for r in res["runs"]}
    fx = [e for e in plan if e["method"] == "fxmpq"]
    assert all(runs[(e["key"], 0)]["export"]["passed"] for e in fx)
    rank = [e for e in plan if e["budget"] == "bitops-w4a4" and e["method"].startswith("random-")]
    assert len({e["key"] for e in rank}) >= 3 and all(
        {"LIMPQ objective", "LIMPQ objective, sandwich joint step", "Hessian objective", "joint-model top-1"}
        <= set(e["pred"]) for e in rank)
    report = (tmp_path / "bp/results.md").read_text()
    assert "Rank correlation at bitops-w4a4" in report and "Where fxmpq wins, ties and loses" in report
    assert (tmp_path / "bp/accuracy_vs_cost_small_mobilenet.png").is_file()
    again = _tool("bench_peers.py", *args, cwd=tmp_path)
    assert again.returncode == 0 and ", 0 to do" in again.stdout, again.stdout[-2000:]
    drift = _tool("indicator_drift.py", "--smoke", "--out", str(tmp_path / "bp"), "--nets", "small_mobilenet",
                  cwd=tmp_path)
    assert drift.returncode == 0 and "| small_mobilenet | " in drift.stdout, drift.stdout[-2000:] + drift.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("peer", ["aimet", "modelopt"])
def test_bench_peers_runs_a_peer_when_its_environment_exists(tmp_path, peer):
    """One peer end to end (its own venv from tools/peers/make_env.sh): its policy is mapped, priced by
    fxmpq within the budget (or flagged), fine-tuned and exported with parity."""
    python = Path(os.environ.get(f"FXMPQ_{peer.upper()}_PYTHON", ROOT / f".venv-{peer}" / "bin" / "python"))
    if not python.is_file():
        pytest.skip(f"no {peer} environment at {python} (tools/peers/make_env.sh {peer})")
    proc = _tool("bench_peers.py", "--smoke", "--nets", "small_mobilenet", "--seeds", "1", "--workers", "1",
                 "--peers", peer, f"--{peer}-python", str(python), "--out", str(tmp_path / "bp"), cwd=tmp_path,
                 timeout=3600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "bp/results.json").read_text())
    rows = [e for e in res["plan"] if e["method"] == peer]
    assert rows, proc.stdout[-3000:]
    runs = {(r["key"], r["seed"]): r for r in res["runs"]}
    for e in rows:
        assert e["cost"] <= e["limit"] * (1 + 1e-9) or e["fits"] is False
        assert runs[(e["key"], 0)]["export"]["passed"], runs[(e["key"], 0)]["export"]


def test_fit_ort_cpu_writes_a_generic_target_that_prices_what_it_was_fitted_on(tmp_path):
    """tools/fit_ort_cpu.py on the shipped resnet18 profile: the generic file it writes loads, offers ONNX Runtime's
    CPU formats to every layer kind, and prices the fitted model's uniform policies close to the profiled file."""
    import shutil

    import fxmpq
    from fxmpq.hardware.spec import FLOAT, LayerKind

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    shutil.copy(ROOT / "hardware" / "ort_cpu_resnet18.toml", profiles / "resnet18.toml")
    out = tmp_path / "ort_cpu.toml"
    proc = _tool("fit_ort_cpu.py", "--profiles", str(profiles), "--fit", "resnet18", "--test", "resnet18",
                 "--policies", "4", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    hw = fxmpq.load_hardware(out)
    profiled = fxmpq.load_hardware(profiles / "resnet18.toml").provenance
    assert hw.name == "ort_cpu" and hw.provenance.isa == profiled.isa  # the profiled CPU's, not this machine's
    assert hw.provenance.cpu == profiled.cpu and hw.chained  # format boundaries priced per input element
    for kind in LayerKind:
        assert {(8, 8), (4, 8), (2, 8), (8, 16), FLOAT} <= set(hw.formats(kind))
    assert {(2, None), (4, None), (8, None)} <= set(hw.formats(LayerKind.LINEAR))
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| resnet18 | all ")]
    assert len(rows) == 3
    for row in rows:  # the uniform policies it was fitted on: within 5 %
        assert abs(float(row.split("|")[5].strip(" %+"))) <= 5.0, row
