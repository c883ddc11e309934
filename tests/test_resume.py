"""quantize(work_dir=...) killed with SIGKILL and started again ends exactly where an uninterrupted run ends.

The run is a subprocess on TinyNet: 6 batches per epoch, 2 epochs of indicator training and 2 of fine-tuning, a
checkpoint every 2 optimizer steps. The kill points are made deterministic by the script itself: the data
object counts the batches fetched (the early data check fetches one; each epoch fetches six) and kills its own
process at a given fetch; for the kill during a checkpoint write, torch.save writes half of the file and then the
process kills itself. The restarted run (same command, no kill) must produce the same indicators.json,
policy.json and fine-tuned weights as the uninterrupted run, bit for bit, and leave no temp file behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxmpq.core.checkpoint import load_checkpoint

TESTS = Path(__file__).resolve().parent

SCRIPT = r"""
import os, signal, sys
import torch
sys.path.insert(0, sys.argv[2])
from _quant_models import TinyNet
import fxmpq

KILL = os.environ.get("FXMPQ_TEST_KILL", "")
fetched = [0]
saved = [0]


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class Batches:
    '''A re-iterable list of batches that kills the process at the n-th fetch (counted over all passes).'''

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            fetched[0] += 1
            if KILL == f"fetch:{fetched[0]}":
                die()
            yield b


real_save = torch.save


def save(obj, f, *a, **k):
    saved[0] += 1
    real_save(obj, f, *a, **k)
    if KILL == f"save:{saved[0]}":  # half of the file on disk, then the process dies mid-write
        size = os.path.getsize(f)
        with open(f, "r+b") as fh:
            fh.truncate(size // 2)
        die()


torch.save = save
g = torch.Generator().manual_seed(0)
data = Batches([(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(6)])
torch.manual_seed(0)
model = TinyNet().eval()
r = fxmpq.quantize(model, "w3a3", data, torch.randn(2, 3, 8, 8, generator=g), bits=(2, 3, 4), indicator_epochs=2,
                   finetune_epochs=2, work_dir=sys.argv[1], checkpoint_every=2, progress=False, seed=0)
print("DONE", fetched[0], saved[0])
"""

# (kill point, what it interrupts) -- fetch 1 is the early data check; indicator epochs fetch 2-7 and 8-13,
# fine-tuning epochs 14-19 and 20-25; torch.save calls 1-6 are indicator checkpoints (steps 2, 4, 6=end, 8, 10, 12)
KILLS = [
    ("fetch:5", "mid indicator epoch 1 (after step 3; checkpoint of step 2)"),
    ("fetch:8", "between indicator epochs (after epoch 1's checkpoint, before step 7)"),
    ("fetch:15", "mid first fine-tuning epoch, before its first checkpoint (the joint-training state is needed)"),
    ("fetch:23", "mid the last fine-tuning epoch (checkpoint of step 8)"),
    ("save:4", "while the indicator checkpoint of step 8 is written"),
]


def _run(script: Path, wd: Path, kill: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FXMPQ_TEST_KILL"}
    if kill:
        env["FXMPQ_TEST_KILL"] = kill
    return subprocess.run([sys.executable, str(script), str(wd), str(TESTS)], env=env, capture_output=True,
                          text=True, timeout=600)


def _artefacts(wd: Path) -> dict[str, object]:
    tensors, meta = load_checkpoint(wd / "finetune.pt")
    return {"indicators": (wd / "indicators.json").read_text(), "policy": (wd / "policy.json").read_text(),
            "weights": {k: v for k, v in tensors.items() if k.startswith("model")},
            "position": (meta["epoch"], meta["batch"], meta["step"])}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, object]]:
    d = tmp_path_factory.mktemp("resume")
    script = d / "run.py"
    script.write_text(SCRIPT)
    proc = _run(script, d / "whole", None)
    assert proc.returncode == 0 and "DONE 25 12" in proc.stdout, proc.stderr[-3000:]
    return script, _artefacts(d / "whole")


@pytest.mark.slow
@pytest.mark.parametrize(("kill", "what"), KILLS, ids=[k for k, _ in KILLS])
def test_killed_and_restarted_equals_uninterrupted(kill, what, reference, tmp_path) -> None:
    script, ref = reference
    wd = tmp_path / "wd"
    killed = _run(script, wd, kill)
    assert killed.returncode == -9, f"{what}: not killed ({killed.returncode}): {killed.stderr[-2000:]}"
    if kill.startswith("save:"):
        assert any(p.name.endswith(".tmp") for p in wd.iterdir()), "the kill left no partial temp file"
    again = _run(script, wd, None)
    assert again.returncode == 0, f"{what}: {again.stderr[-3000:]}"
    got = _artefacts(wd)
    assert got["position"] == ref["position"] == (2, 0, 12)
    assert got["indicators"] == ref["indicators"], what
    assert got["policy"] == ref["policy"], what
    assert got["weights"].keys() == ref["weights"].keys()
    for k, v in ref["weights"].items():
        assert torch.equal(got["weights"][k], v), f"{what}: {k}"
    assert not [p.name for p in wd.iterdir() if p.name.endswith(".tmp")], "temp files left behind"
