"""Joint indicator training, finetune, checkpoints and resume on tiny models."""

from __future__ import annotations

import pytest
import torch
from _quant_models import TinyNet, random_batches

import fxmpq
from fxmpq.core.checkpoint import load_checkpoint, save_checkpoint
from fxmpq.core.options import TrainOptions
from fxmpq.errors import ArgumentError, CheckpointError, DataError, PolicyError
from fxmpq.policy_search.indicators import Indicators

BITS = (2, 3, 4)


def _prepare(seed: int = 0) -> fxmpq.QuantModel:
    torch.manual_seed(seed)
    return fxmpq.prepare(TinyNet(), torch.randn(2, 3, 8, 8), bits=BITS)


def _steps(q: fxmpq.QuantModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in q.named_parameters()}


def test_joint_training_moves_every_step_size_and_orders_them() -> None:
    q = _prepare()
    q.set_uniform(4)
    q.train()
    q(torch.randn(4, 3, 8, 8))  # initialise activation steps, so "moved" means trained
    q.disable_quant()
    before = {n: p.detach().clone() for n, p in q.named_parameters() if n.endswith("step")}
    ind = fxmpq.train_indicators(
        q, random_batches(3), TrainOptions(indicator_epochs=1, lr=0.01, progress=False)
    )
    after = {n: p.detach() for n, p in q.named_parameters() if n.endswith("step")}
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert moved == list(before)
    assert ind.layers == ("conv2", "conv3") and ind.bits == BITS
    shrinking = [n for n in ind.layers if ind.weight[n][2] > ind.weight[n][3] > ind.weight[n][4]]
    assert len(shrinking) >= len(ind.layers) / 2
    assert q.policy is None  # quantizers left as they were (off)
    assert Indicators.from_json(ind.to_json()) == ind


def test_sandwich_joint_step_runs_highest_one_middle_lowest_then_a_random_policy(monkeypatch) -> None:
    torch.manual_seed(0)
    q = fxmpq.prepare(TinyNet(), torch.randn(2, 3, 8, 8), bits=(2, 3, 4, 5, 8))
    calls: list[object] = []  # the passes in order: a uniform pass's weight bits, "random" for a random policy
    real_uniform, real_policy = type(q).set_uniform, type(q).set_policy
    monkeypatch.setattr(type(q), "set_uniform", lambda self, w, a=None: (calls.append(w), real_uniform(self, w, a)))
    monkeypatch.setattr(type(q), "set_policy", lambda self, p: (calls.append("random"), real_policy(self, p)))
    ind = fxmpq.train_indicators(q, random_batches(12), TrainOptions(joint_passes="sandwich", progress=False))
    steps = [calls[i:i + 4] for i in range(0, 48, 4)]
    assert len(calls) == 48  # 12 steps of 4 passes (the policy before the call was none: nothing restored)
    for s in steps:  # highest, a middle one, lowest, then the random policy
        assert s[0] == 8 and s[1] in (3, 4, 5) and s[2] == 2 and s[3] == "random", s
    assert {s[1] for s in steps} == {3, 4, 5}  # every middle bit-width is drawn over the run
    assert ind.bits == (2, 3, 4, 5, 8)
    with pytest.raises(ArgumentError, match="joint_passes must be one of 'all', 'sandwich', found 'half'"):
        fxmpq.train_indicators(q, random_batches(1), TrainOptions(joint_passes="half", progress=False))


def test_deterministic_for_fixed_seed() -> None:
    a = fxmpq.train_indicators(
        _prepare(), random_batches(2), TrainOptions(indicator_epochs=1, seed=3, progress=False)
    )
    b = fxmpq.train_indicators(
        _prepare(), random_batches(2), TrainOptions(indicator_epochs=1, seed=3, progress=False)
    )
    assert a == b


class _Killed(Exception):
    pass


def _ce_killed_at(call: int):
    """Cross-entropy that raises _Killed on its `call`-th use (one use per step: the highest bit's pass)."""
    count = [0]

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        if count[0] == call:
            raise _Killed
        return torch.nn.functional.cross_entropy(out, target)

    return loss


