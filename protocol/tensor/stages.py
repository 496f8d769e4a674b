"""The non-value stages: TOPK (sparsify) and ZSTD (byte-plane shuffle + zstd frame).

PROTOCOL.md §10.5 (top-k index encoding) and §10.6 (shuffle and zstd frame).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import zstandard
from numpy.typing import NDArray

from protocol.errors import RemoteCodecError
from protocol.tensor.ids import CodecId
from protocol.tensor.layout import U8, U32, Section
from protocol.tensor.spec import MAX_ZSTD_LEVEL

Indices = NDArray[np.int64]

#: Largest zstd window a received frame may ask for (the decompressed-size cap rounded up).
MAX_ZSTD_WINDOW = 1 << 26


#: Keys sampled to estimate the top-k threshold.
_SAMPLE = 16384


def _top_unique(key: NDArray[np.uint32], k: int) -> Indices:
    """Ascending positions of the ``k`` largest keys, ties to the lower position."""
    n = key.size
    wide = key.astype(np.uint64)
    wide <<= np.uint64(32)
    wide |= np.arange(n, 0, -1, dtype=np.uint64)  # unique: no duplicate keys for introselect
    idx = np.argpartition(wide, n - k)[n - k :]
    idx.sort()
    return idx.astype(np.int64, copy=False)


class TopKStage:
    """Keep the ``k`` largest magnitudes; indices go on the wire as ascending uint32 deltas."""

    codec_id: ClassVar[CodecId] = CodecId.TOPK

    def select(self, values: NDArray[np.float32], k: int) -> Indices:
        """Ascending indices of the ``k`` largest ``|values|``; NaN counts as largest and ties
        go to the lower index.

        Works on ``|v|``'s float bits as uint32 keys (monotonic for non-negative floats, NaN
        above Inf). A strided sample estimates a threshold that about ``2k`` keys pass; the
        exact top-k is then taken among those candidates. numpy's introselect degrades
        ~50x on inputs with many equal values (e.g. the zero rows of an embedding gradient),
        so the exact step uses keys made unique by the index (``_top_unique``).
        """
        n = values.size
        if k >= n:
            return np.arange(n, dtype=np.int64)
        if k <= 0:
            return np.zeros(0, np.int64)
        key = values.view(np.uint32) & np.uint32(0x7FFFFFFF)
        if 4 * k <= n:
            sample = key[:: max(1, n // _SAMPLE)]
            m = sample.size
            rank = m - min(m, 2 * k * m // n + 8)
            if rank > 0:
                threshold = np.partition(sample, rank)[rank]
                cand = np.flatnonzero(key >= threshold)
                if k <= cand.size <= 4 * k + 1024:
                    return cand[_top_unique(key[cand], k)]
        return _top_unique(key, k)

    def encode(self, idx: Indices) -> NDArray[np.uint32]:
        """Delta-encode ascending indices: ``d[0] = i[0]``, ``d[j] = i[j] - i[j-1]``."""
        deltas = np.empty(idx.size, U32)
        if idx.size:
            deltas[0] = idx[0]
            np.subtract(idx[1:], idx[:-1], out=deltas[1:], casting="unsafe")
        return deltas

    def decode(self, deltas: NDArray[Any], numel: int) -> Indices:
        """Indices from deltas; ``RemoteCodecError`` unless strictly ascending and < numel."""
        if deltas.size == 0:
            return np.zeros(0, np.int64)
        if deltas.size > 1 and int(deltas[1:].min()) == 0:
            raise RemoteCodecError("top-k indices repeat (a delta after the first is 0)")
        idx = np.cumsum(deltas, dtype=np.int64)
        if int(idx[-1]) >= numel:
            raise RemoteCodecError(
                f"top-k index {int(idx[-1])} is out of range for {numel} elements"
            )
        return idx


class ZstdStage:
    """Byte-plane shuffle each multi-byte section, then one zstd frame with its content size."""

    codec_id: ClassVar[CodecId] = CodecId.ZSTD

    def compress(self, parts: Sequence[NDArray[Any]], raw_size: int, *, level: int) -> bytes:
        """One zstd frame of the shuffled raw payload."""
        level = max(-7, min(MAX_ZSTD_LEVEL, level))
        buf = np.empty(raw_size, U8)
        pos = 0
        for part in parts:
            width, count = part.dtype.itemsize, part.size
            end = pos + width * count
            if width == 1 or count == 0:
                buf[pos:end] = part.view(U8)
            else:  # plane p holds byte p of every element
                buf[pos:end].reshape(width, count)[...] = part.view(U8).reshape(count, width).T
            pos = end
        cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
        return cctx.compress(buf.data)

    def decompress(self, payload: bytes | memoryview, raw_size: int) -> bytes:
        """The raw (still shuffled) bytes; exactly ``raw_size`` of them or ``RemoteCodecError``.

        The frame must declare its content size, and it must equal ``raw_size`` (which the
        caller has already checked against the caps) before anything is allocated.
        """
        try:
            declared = zstandard.get_frame_parameters(payload).content_size
        except zstandard.ZstdError as exc:
            raise RemoteCodecError(f"bad zstd frame header: {exc}"[:200]) from None
        if declared != raw_size:
            shown = "unknown" if declared == zstandard.CONTENTSIZE_UNKNOWN else declared
            raise RemoteCodecError(f"zstd frame declares {shown} bytes, chunk needs {raw_size}")
        dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
        try:
            out = dctx.decompress(payload, max_output_size=raw_size, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise RemoteCodecError(f"zstd decompression failed: {exc}"[:200]) from None
        if len(out) != raw_size:
            raise RemoteCodecError(
                f"zstd frame decompressed to {len(out)} bytes, expected {raw_size}"
            )
        return out


def split_sections(raw: bytes | memoryview, layout: Sequence[Section], *, shuffled: bool) -> list[NDArray[Any]]:
    """Cut a raw payload (already size-checked) into typed arrays; unshuffle if needed.

    Unshuffled sections are read-only views of ``raw``; shuffled ones are unshuffled into fresh arrays.
    """
    out: list[NDArray[Any]] = []
    pos = 0
    for dtype, count in layout:
        width = dtype.itemsize
        if not shuffled or width == 1 or count == 0:
            out.append(np.frombuffer(raw, dtype, count=count, offset=pos))
        else:
            planes = np.frombuffer(raw, U8, count=width * count, offset=pos).reshape(width, count)
            dense = np.empty((count, width), U8)
            for p in range(width):  # one strided copy per plane: ~10x faster than planes.T
                dense[:, p] = planes[p]
            out.append(dense.view(dtype).reshape(count))
        pos += width * count
    return out
