"""The README's examples run as written: the Python API block, every `fxmpq ...` and `torchrun` command, the hardware
file. Commands run in order of appearance in one scratch directory outside the checkout (`fxmpq` as `python -m
fxmpq`, `torchrun` as `python -m torch.distributed.run`, both of this interpreter)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

import fxmpq
from fxmpq.cli.main import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert m, f"README has no section {title!r}"
    return m.group(1)


def _blocks(text: str, lang: str = "") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def readme_commands() -> list[str]:
    """Every `fxmpq SUBCOMMAND ...` (with arguments) and `torchrun ...` command, in fenced blocks or inline code, in
    README order; prose naming a subcommand (`fxmpq lower`) or a placeholder (`fxmpq COMMAND --help`) is not run."""
    found = []
    for m in re.finditer(r"^(?:fxmpq |torchrun ).*$|`((?:fxmpq |torchrun )[^`]*)`", README, re.M):
        cmd = (m.group(1) or m.group(0)).strip()
        argv = shlex.split(cmd)
        if argv[0] == "torchrun" or argv[1:] == ["--help"] or (argv[1] in COMMANDS and len(argv) > 2):
            found.append((m.start(), cmd))
    return [c for _, c in sorted(found)]


def _run(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(cmd)
    head = ["-m", "fxmpq"] if argv[0] == "fxmpq" else ["-m", "torch.distributed.run"]  # torchrun ... -m fxmpq ...
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, *head, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_readme_lists_the_commands_it_promises():
    cmds = readme_commands()
    named = {shlex.split(c)[1] if c.startswith("fxmpq") else "torchrun" for c in cmds}
    assert {"quantize", "analyze", "train-indicators", "search", "finetune", "lower", "report", "torchrun"} <= named
    assert "make demo" in README and "make test" in README
    assert any("-m fxmpq train-indicators" in c for c in cmds if c.startswith("torchrun"))


def test_readme_first_screen_shows_what_it_is_how_to_run_it_and_both_interfaces():
    first = README[: README.index("## The method")]
    assert len(first.splitlines()) <= 70
    for heading in ("## Two commands", "## Python API", "## Command line"):
        assert heading in first
    assert "fxmpq quantize " in first and "fxmpq.quantize(" in first


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
        if cmd.startswith("fxmpq analyze"):
            assert "metric      total" in proc.stdout, proc.stdout
        if cmd.startswith("fxmpq lower"):
            assert "parity         PASS" in proc.stdout, proc.stdout
    for made in ("runs/q/model_cli.onnx", "runs/cli/policy.json", "runs/cli/finetune.pt", "runs/cli/model.onnx",
                 "runs/ddp/indicators.json"):
        assert (tmp_path / made).is_file(), made