def test_kill_and_resume_equals_uninterrupted(tmp_path) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(12, 3, 8, 8), torch.randint(0, 10, (12,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    ref_q = _prepare()
    ref = fxmpq.train_indicators(ref_q, loader, TrainOptions(indicator_epochs=2, progress=False))
    ck = tmp_path / "run.ckpt"
    with pytest.raises(_Killed):  # dies at the 2nd step of epoch 2 (3 steps per epoch)
        fxmpq.train_indicators(
            _prepare(),
            loader,
            TrainOptions(indicator_epochs=2, progress=False),
            checkpoint=ck,
            loss_fn=_ce_killed_at(5),
        )
    meta = load_checkpoint(ck)[1]
    assert meta["epoch"] == 1 and meta["kind"] == "indicators" and type(meta["kind"]) is str  # the enum's value
    q = _prepare()
    out = fxmpq.train_indicators(
        q, loader, TrainOptions(indicator_epochs=2, progress=False), checkpoint=ck, resume=True
    )
    assert out == ref
    for (n, p), (_, r) in zip(q.named_parameters(), ref_q.named_parameters()):
        assert torch.equal(p, r), n
    assert load_checkpoint(ck)[1]["epoch"] == 2


def test_wrong_batches_raise_data_error() -> None:
    q = _prepare()
    with pytest.raises(DataError, match=r"inputs must have shape \[N, 3, 8, 8\].*Tensor\(4, 1, 8, 8\)"):
        fxmpq.train_indicators(
            q, [(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))], TrainOptions(progress=False)
        )
    with pytest.raises(DataError, match="expected an \\(inputs, targets\\) pair"):
        fxmpq.train_indicators(q, [torch.randn(4, 3, 8, 8)], TrainOptions(progress=False))
    with pytest.raises(DataError, match="targets have batch size 3"):
        fxmpq.train_indicators(
            q, [(torch.randn(4, 3, 8, 8), torch.zeros(3, dtype=torch.long))], TrainOptions(progress=False)
        )


def test_wrong_arguments_raise_argument_error() -> None:
    for train in (fxmpq.train_indicators, fxmpq.finetune):
        with pytest.raises(ArgumentError, match=r"expected a QuantModel \(from fxmpq.prepare\), found TinyNet"):
            train(TinyNet(), random_batches(1), progress=False)
    with pytest.raises(ArgumentError, match="epochs must be an integer >= 0, found -1"):
        fxmpq.train_indicators(
            _prepare(), random_batches(1), TrainOptions(indicator_epochs=-1, progress=False)
        )


def test_finetune_at_policy_and_checkpoint_metadata(tmp_path) -> None:
    q = _prepare()
    with pytest.raises(PolicyError, match="set_policy"):
        fxmpq.finetune(q, random_batches(1), TrainOptions(progress=False))
    q.set_policy({"conv2": (2, 3), "conv3": (4, 2)})
    q.fix()
    w0 = q.weight_quantizer("conv2").step.detach().clone()
    ck = tmp_path / "ft.ckpt"
    stats = fxmpq.finetune(
        q,
        random_batches(2),
        TrainOptions(finetune_epochs=1, progress=False, model_factory="tests.models:tiny"),
        checkpoint=ck,
        distill_from=TinyNet(),
    )
    assert stats.steps == 2 and stats.epochs == 1 and "loss" in stats.losses
    assert not torch.equal(q.weight_quantizer("conv2").step.detach(), w0)
    tensors, meta = load_checkpoint(ck)
    assert meta["kind"] == "finetune" and meta["bits"] == list(BITS)
    assert meta["policy"]["conv2"] == [2, 3] and meta["policy"]["conv1"] == [8, 8]
    assert meta["hardware"]["name"] == "bitops" and meta["example_shapes"] == [[2, 3, 8, 8]]
    assert meta["model_factory"] == "tests.models:tiny"
    assert meta["quant_state"]["conv3"] == {"w_bits": [4], "a_bits": [2], "w": 4, "a": 2}
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())


