"""The exception hierarchy: every error fxmpq raises derives from FxmpqError."""

from __future__ import annotations


class FxmpqError(Exception):
    """Base class of every error raised by fxmpq."""


class TraceError(FxmpqError):
    """torch.fx could not capture the model (data-dependent control flow, unsupported calls, ...)."""


class HardwareSpecError(FxmpqError):
    """A hardware description file is malformed; the message names the file and the key path."""


class PolicyError(FxmpqError):
    """A bit-width policy does not fit the model or the hardware (unknown layers, unsupported bits)."""


class IndicatorError(FxmpqError):
    """Importance indicators do not match the analysis (missing layers, missing bit-widths) or are malformed."""


class BudgetError(FxmpqError, ValueError):
    """A budget string, dict or object is malformed or names an unknown metric."""


class InfeasibleBudget(BudgetError):
    """No policy meets the budget; the message states the smallest achievable value of each metric."""


class ArgumentError(FxmpqError, ValueError):
    """An API argument has the wrong type or value."""


class PassError(FxmpqError):
    """A graph pass failed; the message names the pass and the passes that ran before it."""


class DataError(FxmpqError):
    """A dataset or batch does not fit the model (wrong shapes, wrong types)."""


class ExportError(FxmpqError):
    """Lowering to ONNX failed or the exported model does not match the PyTorch model."""


class CheckpointError(FxmpqError):
    """A checkpoint or work-directory file is missing, corrupt or was not written by fxmpq."""


class ModelSpecError(FxmpqError):
    """A model named on the command line or in a checkpoint cannot be built (unknown name, bad factory)."""


class SolverError(FxmpqError):
    """The exact search could not finish: its time limit ran out, the solver failed, or an instance has too many
    combinations to enumerate. Bad input (a budget, indicators) has its own class; this is the search's limit."""



# ------------------------------------------------------------------------ message helpers (shared by every module)
def brief(value: object, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters for an error message; an integer too long to print is described."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (a library's multi-line advice is left out)."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return ""
