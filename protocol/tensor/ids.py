"""Wire enums of the tensor layer: codec stage ids and element types (PROTOCOL.md §10.1)."""

from __future__ import annotations

import enum


class CodecId(enum.IntEnum):
    """One stage of a codec chain, as carried on the wire. APPEND ONLY."""

    NONE = 0
    FP16 = 1
    BF16 = 2
    INT8_ABSMAX = 3
    SIGMA8 = 4
    TOPK = 5
    ZSTD = 6


class DType(enum.IntEnum):
    """Element type of a chunk's decoded values. Version 1 defines only FLOAT32. APPEND ONLY."""

    FLOAT32 = 0


#: Value stages: exactly one per chain.
VALUE_CODECS = frozenset(
    {CodecId.NONE, CodecId.FP16, CodecId.BF16, CodecId.INT8_ABSMAX, CodecId.SIGMA8}
)
