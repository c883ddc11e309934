"""quantize()'s options as frozen objects, one per concern (the shape of ONNX Runtime's StaticQuantConfig):
what the quantizers offer, how the policy is searched and verified, how the two trainings run. A new knob is a
field here, not a parameter threaded through five signatures."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ArgumentError

__all__ = [
    "CHECKPOINT_EVERY",
    "DEFAULT_COUNT",
    "DEFAULT_SOURCE_WITH_VAL",
    "INDICATOR_SOURCES",
    "JOINT_PASSES",
    "MEASURE_BATCHES",
    "LowerOptions",
    "QuantOptions",
    "SearchOptions",
    "TrainOptions",
    "check_joint_passes",
    "fold_keywords",
]

# A checkpoint every this many optimizer steps (besides the one at each epoch's end) when checkpoint= is given:
# a run killed mid-epoch loses at most this many steps. Measured cost: docs/RESULTS.md (checkpoint cost).
CHECKPOINT_EVERY = 100
DEFAULT_COUNT = 16  # candidates verified by default: 16 validation passes, small next to any fine-tuning
# What the search minimises: the learned step sizes (LIMPQ), the loss increases measured on the jointly trained
# model (fxmpq.measured_indicators), the KL divergence of its outputs measured the same way (metric="kl"), or the
# learned and the measured loss increases, each scaled to its range (fxmpq.blend_indicators)
INDICATOR_SOURCES = ("learned", "measured", "kl", "blend")
# The source quantize() searches when it has validation data (without: "learned"); chosen by the side-by-side
# benchmark (docs/search.md, "Which defaults, and why")
DEFAULT_SOURCE_WITH_VAL = "kl"
MEASURE_BATCHES = 4  # validation batches quantize() measures sensitivities on


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
    """The search: `indicators` is what it minimises ("learned": the joint training's step sizes, the paper's
    indicators; "measured": each layer's loss increase at each bit on the jointly trained model, measured on
    MEASURE_BATCHES batches of validation data; "kl": its outputs' KL divergence, measured the same way; "blend":
    learned and measured, each scaled to its range; all but "learned" need `val_data`; None: "kl" with
    validation data, "learned" without); `alpha` weighs weight indicators against activation ones (None: 2 for
    learned, 1 otherwise); with validation data, `verify`
    candidate policies (0 or False: off; True: DEFAULT_COUNT) are measured on `verify_batches` batches (None: all)
    on the jointly trained model and the best is fine-tuned; `minimize` is the metric an accuracy target minimizes
    (None: the hardware's first).

    `verify=None` (the default) verifies only for an accuracy target, which needs the measurement, and fine-tunes
    the search's optimum under a cost budget: measured on the side-by-side benchmark (docs/RESULTS.md section 6),
    the jointly trained model's top-1 ranks fine-tuned policies worse than the learned objective does (Spearman
    +0.54 against +0.76 over 16 policies) and the verified pick lost about 2 points at both BitOps budgets."""

    alpha: float | None = None
    verify: int | bool | None = None
    verify_batches: int | None = None
    minimize: str | None = None
    indicators: str | None = None

    def __post_init__(self) -> None:
        if self.indicators is not None and self.indicators not in INDICATOR_SOURCES:
            raise ArgumentError(f"SearchOptions: indicators={self.indicators!r}: expected one of "
                                f"{', '.join(INDICATOR_SOURCES)}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float)
                                       or not self.alpha > 0):
            raise ArgumentError(f"SearchOptions: alpha must be None or a number > 0, found {self.alpha!r}")

    def source(self, has_val: bool) -> str:
        """The indicator source searched: `indicators`, or by default DEFAULT_SOURCE_WITH_VAL with validation data
        (its measured half needs held-out batches) and "learned" without."""
        if self.indicators is not None:
            return self.indicators
        return DEFAULT_SOURCE_WITH_VAL if has_val else "learned"

    def alpha_for(self, source: str) -> float:
        """`alpha`, or the source's own: 2 for the learned step sizes (the paper's setting, docs/search.md), 1 for
        measured sensitivities and the blend (their weight and activation terms are already in one unit)."""
        if self.alpha is not None:
            return float(self.alpha)
        return 2.0 if source == "learned" else 1.0


@dataclass(frozen=True)
class TrainOptions:
    """The two trainings, joint indicator training and fine-tuning, as quantize() runs them and as
    train_indicators()/finetune() take them: epochs of each, learning rates (`finetune_lr` None: `lr`; `step_lr`
    for the step sizes, None: the training's lr), weight decay on conv/linear weights, distillation in joint
    training (from its highest bit-width), fine-tuning's half-cosine schedule, a cap on optimizer steps per
    training, the gradient-norm clip, the seed, the device, progress bars, checkpoint frequency, the batch size a
    Dataset is batched at, `indicator_data` (quantize()'s data for joint training; None: the training data), and
    the model's factory spec and kwargs recorded in checkpoints (so `fxmpq lower <work_dir>` can rebuild it).
    `joint_passes`: the uniform passes of each joint step, "all" (every candidate bit-width, the paper's scheme)
    or "sandwich" (the highest, the lowest and one between at random: 4 passes instead of n + 1; docs/RESULTS.md
    3.11 compares the two)."""

    indicator_epochs: int = 1
    finetune_epochs: int = 1
    lr: float = 0.01
    finetune_lr: float | None = None
    step_lr: float | None = None
    weight_decay: float = 1e-4
    distill: bool = True
    cosine: bool = True
    max_steps: int | None = None
    clip_grad_norm: float | None = None
    seed: int = 0
    device: Any = None
    progress: bool = True
    checkpoint_every: int | None = CHECKPOINT_EVERY
    batch_size: int = 32
    indicator_data: Any = None
    model_factory: str | None = None
    model_kwargs: Mapping[str, Any] | None = None
    joint_passes: str = "all"


JOINT_PASSES = ("all", "sandwich")


def check_joint_passes(value: Any, caller: str) -> None:
    """ArgumentError naming `caller` when `value` is not one of JOINT_PASSES."""
    if value not in JOINT_PASSES:
        raise ArgumentError(f"{caller}: joint_passes must be one of {', '.join(map(repr, JOINT_PASSES))}, "
                            f"found {value!r}")


@dataclass(frozen=True)
class LowerOptions:
    """lower()'s parity check and latency audit: `samples` random inputs (when no inputs are given) run `batch` at
    a time; the tolerance (`max_steps` output steps, `min_top1` agreement on decisive inputs, `rtol` for a float
    output); `check` (raise on a miss; False: write and report it), `strict` (today's first rule alone, no
    noise-floor criterion), `seed` of the random inputs; `measure` (time the file in ONNX Runtime, median of
    `repeats` runs on `threads` threads, None: the hardware file's); `storage` of the weights ("int8" or
    "packed")."""

    samples: int = 64
    batch: int = 64
    max_steps: float = 1.0
    min_top1: float = 0.995
    rtol: float = 1e-4
    check: bool = True
    strict: bool = False
    seed: int = 0
    measure: bool = True
    repeats: int = 20
    threads: int | None = None
    storage: Any = "int8"


def fold_keywords(caller: str, groups: Mapping[str, tuple[type, Any]], keywords: Mapping[str, Any],
                  stacklevel: int = 3, aliases: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The option objects of `caller` ({parameter: (class, object or None)}) with its old one-per-field
    `keywords` folded in under one DeprecationWarning; each missing object is its class's default. TypeError for
    a keyword that is no field (as Python says for an unknown keyword), ArgumentError for a wrong object or a
    field given both ways; the caller's own checks judge the values. quantize() and lower() use it; `stacklevel`
    points the warning at the user's call (3: `caller` calls this directly); `aliases` maps an old keyword to
    its field where the names differ (finetune's `epochs` is `finetune_epochs`)."""
    owner = {f.name: g for g, (cls, _) in groups.items() for f in dataclasses.fields(cls)}
    given, mapped, source = list(keywords), {}, {}
    for k, v in keywords.items():
        f = (aliases or {}).get(k, k)
        if f not in owner:
            raise TypeError(f"{caller}() got an unexpected keyword argument {k!r}")
        if f in mapped:
            raise ArgumentError(f"{caller}: {f}= given twice (as {source[f]}= and {k}=); give it once")
        mapped[f], source[f] = v, k
    keywords = mapped
    out = {}
    for g, (cls, obj) in groups.items():
        if obj is not None and not isinstance(obj, cls):
            raise ArgumentError(f"{caller}: {g}= must be a fxmpq.{cls.__name__}, found {type(obj).__name__}")
        fields = {k: v for k, v in keywords.items() if owner[k] == g}
        if obj is not None and fields:
            raise ArgumentError(f"{caller}: {', '.join(f'{k}=' for k in fields)} and {g}= both given; set "
                                f"{'it' if len(fields) == 1 else 'them'} in the {cls.__name__} only")
        out[g] = dataclasses.replace(obj if obj is not None else cls(), **fields)
    if keywords:
        spelled = ", ".join(f"{groups[owner[k]][0].__name__}({k}=...)" for k in keywords)
        warnings.warn(f"{caller}({', '.join(f'{k}=' for k in given)}) is deprecated: pass {spelled} as "
                      f"{'/'.join(f'{g}=' for g in groups)}; the separate keywords go in the next release",
                      DeprecationWarning, stacklevel=stacklevel)
    return out
