"""Tensor chunks and codecs (PROTOCOL.md §10). numpy only: gossip never imports torch.

Callers convert torch tensors with ``.detach().float().cpu().numpy().ravel()`` and split
them with ``chunk_ranges``::

    codec = CodecSpec.parse("int8+zstd")
    chunks = [encode_chunk(flat[o:o + n], codec, offset=o) for o, n in chunk_ranges(flat.size, codec)]
    values = decode_chunk(chunk)          # RemoteCodecError on a hostile chunk
"""

from __future__ import annotations

from protocol.tensor.chunk import TensorChunk
from protocol.tensor.ids import CodecId, DType
from protocol.tensor.pipeline import ErrorFeedback, chunk_ranges, decode_chunk, encode_chunk
from protocol.tensor.registry import STAGES
from protocol.tensor.spec import DEFAULT_CHUNK_ELEMENTS, MAX_CHUNK_ELEMENTS, CodecSpec

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "MAX_CHUNK_ELEMENTS",
    "STAGES",
    "CodecId",
    "CodecSpec",
    "DType",
    "ErrorFeedback",
    "TensorChunk",
    "chunk_ranges",
    "decode_chunk",
    "encode_chunk",
]
