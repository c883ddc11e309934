"""The `fxmpq` command: every subcommand listed and documented, the method stage by stage through `python -m fxmpq`
subprocesses on digits (run outside the checkout), `fxmpq quantize` then `fxmpq lower` (parity) and `fxmpq report`,
and bad input answered with one line naming the offending thing (no warning or traceback before it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch

from fxmpq.cli.main import COMMANDS, main
from fxmpq.core.checkpoint import save_checkpoint, split_state

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = {"analyze", "profile", "train-indicators", "search", "finetune", "lower", "quantize", "report"}
TINY = ["--quiet", "--batch-size", "32", "--max-steps", "1"]  # a step or two of each training: seconds, not minutes


def _fxmpq(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "fxmpq", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_help_lists_every_subcommand(tmp_path):
    proc = _fxmpq("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert set(COMMANDS) == SUBCOMMANDS
    listed = {line.split()[0] for line in proc.stdout.split("commands:\n")[1].split("\n\n")[0].splitlines()}
    assert listed == SUBCOMMANDS, proc.stdout
    assert proc.stderr == ""


def test_installed_command_and_packages_are_declared():
    """The console script points at the dispatcher, and every package under fxmpq/ ships (a non-editable install
    copies only the listed packages: a subpackage missing from the list is missing from the wheel)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"] == {"fxmpq": "fxmpq.cli.main:main"}
    listed = set(meta["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fxmpq").rglob("__init__.py")}
    assert found <= listed, f"not in [tool.setuptools] packages: {sorted(found - listed)}"


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fxmpq {name} ") and len(out.splitlines()) > 5


def test_unknown_command_and_bad_option_are_one_line(capsys):
    assert main(["lowr"]) == 2
    err = capsys.readouterr().err
    assert err == ("fxmpq: error: unknown command 'lowr': did you mean lower? expected one of quantize, analyze, "
                   "profile, train-indicators, search, finetune, lower, report (see fxmpq --help)\n")
    with pytest.raises(SystemExit) as exc:
        main(["lower", "ckpt.pt"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("fxmpq lower: error: the following arguments are required: --out "
                                       "(see fxmpq lower --help)\n")


def test_the_chain_stage_by_stage(tmp_path, monkeypatch, capsys):
    """train-indicators -> search -> finetune (from the joint-training state) -> lower, each a `python -m fxmpq`
    subprocess run outside the checkout, each reading the file the one before wrote; then `fxmpq report`."""
    run = tmp_path / "run"
    steps = [
        ("train-indicators", "small_resnet", "--dataset", "digits", "--samples", "64", *TINY, "--out", "run"),
        ("search", "--indicators", "run/indicators.json", "--model", "small_resnet", "--input", "1x16x16",
         "--budget", "w3a4", "--out", "run/policy.json"),
        ("finetune", "small_resnet", "--policy", "run/policy.json", "--dataset", "digits", "--joint", "run",
         "--samples", "64", "--val-samples", "32", *TINY, "--out", "run"),
        ("lower", "run", "--out", "run/model.onnx", "--samples", "8", "--no-measure"),
    ]
    out = {}
    for argv in steps:
        proc = _fxmpq(*argv, cwd=tmp_path)
        assert proc.returncode == 0, f"fxmpq {' '.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        out[argv[0]] = proc.stdout
    assert "written to run/indicators.json" in out["train-indicators"]
    assert "starting from the joint-training state in run/indicators.ckpt" in out["finetune"]
    # no FP32 weights anywhere: it trains on the labels rather than distilling from the untrained model
    assert "note: no FP32 weights (--weights, or fp32.pt beside --joint): fine-tuning on the labels" in out["finetune"]
    assert "fxmpq lower run --out run/model.onnx" in out["finetune"]
    assert "parity         PASS" in out["lower"] and (run / "model.onnx").is_file()
    monkeypatch.chdir(tmp_path)
    assert main(["report", "run"]) == 0
    report = capsys.readouterr().out
    searched = json.loads((run / "policy.json").read_text())["layers"]
    assert "layer1.conv1.0" in searched and "\nlayer1.conv1.0 " in report and "model.onnx" in report
    ckpt_meta = torch.load(run / "finetune.pt", weights_only=True)["meta"]
    assert json.loads(ckpt_meta)["model_factory"] == "small_resnet"


def test_quantize_then_lower_then_report(tmp_path, monkeypatch, capsys):
    """The acceptance run in small: `fxmpq quantize` on digits into a work dir, `fxmpq lower` of that work dir
    passes parity, `fxmpq report` reads it back; a second `fxmpq quantize` resumes (nothing is trained again)."""
    monkeypatch.chdir(tmp_path)
    argv = ["quantize", "small_mobilenet", "--dataset", "digits", "--input", "1x16x16", "--budget", "w3a3",
            "--work-dir", "W", "--samples", "64", "--val-samples", "32", "--no-export", *TINY]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "note: small_mobilenet starts from its initial weights" in out and "bitops" in out
    assert {"indicators.json", "policy.json", "finetune.pt", "summary.json"} <= {p.name for p in Path("W").iterdir()}
    assert main(["lower", "W", "--out", "W/m.onnx", "--samples", "16", "--no-measure"]) == 0
    assert "parity         PASS" in capsys.readouterr().out
    assert main(["report", "W"]) == 0
    report = capsys.readouterr().out
    assert "budget    bitops<=uniform W3A3" in report and "features.0.0.0" in report
    mtime = Path("W/finetune.pt").stat().st_mtime_ns
    assert main(argv) == 0
    assert Path("W/finetune.pt").stat().st_mtime_ns == mtime  # resumed from the finished run: nothing retrained


def warning_net():
    """A model factory that warns as it builds (as some torchvision models do), for a foreign checkpoint."""
    warnings.warn("this factory warns while building the model", UserWarning, stacklevel=2)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))