def test_finetune_after_set_policy_without_fix() -> None:
    q = _prepare()
    q.set_policy({"conv2": (3, 3), "conv3": (2, 4)})
    stats = fxmpq.finetune(q, random_batches(1), TrainOptions(progress=False))
    assert stats.steps == 1 and q.policy["conv2"] == (3, 3)


def test_checkpoint_errors_name_the_file(tmp_path) -> None:
    bad = tmp_path / "garbage.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage\.ckpt"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.ones(2)}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt: not an fxmpq checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match=r"missing\.ckpt does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    pickled = tmp_path / "pickled.pt"  # a module pickled whole: torch would advise weights_only=False; we never do
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(pickled)
    assert "pickled.pt" in str(exc.value) and "pickled Python object (torch.nn.modules.linear.Linear)" in str(exc.value)
    assert "weights_only" not in str(exc.value) and "safe_globals" not in str(exc.value)
    ok = save_checkpoint(tmp_path / "ok.ckpt", {"a": torch.arange(3)}, {"k": [1, "x"]})
    tensors, meta = load_checkpoint(ok)
    assert torch.equal(tensors["a"], torch.arange(3)) and meta == {"k": [1, "x"]}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_resume_rejects_a_foreign_run(tmp_path) -> None:
    q = _prepare()
    q.set_uniform(2)
    ck = tmp_path / "ft.ckpt"
    fxmpq.finetune(q, random_batches(1), TrainOptions(progress=False), checkpoint=ck)
    with pytest.raises(CheckpointError, match="written by 'finetune' training"):
        fxmpq.train_indicators(
            _prepare(), random_batches(1), TrainOptions(progress=False), checkpoint=ck, resume=True
        )


def test_per_channel_indicators_are_channel_means_and_progress_bar_shows_losses(capsys) -> None:
    torch.manual_seed(0)
    q = fxmpq.prepare(TinyNet(), torch.randn(2, 3, 8, 8), bits=BITS, per_channel=True)
    assert q.weight_quantizer("conv3").step.shape == (3, 16)
    ind = fxmpq.train_indicators(q, random_batches(2), TrainOptions(indicator_epochs=1, progress=True))
    for b in BITS:
        expected = q.weight_quantizer("conv3").step_size(b).detach().mean().item()
        assert ind.weight["conv3"][b] == pytest.approx(expected)
    err = capsys.readouterr().err
    assert "indicators 1/1" in err and "w4=" in err and "rand=" in err


def test_cosine_finetune_decays_lr_and_resumes_exactly(tmp_path) -> None:
    data = random_batches(3)
    seen: list[float] = []

    def sgd(groups):
        opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
        orig = opt.step

        def step(*a, **k):
            seen.append(opt.param_groups[0]["lr"])
            return orig(*a, **k)
        opt.step = step
        return opt

    q = _prepare()
    q.set_uniform(3)
    fxmpq.finetune(
        q, data, TrainOptions(finetune_epochs=2, lr=0.1, cosine=True, progress=False), optimizer=sgd
    )
    assert seen[0] == pytest.approx(0.1) and seen == sorted(seen, reverse=True) and seen[-1] < 0.01
    whole = _steps(q)

    q2 = _prepare()
    q2.set_uniform(3)
    ck = tmp_path / "ft.ckpt"
    with pytest.raises(_Killed):  # dies in epoch 2; the checkpoint holds epoch 1
        fxmpq.finetune(
            q2,
            data,
            TrainOptions(finetune_epochs=2, lr=0.1, cosine=True, progress=False),
            checkpoint=ck,
            loss_fn=_ce_killed_at(5),
        )
    q3 = _prepare()
    q3.set_uniform(3)
    fxmpq.finetune(
        q3,
        data,
        TrainOptions(finetune_epochs=2, lr=0.1, cosine=True, progress=False),
        checkpoint=ck,
        resume=True,
    )
    resumed = _steps(q3)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_non_finite_gradients_stop_before_the_step_and_clipping_bounds_the_norm() -> None:
    q = _prepare()
    q.set_uniform(3)
    q(random_batches(1)[0][0])  # initialise the activation step sizes, so that "untouched" means untrained
    before = _steps(q)

    def inf_loss(out, target):  # a finite loss (0) whose gradient is not: d sqrt(u)/du at u = 0
        return torch.sqrt(((out - out.detach()) ** 2).sum())

    with pytest.raises(DataError, match=r"gradients became non-finite at step 0 in \d+ parameter\(s\) \(graph_module"):
        fxmpq.finetune(q, random_batches(1), TrainOptions(progress=False), loss_fn=inf_loss)
    after = _steps(q)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model was not touched

    seen: list[float] = []
    sgd = _norm_recording_sgd(seen)

    big = lambda out, target: 1e6 * torch.nn.functional.cross_entropy(out, target)  # noqa: E731
    fxmpq.finetune(
        _prepare_uniform(),
        random_batches(2),
        TrainOptions(clip_grad_norm=0.5, progress=False),
        loss_fn=big,
        optimizer=sgd,
    )
    assert seen and all(n == pytest.approx(0.5, rel=1e-4) for n in seen)


