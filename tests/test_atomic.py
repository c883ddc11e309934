"""fxmpq.core.atomic: a failing writer leaves the old file intact and no temp file; groups (ONNX + external data)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fxmpq.core.atomic import atomic_path, atomic_paths, atomic_write_text
from fxmpq.core.checkpoint import load_checkpoint, save_checkpoint
from fxmpq.core.jsonio import dump_json
from fxmpq.errors import ArgumentError


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_atomic_path_writes_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "dir" / "a.txt"  # parents are created
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".a.txt.") and tmp.name.endswith(".tmp")
        assert tmp.is_file() and not target.exists()  # the temp is reserved; the target appears only at the end
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert _leftovers(target.parent) == []
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0o600


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failing_writer_leaves_old_file_and_no_temp(tmp_path, exc):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(type(exc)):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the ne")
            raise exc
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_write_text_replaces_an_existing_file(tmp_path):
    target = tmp_path / "c.txt"
    target.write_text("old")
    assert atomic_write_text(target, "é") == target
    assert target.read_text(encoding="utf-8") == "é"
    assert _leftovers(tmp_path) == []


def test_interrupted_checkpoint_and_json_writes_keep_the_old_files(tmp_path, monkeypatch):
    ck = save_checkpoint(tmp_path / "run.ckpt", {"a": torch.arange(3)}, {"epoch": 1})
    dump_json({"v": 1}, tmp_path / "p.json")

    def interrupted(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ck, {"a": torch.arange(5)}, {"epoch": 2})
    tensors, meta = load_checkpoint(ck)
    assert meta == {"epoch": 1} and torch.equal(tensors["a"], torch.arange(3))

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        dump_json({"v": 2}, tmp_path / "p.json")
    assert (tmp_path / "p.json").read_bytes() == b'{\n "v": 1\n}\n'
    assert _leftovers(tmp_path) == []


def test_atomic_paths_replaces_a_file_and_its_sidecar(tmp_path):
    main, side = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    main.write_text("old main")
    side.write_text("old data")
    with atomic_paths(main, side) as (t_main, t_side):
        assert t_main.name == "m.onnx" and t_side.name == "m.onnx.data"  # final names, in a temp directory
        assert t_main.parent == t_side.parent and t_main.parent.parent == tmp_path
        assert t_main.parent.name.startswith(".m.onnx.") and t_main.parent.name.endswith(".tmp")
        t_main.write_text("new main")
        t_side.write_text("new data")
    assert main.read_text() == "new main" and side.read_text() == "new data"
    assert _leftovers(tmp_path) == []


def test_atomic_paths_failure_keeps_every_old_file(tmp_path):
    main, side = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    main.write_text("old main")
    side.write_text("old data")
    with pytest.raises(KeyboardInterrupt):
        with atomic_paths(main, side) as (t_main, t_side):
            t_side.write_text("new data")
            t_main.write_text("new ma")
            raise KeyboardInterrupt
    assert main.read_text() == "old main" and side.read_text() == "old data"
    assert _leftovers(tmp_path) == []


def test_atomic_paths_removes_a_stale_sidecar_and_requires_the_main_file(tmp_path):
    main, side = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    main.write_text("old main")
    side.write_text("old data")
    with pytest.raises(FileNotFoundError, match="the writer did not create it"):
        with atomic_paths(main, side) as (_, t_side):
            t_side.write_text("new data")
    assert main.read_text() == "old main" and side.read_text() == "old data"
    with atomic_paths(main, side) as (t_main, _):
        t_main.write_text("small model, no external data")
    assert main.read_text() == "small model, no external data" and not side.exists()
    assert _leftovers(tmp_path) == []


def test_atomic_paths_rejects_files_in_different_directories(tmp_path):
    (tmp_path / "d").mkdir()
    for paths in ((tmp_path / "a", tmp_path / "d" / "b"), (tmp_path / "a", tmp_path / "a")):
        with pytest.raises(ArgumentError, match="distinct files in one directory"):
            with atomic_paths(*paths):
                pass
    assert _leftovers(tmp_path) == []


def test_onnx_with_external_data_through_atomic_paths(tmp_path):
    """What fxmpq.export.lower needs: onnx.save_model with external data refers to the sidecar by its final name."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(4096, dtype=np.float32).reshape(64, 64)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph)
    path = tmp_path / "out" / "model.onnx"
    data = path.with_name(path.name + ".data")
    with atomic_paths(path, data) as (tmp, tmp_data):
        onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=0)
        assert tmp_data.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    refs = onnx.load(str(path), load_external_data=False).graph.initializer[0].external_data
    assert {e.key: e.value for e in refs}["location"] == "model.onnx.data"
    assert np.array_equal(numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0]), w)