def _bad_files(d: Path) -> dict[str, Path]:
    torch.save({"weight": torch.zeros(3)}, d / "protocol4.pt", pickle_protocol=4)  # torch warns reading it
    tensors, skeleton = split_state({"fc.weight": torch.zeros(2)}, "model")
    meta = {"kind": "finetune", "model_factory": f"{__name__}:warning_net", "model_kwargs": {},
            "example_shapes": [[1, 1, 16, 16]], "bits": [2, 3, 4], "act_bits": [2, 3, 4], "per_channel": False,
            "hardware": {"name": "bitops", "path": ""}, "policy": {"0": [4, 4]}, "model_state": skeleton}
    save_checkpoint(d / "foreign.pt", tensors, meta)  # the schema's keys, another model's policy and weights
    (d / "hw.toml").mkdir()
    (d / "empty").mkdir()
    (d / "a_file").write_text("x")
    return {"dir": d, "mod": __name__}


BAD = [
    (["lower", "{dir}/protocol4.pt", "--out", "{dir}/m.onnx"], "fxmpq lower: error: {dir}/protocol4.pt: not a "
     "readable fxmpq checkpoint"),
    (["lower", "{dir}/foreign.pt", "--out", "{dir}/m.onnx"], "fxmpq lower: error: {dir}/foreign.pt: its policy does "
     "not fit model {mod}:warning_net"),
    (["analyze", "small_resnet", "--input", "1x16x16", "--hardware", "{dir}/hw.toml"],
     "fxmpq analyze: error: {dir}/hw.toml: is a directory"),
    (["quantize", "small_resnet", "--dataset", "digits", "--budget", "c0.5", "--work-dir", "{dir}/w"],
     "fxmpq quantize: error: budget 'c0.5': compression ratio 0.5 is below 1"),
    (["quantize", "small_resnet", "--dataset", "digits", "--input", "1x28x28", "--budget", "w4a4", "--work-dir",
      "{dir}/w"], "fxmpq quantize: error: --input 1x28x28: dataset digits has samples of shape 1x16x16"),
    (["quantize", "small_resnet", "--dataset", "nosuch.mod:fn", "--budget", "w4a4", "--work-dir", "{dir}/w"],
     "fxmpq quantize: error: --dataset: dataset 'nosuch.mod:fn': cannot import"),
    (["quantize", "small_resnet", "--dataset", "digits", "--budget", "w4a4", "--work-dir", "{dir}/a_file"],
     "fxmpq quantize: error: --work-dir"),
    (["finetune", "small_resnet", "--policy", "{dir}/missing.json", "--dataset", "digits", "--out", "{dir}/f"],
     "fxmpq finetune: error: cannot read policy file {dir}/missing.json"),
    (["finetune", "small_resnet", "--policy", "{dir}/missing.json", "--dataset", "digits", "--samples", "0",
      "--out", "{dir}/f"], "fxmpq finetune: error: --samples 0: expected an integer >= 1"),
    (["report", "{dir}/empty"], "fxmpq report: error: {dir}/empty holds no policy.json"),
    (["report", "{dir}/a_file"], "fxmpq report: error: {dir}/a_file: not a directory"),
]


@pytest.mark.parametrize(("argv", "start"), BAD, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_input_is_one_line_naming_it(argv, start, tmp_path, capfd):
    files = _bad_files(tmp_path)
    argv = [a.format(**files) for a in argv]
    start = start.format(**files)
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # a warning the command let through would be printed
        code = main(argv)
    out, err = capfd.readouterr()
    assert code == 2, (out, err)
    assert err.startswith(start), err
    assert err.count("\n") == 1 and "Warning" not in err and "Traceback" not in err, err


def test_finetune_joint_must_name_an_indicator_checkpoint(tmp_path, capfd):
    (tmp_path / "p.json").write_text('{"format": "fxmpq.policy/1", "layers": {}}')
    (tmp_path / "nojoint").mkdir()
    code = main(["finetune", "small_resnet", "--policy", str(tmp_path / "p.json"), "--dataset", "digits",
                 "--joint", str(tmp_path / "nojoint"), "--out", str(tmp_path / "f")])
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"--joint {tmp_path / 'nojoint'}: folder {tmp_path / 'nojoint'} holds no indicators.ckpt" in err


def test_quantize_builds_the_model_from_the_seed(tmp_path, monkeypatch, capsys):
    """Two fresh `fxmpq quantize` runs with one --seed start from the same initial weights (the model used to be
    built before anything was seeded, so two runs trained two different FP32 models)."""
    import fxmpq.cli.quantize as cli_quantize
    from fxmpq.errors import ArgumentError

    seen = []

    def build(spec, kwargs):
        seen.append(torch.rand(4))
        raise ArgumentError("stop here")
    monkeypatch.setattr(cli_quantize, "build_model", build)
    argv = ["quantize", "small_mobilenet", "--dataset", "digits", "--input", "1x16x16", "--budget", "w3a3", "--seed", "3",
            "--work-dir", str(tmp_path / "w")]
    torch.rand(7)  # the global generator is anywhere before the call
    assert main(argv) == 2
    assert main(argv) == 2
    capsys.readouterr()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
