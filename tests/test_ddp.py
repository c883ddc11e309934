"""Joint indicator training under torchrun with 2 gloo processes on CPU: both ranks end identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _worker(out_dir: str) -> None:
    """One rank: prepare the tiny model, train indicators for a few DDP steps, write what it ended with."""
    import torch.distributed as dist

    sys.path.insert(0, str(HERE))
    from _quant_models import TinyNet

    import fxmpq

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    q = fxmpq.prepare(TinyNet(), torch.randn(2, 3, 8, 8), bits=(2, 4))
    start = {n: p.detach().clone() for n, p in q.named_parameters()}
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 8, 8, generator=g),
                                          torch.randint(0, 10, (16,), generator=g))
    ind = fxmpq.train_indicators(
        q,
        data,
        fxmpq.TrainOptions(batch_size=4, indicator_epochs=1, max_steps=2, progress=False),
        checkpoint=Path(out_dir) / "ddp.ckpt",
    )
    state = {n: p.detach() for n, p in q.named_parameters()}
    moved = sorted(n for n in state if not torch.equal(state[n], start[n]))
    torch.save(state, Path(out_dir) / f"params{rank}.pt")
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"indicators": ind.to_dict(), "moved": moved}))
    dist.destroy_process_group()


def test_two_gloo_ranks_end_identical(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve()), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["indicators"] == r1["indicators"]
    p0 = torch.load(tmp_path / "params0.pt", weights_only=True)
    p1 = torch.load(tmp_path / "params1.pt", weights_only=True)
    assert p0.keys() == p1.keys()
    differ = [n for n in p0 if not torch.equal(p0[n], p1[n])]
    assert differ == []  # BN params of bits used only in no_sync passes were all-reduced too
    steps = [n for n in p0 if n.endswith(".step")]
    assert set(steps) <= set(r0["moved"])  # every step size trained
    assert (tmp_path / "ddp.ckpt").is_file()


if __name__ == "__main__":
    _worker(sys.argv[1])
