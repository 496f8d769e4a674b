"""Byte layout of a chunk's raw payload (the bytes before the optional zstd stage).

The raw payload is a concatenation of *sections*, each an array of one little-endian
element type (PROTOCOL.md §10.3)::

    [TOPK index deltas: kept x uint32]      only with TOPK
    NONE:         kept x float32
    FP16:         kept x float16
    BF16:         kept x uint16 (the high half of the float32)
    INT8_ABSMAX:  ceil(kept / block) x float32 scales, then kept x int8 codes
    SIGMA8:       256 x float32 codebook, then kept x uint8 codes

Sizes follow from ``(stages, kept, block)`` alone, so a receiver knows the exact raw size
before it decompresses anything (the zstd-bomb guard).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from protocol.tensor.ids import CodecId

F32 = np.dtype("<f4")
F16 = np.dtype("<f2")
U16 = np.dtype("<u2")
U32 = np.dtype("<u4")
I8 = np.dtype("i1")
U8 = np.dtype("u1")

#: Entries in a SIGMA8 codebook (one float32 per 8-bit code).
SIGMA8_BINS = 256

Section = tuple[np.dtype, int]
"""(element type, element count) of one section."""


def value_sections(value: CodecId, kept: int, block: int) -> tuple[Section, ...]:
    """Sections the value stage writes for ``kept`` values."""
    if value is CodecId.NONE:
        return ((F32, kept),)
    if value is CodecId.FP16:
        return ((F16, kept),)
    if value is CodecId.BF16:
        return ((U16, kept),)
    if value is CodecId.INT8_ABSMAX:
        return ((F32, -(-kept // block)), (I8, kept))
    if value is CodecId.SIGMA8:
        return ((F32, SIGMA8_BINS), (U8, kept))
    raise ValueError(f"{value!r} is not a value stage")


def sections(stages: Sequence[CodecId], *, kept: int, block: int) -> tuple[Section, ...]:
    """All raw sections of a (structurally valid) chain, in payload order."""
    value = stages[1] if stages[0] is CodecId.TOPK else stages[0]
    head: tuple[Section, ...] = ((U32, kept),) if stages[0] is CodecId.TOPK else ()
    return head + value_sections(value, kept, block)


def raw_size(stages: Sequence[CodecId], *, kept: int, block: int) -> int:
    """Exact size in bytes of the raw payload."""
    return sum(dt.itemsize * n for dt, n in sections(stages, kept=kept, block=block))
