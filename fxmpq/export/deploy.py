"""Opening an exported model in ONNX Runtime: packed (4-bit) weights widened in memory so ORT runs integer kernels.

ONNX Runtime's CPU provider runs a DequantizeLinear of INT4 weights followed by Conv as a float convolution; the
same integers in an INT8 initializer fuse into QLinearConv. `ort_session` opens a file shipped with
`lower(..., storage="packed")` after widening those initializers in memory (`fxmpq.quant.storage.widen`): the session is
the one the int8 export would give, bit for bit, from a file about half the size at 4 bits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ArgumentError, brief, first_line
from ..quant.storage import widen
from .measure import session

__all__ = ["deployable", "ort_session"]

_TWO_GB = 2**31 - 1


def deployable(path: str | Path, where: str = "ort_session: path") -> Path | bytes:
    """What ONNX Runtime should open for the model at `path`: the path itself when no 4-bit weight initializer
    feeds a DequantizeLinear, else the model's bytes with those widened to 8 bits. ArgumentError naming `where`
    for a missing or unreadable file, a file that is not an ONNX model, missing external data, or a widened model
    over protobuf's 2 GB limit."""
    import onnx
    from onnx import TensorProto

    if not isinstance(path, str | Path):
        raise ArgumentError(f"{where}: expected a path to an ONNX file, found {brief(path)}")
    p = Path(path)
    if not p.is_file():
        raise ArgumentError(f"{where}: no ONNX file at {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise ArgumentError(f"{where}: {p} is not a readable ONNX model: {first_line(e)}") from None
    if not any(t.data_type in (TensorProto.INT4, TensorProto.UINT4) for t in model.graph.initializer):
        return p
    external = [t.name for t in model.graph.initializer
                if t.data_location == TensorProto.EXTERNAL]
    if external:
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except Exception as e:
            raise ArgumentError(f"{where}: {p} keeps {len(external)} tensor(s) in external data that cannot be "
                                f"read: {first_line(e)}") from None
    if widen(model) == 0:
        return p
    size = model.ByteSize()
    if size > _TWO_GB:
        raise ArgumentError(f"{where}: {p} widened to 8-bit weights is {size / 1e9:.2f} GB, over protobuf's 2 GB "
                            f"limit for a model opened from memory; open it with onnxruntime directly (its "
                            f"4-bit layers then run in float)")
    return model.SerializeToString()


def ort_session(path: str | Path, threads: int = 1, *, optimized_path: str | Path | None = None,
                profile_prefix: str | None = None) -> Any:
    """An ONNX Runtime CPU session (fxmpq.export.measure.session: `threads` intra-op threads, all graph optimizations) of
    the model at `path`, its 4-bit weight initializers widened to 8 bits in memory so that the layers fuse into
    integer kernels (QLinearConv) as in an int8 export; a model without any opens unchanged. ArgumentError naming
    the argument for a bad path or thread count, or a model ONNX Runtime refuses."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ArgumentError(f"ort_session: threads must be a positive integer, found {brief(threads)}")
    model = deployable(path)
    try:
        return session(model, threads, profile_prefix=profile_prefix, optimized_path=optimized_path)
    except Exception as e:
        raise ArgumentError(f"ort_session: path: ONNX Runtime cannot open {path}: {first_line(e)}") from None
