"""``TensorChunk``: one encoded piece of a flattened float32 tensor (PROTOCOL.md §10.2).

A Struct (no type tag): the all-reduce messages embed it with ``StructOf(TensorChunk)``.
Every field is bounded by its spec; cross-field consistency (chain shape, sizes) is
checked by ``decode_chunk``, which raises ``RemoteCodecError``.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.limits import MAX_DECOMPRESSED_CHUNK_BYTES, MAX_TENSOR_CHUNK_BYTES
from protocol.schema import Bytes, EnumOf, IntRange, ListOf, Struct, UInt, spec
from protocol.tensor.ids import CodecId, DType
from protocol.tensor.spec import MAX_CHUNK_ELEMENTS, MAX_INT8_BLOCK, MAX_STAGES


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorChunk(Struct):
    """An encoded chunk. ``decode_chunk(chunk)`` gives back ``numel`` float32 values."""

    stages: tuple[CodecId, ...] = spec(ListOf(EnumOf(CodecId), max_len=MAX_STAGES))
    """The codec chain actually applied: ``[TOPK] VALUE [ZSTD]``."""
    dtype: DType = spec(EnumOf(DType), default=DType.FLOAT32)
    """Element type of the decoded values (version 1: FLOAT32 only)."""
    offset: int = spec(UInt(64), default=0)
    """Index of this chunk's first element in the flattened tensor (informational here)."""
    numel: int = spec(IntRange(0, MAX_CHUNK_ELEMENTS))
    """Elements this chunk decodes to."""
    kept: int = spec(IntRange(0, MAX_CHUNK_ELEMENTS))
    """Values carried: ``numel`` without TOPK, else how many top-k kept (<= numel)."""
    block: int = spec(IntRange(0, MAX_INT8_BLOCK), default=0)
    """INT8_ABSMAX block size; 0 for every other value stage."""
    raw_bytes: int = spec(IntRange(0, MAX_DECOMPRESSED_CHUNK_BYTES))
    """Size of the payload before ZSTD (== len(payload) without ZSTD)."""
    payload: bytes | memoryview = spec(Bytes(MAX_TENSOR_CHUNK_BYTES, views=True))
    """The encoded bytes (PROTOCOL.md §10.3-§10.6); on the sending side possibly a read-only
    view of the values (``none``: no copy before the wire)."""

    @property
    def wire_bytes(self) -> int:
        """Payload bytes (what the bytes-vs-fp32 ratios count; the header adds ~40)."""
        return len(self.payload)
