"""The README's examples run as written: the Python API block, every `python tools/...` and `torchrun` command, the
hardware file. Commands run in order of appearance in one scratch directory (tools/ mapped to the repository's)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

import fxmpq

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert m, f"README has no section {title!r}"
    return m.group(1)


def _blocks(text: str, lang: str = "") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def readme_commands() -> list[str]:
    """Every `python tools/...` and `torchrun ...` command, in fenced blocks or inline code, in README order."""
    found = []
    for m in re.finditer(r"^(?:python tools/|torchrun ).*$|`((?:python tools/|torchrun )[^`]*)`", README, re.M):
        found.append((m.start(), (m.group(1) or m.group(0)).strip()))
    return [c for _, c in sorted(found)]


def _run(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(cmd)
    if argv[0] == "python":
        argv = [sys.executable, str(ROOT / argv[1]), *argv[2:]]
    else:  # torchrun: the same interpreter's torch.distributed.run
        script = next(i for i, a in enumerate(argv) if a.startswith("tools/"))
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:script], str(ROOT / argv[script]),
                *argv[script + 1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_readme_lists_the_commands_it_promises():
    cmds = readme_commands()
    tools = {shlex.split(c)[1] if c.startswith("python") else "torchrun" for c in cmds}
    assert {"tools/analyze.py", "tools/train_indicators.py", "tools/search.py", "tools/lower.py", "torchrun"} <= tools
    assert "make demo" in README and "make test" in README


def test_readme_hardware_file_loads(tmp_path):
    (toml,) = _blocks(_section("Hardware descriptions"), "toml")
    path = tmp_path / "my_npu.toml"
    path.write_text(toml)
    hw = fxmpq.load_hardware(path)
    assert hw.name == "my_npu" and set(hw.metrics) == {"latency", "size"}
    assert fxmpq.Budget.parse("latency<=200").metrics == ["latency"]


def test_readme_python_block_then_every_command(tmp_path, monkeypatch):
    (block,) = _blocks(_section("Python API"), "python")
    monkeypatch.chdir(tmp_path)
    (toml,) = _blocks(_section("Hardware descriptions"), "toml")
    (tmp_path / "my_npu.toml").write_text(toml)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    r = namespace["r"]
    assert r.analysis.cost(r.policy)["bitops"] <= fxmpq.Budget.uniform(3, 4).resolve(r.analysis)["bitops"] * (1 + 1e-9)
    assert (tmp_path / "runs/r18/model.onnx").is_file()
    for cmd in readme_commands():
        proc = _run(cmd, tmp_path)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        if "analyze.py" in cmd:
            assert "metric      total" in proc.stdout, proc.stdout
    assert (tmp_path / "runs/cli/policy.json").is_file()
    assert (tmp_path / "runs/ddp/indicators.json").is_file()
    assert (tmp_path / "runs/r18/model_cli.onnx").is_file()

