"""``encode_chunk`` / ``decode_chunk`` and sender-side ``ErrorFeedback``.

Theory of operation
-------------------
A tensor is flattened to float32 and cut into chunks of at most ``codec.chunk_elements``
elements (``chunk_ranges``). Each chunk runs through its chain ``[TOPK] VALUE [ZSTD]``
independently, so encoding, sending and reducing pipeline. Both functions are pure and
CPU-bound; ``node/`` runs them in a thread pool (numpy ufuncs and zstd release the GIL).

Error feedback (EF-SGD: Seide et al. 2014 "1-bit SGD"; Stich et al. 2018 "Sparsified SGD
with memory"; Karimireddy et al. 2019 "Error feedback fixes SignSGD"): a sender keeps a
residual ``e`` per element. To send ``x`` it encodes ``v = x + e`` and then sets
``e = v - decode(encode(v))``: whatever top-k dropped or quantization rounded away is
added to the next contribution, so the running sum of what was sent tracks the running sum
of the inputs to within one residual. Non-finite residual entries are reset to 0 (a NaN
must not be remembered forever).

Decoding validates structure before touching the payload: the chain shape, ``kept``,
``block`` and the exact raw size implied by them (which must equal ``raw_bytes`` and stay
under ``MAX_DECOMPRESSED_CHUNK_BYTES``); the zstd frame must declare exactly that content
size, so a bomb fails before any large allocation. Every structural problem is a
``RemoteCodecError``; values (NaN, Inf, odd scales) pass through as values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from protocol.errors import CodecError, ErrorCode, RemoteCodecError, map_exceptions
from protocol.limits import MAX_DECOMPRESSED_CHUNK_BYTES, MAX_TENSOR_CHUNK_BYTES
from protocol.tensor.chunk import TensorChunk
from protocol.tensor.ids import VALUE_CODECS, CodecId, DType
from protocol.tensor.layout import raw_size, sections
from protocol.tensor.registry import TOPK, VALUES, ZSTD
from protocol.tensor.spec import CodecSpec, topk_count
from protocol.tensor.stages import split_sections

Floats = NDArray[np.float32]


class ErrorFeedback:
    """Sender-side residual of a lossy codec for ``numel`` elements (see the module docstring).

    One object per chunk position, or one per tensor with ``slice(offset, count)`` views per
    chunk (views share memory with their parent).
    """

    __slots__ = ("residual",)

    def __init__(self, numel: int, *, _residual: Floats | None = None) -> None:
        if _residual is None:
            if type(numel) is not int or numel < 0:
                raise CodecError(f"ErrorFeedback numel must be a non-negative int, got {numel!r}")
            _residual = np.zeros(numel, np.float32)
        self.residual: Floats = _residual
        """What was dropped so far and not yet sent (float32, ``numel`` long)."""

    @property
    def numel(self) -> int:
        return int(self.residual.size)

    def slice(self, offset: int, count: int) -> ErrorFeedback:
        """A view on ``[offset, offset + count)`` for one chunk of a whole-tensor feedback."""
        if not 0 <= offset <= offset + count <= self.numel:
            raise CodecError(f"feedback slice [{offset}, {offset + count}) outside {self.numel}")
        return ErrorFeedback(count, _residual=self.residual[offset : offset + count])

    def reset(self) -> None:
        """Forget everything (e.g. after the model was re-synchronised)."""
        self.residual[...] = 0.0

    def _sanitize(self) -> None:
        r = self.residual
        if r.size and not np.isfinite(np.sum(r, dtype=np.float64)):
            r[~np.isfinite(r)] = 0.0


def chunk_ranges(numel: int, codec: CodecSpec) -> list[tuple[int, int]]:
    """``(offset, count)`` of each chunk of a flattened tensor of ``numel`` elements."""
    step = codec.chunk_elements
    return [(off, min(step, numel - off)) for off in range(0, numel, step)] or [(0, 0)]


def encode_chunk(
    values: NDArray[Any],
    codec: CodecSpec,
    *,
    feedback: ErrorFeedback | None = None,
    offset: int = 0,
) -> TensorChunk:
    """Encode one chunk (1-D float32, at most ``codec.chunk_elements`` long).

    With ``feedback`` (exactly ``values.size`` long) the residual is added first and
    updated after. ``offset`` is recorded in the chunk. Raises ``CodecError`` on bad input;
    NaN/Inf/huge values are encoded as documented in ``values`` (no floating-point warnings).
    An uncompressed single-section chunk (``none`` without feedback) carries a read-only
    view of ``values`` as its payload, not a copy: keep ``values`` unchanged until it is sent.
    """
    with np.errstate(all="ignore"):
        return _encode(values, codec, feedback, offset)


def _encode(
    values: NDArray[Any], codec: CodecSpec, feedback: ErrorFeedback | None, offset: int
) -> TensorChunk:
    v = _check_input(values, codec)
    n = v.size
    if feedback is not None:
        if feedback.numel != n:
            raise CodecError(f"feedback covers {feedback.numel} elements, chunk has {n}")
        v = v + feedback.residual
    idx = None
    kept_vals = v
    parts: tuple[NDArray[Any], ...] = ()
    if codec.topk_ratio is not None:
        idx = TOPK.select(v, topk_count(n, codec.topk_ratio))
        kept_vals = v[idx]
        parts = (TOPK.encode(idx),)
    block = codec.int8_block if codec.value is CodecId.INT8_ABSMAX else 0
    value_parts = VALUES[codec.value].encode(kept_vals, block=block)
    parts += value_parts
    kept = int(kept_vals.size)
    stages = codec.stages
    raw = raw_size(stages, kept=kept, block=block)
    payload: bytes | memoryview | None = None
    if codec.zstd_level is not None:
        payload = ZSTD.compress(parts, raw, level=codec.zstd_level)
        if len(payload) >= raw:  # incompressible: send the raw sections instead
            payload, stages = None, stages[:-1]
    if payload is None:
        payload = _raw_payload(parts)
    if len(payload) > MAX_TENSOR_CHUNK_BYTES:
        raise CodecError(f"chunk payload {len(payload)} bytes exceeds {MAX_TENSOR_CHUNK_BYTES}")
    if feedback is not None:
        _update_feedback(feedback, v, idx, kept_vals, value_parts, codec.value, block)
    return TensorChunk(
        stages=stages,
        dtype=DType.FLOAT32,
        offset=offset,
        numel=n,
        kept=kept,
        block=block,
        raw_bytes=raw,
        payload=payload,
    )


def _raw_payload(parts: Sequence[NDArray[Any]]) -> bytes | memoryview:
    """The sections back to back: a read-only view of a single contiguous section (``none``
    sends the caller's values without a copy), else one joined ``bytes``."""
    if len(parts) == 1 and parts[0].flags.c_contiguous:
        return memoryview(parts[0].data).toreadonly().cast("B")
    return b"".join([p.data for p in parts])


def _check_input(values: NDArray[Any], codec: CodecSpec) -> Floats:
    if not isinstance(values, np.ndarray) or values.dtype != np.float32 or values.ndim != 1:
        shown = (
            f"{values.dtype}{list(values.shape)}"
            if isinstance(values, np.ndarray)
            else type(values).__name__
        )
        raise CodecError(f"encode_chunk needs a 1-D float32 array, got {shown}")
    if values.size > codec.chunk_elements:
        raise CodecError(
            f"chunk of {values.size} elements exceeds chunk_elements={codec.chunk_elements}"
        )
    return np.ascontiguousarray(values)


def _update_feedback(
    feedback: ErrorFeedback,
    v: Floats,
    idx: NDArray[np.int64] | None,
    kept_vals: Floats,
    value_parts: tuple[NDArray[Any], ...],
    value: CodecId,
    block: int,
) -> None:
    """residual = v - what the receiver will decode."""
    lossy = value is not CodecId.NONE
    sent = VALUES[value].decode(value_parts, block=block) if lossy else kept_vals
    if idx is None:
        if lossy:
            np.subtract(v, sent, out=feedback.residual)
            feedback._sanitize()
        else:
            feedback.residual[...] = 0.0
        return
    np.copyto(feedback.residual, v)
    if lossy:
        feedback.residual[idx] = kept_vals - sent
    else:
        feedback.residual[idx] = 0.0
    feedback._sanitize()


def decode_chunk(chunk: TensorChunk) -> Floats:
    """Decode to a 1-D float32 array of ``chunk.numel`` elements: new and writable, except
    for an uncompressed ``none`` chunk, which gives a read-only view of the payload.

    ``RemoteCodecError`` on any structural problem (chain shape, sizes, zstd frame, indices).
    """
    with np.errstate(all="ignore"):
        return _decode(chunk)


def _decode(chunk: TensorChunk) -> Floats:
    value, topk, zstd = _check_structure(chunk)
    layout = sections(chunk.stages, kept=chunk.kept, block=chunk.block)
    raw: bytes | memoryview
    if zstd:
        raw = ZSTD.decompress(chunk.payload, chunk.raw_bytes)
    else:
        if len(chunk.payload) != chunk.raw_bytes:
            raise RemoteCodecError(
                f"payload is {len(chunk.payload)} bytes, chunk needs {chunk.raw_bytes}"
            )
        raw = chunk.payload
    with map_exceptions(
        {ValueError: RemoteCodecError, TypeError: RemoteCodecError}, code=ErrorCode.CODEC_ERROR
    ):
        parts = split_sections(raw, layout, shuffled=zstd)
        if not topk:
            return VALUES[value].decode(parts, block=chunk.block)
        idx = TOPK.decode(parts[0], chunk.numel)
        out = np.zeros(chunk.numel, np.float32)
        out[idx] = VALUES[value].decode(parts[1:], block=chunk.block)
        return out


def _check_structure(chunk: TensorChunk) -> tuple[CodecId, bool, bool]:
    """(value stage, has TOPK, has ZSTD) of a chunk whose header is self-consistent."""
    stages = list(chunk.stages)
    topk = bool(stages) and stages[0] is CodecId.TOPK
    zstd = bool(stages) and stages[-1] is CodecId.ZSTD
    core = stages[int(topk) : len(stages) - int(zstd)]
    if len(core) != 1 or core[0] not in VALUE_CODECS:
        raise RemoteCodecError(
            f"bad codec chain {[s.name for s in stages]}: need [TOPK] VALUE [ZSTD]"
        )
    value = core[0]
    if chunk.dtype is not DType.FLOAT32:
        raise RemoteCodecError(f"unsupported dtype {chunk.dtype!r}")
    if (chunk.kept > chunk.numel) if topk else (chunk.kept != chunk.numel):
        raise RemoteCodecError(f"kept={chunk.kept} does not fit numel={chunk.numel} for this chain")
    if (chunk.block < 1) if value is CodecId.INT8_ABSMAX else (chunk.block != 0):
        raise RemoteCodecError(f"block={chunk.block} is invalid for value stage {value.name}")
    expected = raw_size(chunk.stages, kept=chunk.kept, block=chunk.block)
    if expected != chunk.raw_bytes or expected > MAX_DECOMPRESSED_CHUNK_BYTES:
        raise RemoteCodecError(
            f"raw_bytes={chunk.raw_bytes} but the header implies {expected} (cap {MAX_DECOMPRESSED_CHUNK_BYTES})"
        )
    return value, topk, zstd
