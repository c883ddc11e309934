"""tools/lower.py: from a checkpoint to a checked ONNX model; one-line errors on corrupt or foreign files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import PlainCNN

from fxmpq.core.checkpoint import save_checkpoint, split_state
from fxmpq.core.options import TrainOptions
from fxmpq.stages import apply_policy, prepare
from fxmpq.train.train_state import Stage, checkpoint_meta

ROOT = Path(__file__).resolve().parents[1]
BITS = (2, 3, 4, 5, 6, 7, 8)


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    return subprocess.run([sys.executable, str(ROOT / "tools" / "lower.py"), *args], capture_output=True,
                          text=True, env=env, timeout=300)


def _checkpoint(path: Path) -> Path:
    x = torch.randn(4, 3, 16, 16)
    q = prepare(PlainCNN().eval(), x, bits=BITS)
    policy = {n: (3, 4) for n in q.searchable_names}
    apply_policy(q, policy, x)
    tensors, skeleton = split_state(q.state_dict(), "model")
    meta = {"kind": Stage.FINETUNE.value, **checkpoint_meta(q, {"model_factory": "models:PlainCNN"}),
            "model_state": skeleton}  # the schema training writes (fxmpq.train.train_state.ModelMeta), no optimizer
    return save_checkpoint(path, tensors, meta)


def test_lowers_a_checkpoint(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "m.onnx"
    r = _run(str(ckpt), "--out", str(out), "--samples", "32")
    assert r.returncode == 0, r.stderr
    assert out.is_file()
    assert "PASS" in r.stdout and "FP32 ONNX" in r.stdout and "3/3" in r.stdout


def test_lowers_a_checkpoint_with_packed_storage(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt.pt")
    r = _run(str(ckpt), "--out", str(tmp_path / "m.onnx"), "--samples", "8", "--storage", "packed", "--no-measure")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("storage"))
    assert "PASS" in r.stdout and line.startswith("storage        packed") and " int4" in line


def test_work_directory_and_model_override(tmp_path):
    _checkpoint(tmp_path / "finetune.pt")
    r = _run(str(tmp_path), "--out", str(tmp_path / "m.onnx"), "--model", "models:PlainCNN",
             "--input", "2x3x16x16", "--samples", "8")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b""])
def test_corrupt_checkpoint_one_line_error(tmp_path, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    r = _run(str(bad), "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "bad.pt" in lines[0]
    assert not (tmp_path / "m.onnx").exists()


def test_foreign_checkpoint_one_line_error(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    r = _run(str(foreign), "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not an fxmpq checkpoint" in lines[0]


def test_indicator_training_checkpoint_is_refused(tmp_path):
    import fxmpq

    q = prepare(PlainCNN().eval(), torch.randn(4, 3, 16, 16), bits=BITS)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))
    ckpt = tmp_path / "indicators.ckpt"
    fxmpq.train_indicators(
        q,
        data,
        TrainOptions(indicator_epochs=1, progress=False, batch_size=8, model_factory="models:PlainCNN"),
        checkpoint=ckpt,
    )
    r = _run(str(ckpt), "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 2  # before: the last random policy of joint training was exported, exit 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "indicators.ckpt: an indicator-training checkpoint" in lines[0], r.stderr
    assert "lower the fine-tuning checkpoint instead" in lines[0] and "finetune.pt" in lines[0]
    assert not (tmp_path / "m.onnx").exists()


def test_wrong_model_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt.pt")
    r = _run(str(ckpt), "--out", str(tmp_path / "m.onnx"), "--model", "models:ResidualNet")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")


@pytest.mark.parametrize("with_apply_policy", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_lowers_a_checkpoint_written_by_finetune(tmp_path, with_apply_policy):
    import fxmpq

    x = torch.randn(32, 3, 16, 16)
    y = torch.randint(0, 10, (32,))
    q = prepare(PlainCNN().eval(), x[:4], bits=BITS, per_channel=True)
    policy = {n: (3, 4) for n in q.searchable_names}
    if with_apply_policy:
        apply_policy(q, policy, x[:8])
    else:
        q.set_policy(policy)
    ckpt = tmp_path / "work" / "finetune.pt"
    data = torch.utils.data.TensorDataset(x, y)
    fxmpq.finetune(
        q,
        data,
        TrainOptions(
            finetune_epochs=1, lr=0.01, progress=False, batch_size=8, model_factory="models:PlainCNN"
        ),
        checkpoint=ckpt,
    )
    out = tmp_path / "m.onnx"
    r = _run(str(tmp_path / "work"), "--out", str(out), "--samples", "32")
    assert r.returncode == 0, r.stderr
    assert "PASS" in r.stdout and out.is_file()


def test_a_work_directory_without_finetune_pt_names_what_it_holds(tmp_path):
    """One schema, one file name: a work directory is read through its finetune.pt only; other .pt files are listed,
    not guessed at."""
    _checkpoint(tmp_path / "model.pt")
    r = _run(str(tmp_path), "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 2
    assert f"work directory {tmp_path} holds no finetune.pt (other .pt files: model.pt; give the checkpoint file" \
        in r.stderr


def test_a_checkpoint_missing_schema_keys_is_named(tmp_path):
    x = torch.randn(4, 3, 16, 16)
    q = prepare(PlainCNN().eval(), x, bits=BITS)
    tensors, skeleton = split_state(q.state_dict(), "model")
    save_checkpoint(tmp_path / "old.pt", tensors, {"kind": "finetune", "model_factory": "models:PlainCNN",
                                                   "input_shape": [1, 3, 16, 16], "model_state": skeleton})
    r = _run(str(tmp_path / "old.pt"), "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 2
    assert "old.pt: not written by fxmpq's training (its metadata lacks model_kwargs, example_shapes" in r.stderr


def test_strict_flag_reaches_lower(tmp_path, monkeypatch):
    """`fxmpq lower --strict` asks lower() for the strict criterion alone (docs/export.md)."""
    import fxmpq.cli.lower as cli

    ckpt = _checkpoint(tmp_path / "ckpt.pt")
    seen = {}
    real = cli.lower

    def spy(q, path, example, options, **kwargs):
        seen["strict"] = options.strict
        return real(q, path, example, options, **kwargs)

    monkeypatch.setattr(cli, "lower", spy)
    assert cli.main([str(ckpt), "--out", str(tmp_path / "m.onnx"), "--samples", "8", "--no-measure", "--strict"]) == 0
    assert seen["strict"] is True
    assert cli.main([str(ckpt), "--out", str(tmp_path / "m.onnx"), "--samples", "8", "--no-measure"]) == 0
    assert seen["strict"] is False
