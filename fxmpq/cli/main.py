"""The `fxmpq` command: one subcommand per stage of the method and one for all of it (`fxmpq quantize`).

A subcommand's module is imported only when it runs, so `fxmpq --help` and a mistyped command answer at once.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "main"]

# name -> (module in fxmpq.cli, one line for `fxmpq --help`), in the order of the method
COMMANDS: dict[str, tuple[str, str]] = {
    "quantize": ("quantize", "the whole method: indicators, search, fine-tuning, export (resumable work dir)"),
    "analyze": ("analyze", "per-layer MACs, parameters and cost of a model on a hardware description"),
    "profile": ("profile", "measure a model's layers in ONNX Runtime and write a hardware file"),
    "train-indicators": ("train_indicators", "joint indicator training (one process or torchrun)"),
    "search": ("search", "the optimal bit-width policy under a budget (ILP)"),
    "finetune": ("finetune", "apply a policy from `fxmpq search` and fine-tune with LSQ"),
    "lower": ("lower", "export a fine-tuned checkpoint to QDQ ONNX and check it in ONNX Runtime"),
    "report": ("report", "what a work directory holds: policy, indicators, costs, accuracy, audit"),
}

CHAIN = """the method stage by stage (each writes a file the next reads):
  fxmpq train-indicators small_resnet --dataset digits --out runs/x
  fxmpq search --indicators runs/x/indicators.json --model small_resnet --input 1x16x16 --budget w3a4 --out runs/x/policy.json
  fxmpq finetune small_resnet --policy runs/x/policy.json --dataset digits --joint runs/x --out runs/x
  fxmpq lower runs/x --out runs/x/model.onnx
or all of it:  fxmpq quantize small_resnet --dataset digits --budget w3a4 --work-dir runs/q --fp32-epochs 3"""


def _help() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items())
    return (f"usage: fxmpq COMMAND [options]   (fxmpq COMMAND --help for its options)\n\n"
            f"Mixed-precision quantization of PyTorch models (LIMPQ on torch.fx, ILP search, QDQ ONNX export).\n\n"
            f"commands:\n{rows}\n\n{CHAIN}\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"fxmpq {version('fxmpq')}"
    except PackageNotFoundError:
        return "fxmpq (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch `fxmpq COMMAND ...` to the subcommand's module; its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help(), end="")
        return 0 if argv else 2
    if argv[0] == "--version":
        print(_version())
        return 0
    name = argv[0]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        print(f"fxmpq: error: unknown command {name[:60]!r}: {hint}expected one of {', '.join(COMMANDS)} "
              f"(see fxmpq --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(f"fxmpq.cli.{COMMANDS[name][0]}")
    try:
        return module.main(argv[1:], prog=f"fxmpq {name}", label=f"fxmpq {name}")
    except BrokenPipeError:  # `fxmpq report W | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