def test_huge_finite_gradients_are_clipped_not_reported() -> None:
    """Gradients near 1e20 are finite in float32 while their squared norm is not: clipped, no DataError."""
    seen: list[float] = []
    sgd = _norm_recording_sgd(seen)

    huge = lambda out, target: 1e20 * torch.nn.functional.cross_entropy(out, target)  # noqa: E731
    fxmpq.finetune(
        _prepare_uniform(),
        random_batches(2),
        TrainOptions(clip_grad_norm=1.0, progress=False),
        loss_fn=huge,
        optimizer=sgd,
    )
    assert seen and all(n == pytest.approx(1.0, rel=1e-4) for n in seen)


def _norm_recording_sgd(seen: list[float]):
    """An optimizer factory: SGD at lr 0 that appends the gradients' total norm (float64) to `seen` at each step."""
    def sgd(groups):
        opt = torch.optim.SGD(groups, lr=0.0)
        orig = opt.step

        def step(*a, **k):
            seen.append(float(torch.linalg.vector_norm(torch.stack(
                [p.grad.double().norm() for g in opt.param_groups for p in g["params"] if p.grad is not None]))))
            return orig(*a, **k)
        opt.step = step
        return opt
    return sgd


def _prepare_uniform() -> fxmpq.QuantModel:
    q = _prepare()
    q.set_uniform(3)
    return q


def test_mid_epoch_checkpoint_resumes_bit_identically(tmp_path) -> None:
    """Killed after step 5 of an 8-batch epoch with a checkpoint every 2 steps: the resumed run skips the 4 batches
    already seen (a shuffling DataLoader with its own generator, so the order must come from the checkpoint) and
    ends with the uninterrupted run's weights, BatchNorm statistics, step sizes and indicators."""
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,)))

    def loader():
        return torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))

    ref_q = _prepare()
    ref = fxmpq.train_indicators(ref_q, loader(), TrainOptions(indicator_epochs=2, progress=False))
    ck = tmp_path / "run.ckpt"
    with pytest.raises(_Killed):  # the 14th step: epoch 2, batch 6; the last checkpoint is after step 12
        fxmpq.train_indicators(
            _prepare(),
            loader(),
            TrainOptions(indicator_epochs=2, checkpoint_every=4, progress=False),
            checkpoint=ck,
            loss_fn=_ce_killed_at(14),
        )
    meta = load_checkpoint(ck)[1]
    assert (meta["epoch"], meta["batch"], meta["step"]) == (1, 4, 12)
    q = _prepare()
    out = fxmpq.train_indicators(
        q,
        loader(),
        TrainOptions(indicator_epochs=2, checkpoint_every=4, progress=False),
        checkpoint=ck,
        resume=True,
    )
    assert out == ref
    ref_state, state = ref_q.state_dict(), q.state_dict()
    assert ref_state.keys() == state.keys()
    for k in ref_state:
        a, b = ref_state[k], state[k]
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, k
    meta = load_checkpoint(ck)[1]
    assert (meta["epoch"], meta["batch"], meta["step"]) == (2, 0, 16)
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]
