"""quantize()'s options as frozen objects, one per concern (the shape of ONNX Runtime's StaticQuantConfig):
what the quantizers offer, how the policy is searched and verified, how the two trainings run. A new knob is a
field here, not a parameter threaded through five signatures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["CHECKPOINT_EVERY", "DEFAULT_COUNT", "QuantOptions", "SearchOptions", "TrainOptions"]

# A checkpoint every this many optimizer steps (besides the one at each epoch's end) when checkpoint= is given:
# a run killed mid-epoch loses at most this many steps. Measured cost: docs/RESULTS.md (checkpoint cost).
CHECKPOINT_EVERY = 100
DEFAULT_COUNT = 16  # candidates verified by default: 16 validation passes, small next to any fine-tuning


@dataclass(frozen=True)
class QuantOptions:
    """The quantizers: candidate bit-widths of weights (`bits`; None: the paper's 2..6 that the hardware runs,
    else the hardware's own) and of activations (`act_bits`; None: the same, or the hardware's own activation
    widths where they differ), per-channel weight steps."""

    bits: Sequence[int] | None = None
    act_bits: Sequence[int] | None = None
    per_channel: bool = False


@dataclass(frozen=True)
class SearchOptions:
    """The search: `alpha` weighs weight indicators against activation ones; with validation data, `verify`
    candidate policies (0 or False: off; True: DEFAULT_COUNT) are measured on `verify_batches` batches (None: all)
    on the jointly trained model and the best is fine-tuned; `minimize` is the metric an accuracy target minimizes
    (None: the hardware's first).

    `verify=None` (the default) verifies only for an accuracy target, which needs the measurement, and fine-tunes
    the search's optimum under a cost budget: measured on the side-by-side benchmark (docs/RESULTS.md section 6),
    the jointly trained model's top-1 ranks fine-tuned policies worse than the learned objective does (Spearman
    +0.54 against +0.76 over 16 policies) and the verified pick lost about 2 points at both BitOps budgets."""

    alpha: float = 2.0
    verify: int | bool | None = None
    verify_batches: int | None = None
    minimize: str | None = None


@dataclass(frozen=True)
class TrainOptions:
    """Joint indicator training and fine-tuning: epochs of each, learning rates (`finetune_lr` None: `lr`),
    distillation from the FP32 model, a cap on optimizer steps per training, the seed, the device, progress bars,
    checkpoint frequency, `indicator_data` (joint training's own data; None: the training data), and the model's
    factory spec and kwargs recorded in checkpoints (so `fxmpq lower <work_dir>` can rebuild the model)."""

    indicator_epochs: int = 1
    finetune_epochs: int = 1
    lr: float = 0.01
    finetune_lr: float | None = None
    distill: bool = True
    max_steps: int | None = None
    seed: int = 0
    device: Any = None
    progress: bool = True
    checkpoint_every: int | None = CHECKPOINT_EVERY
    indicator_data: Any = None
    model_factory: str | None = None
    model_kwargs: Mapping[str, Any] | None = None
