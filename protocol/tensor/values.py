"""Value stages: float32 values <-> typed sections (PROTOCOL.md §10.4).

Each strategy is stateless. ``encode`` returns arrays exactly matching
``layout.value_sections``; ``decode`` gets those arrays back (possibly read-only views of
the payload) and returns a new writable float32 array. Decoding never fails on values:
NaN, Inf or odd scales from a peer become NaN/Inf outputs (the all-reduce decides what to
do with a NaN peer); structural checks happen before, in ``pipeline``.

Non-finite *inputs* never crash an encoder and have a defined meaning:

* NONE / FP16 / BF16: NaN stays NaN, +-Inf stays +-Inf. Finite values too large for fp16
  (> 65504) or bf16 saturate to the largest finite value of that type (hivemind clamps too).
* INT8_ABSMAX: a block's scale is the absmax of its *finite* values; non-finite values get
  the reserved code -128, which decodes to NaN.
* SIGMA8: mean and std are taken over finite values; NaN and +Inf take code 255, -Inf code
  0, so those buckets' codebook entries (bucket means) become non-finite.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from protocol.tensor import fastcast
from protocol.tensor.ids import CodecId
from protocol.tensor.layout import F16, F32, I8, SIGMA8_BINS, U8, U16

Floats = NDArray[np.float32]
Parts = tuple[NDArray[Any], ...]

#: Elements per slice in ``map_slices`` (256 KiB of float32).
SLICE = 1 << 16
FP16_MAX = 65504.0
#: INT8_ABSMAX code for a non-finite input.
INT8_NAN_CODE = -128
#: Blocks whose finite absmax is below this are sent as zeros (scale 0): keeps 127/absmax finite.
INT8_TINY = 2.0**-100
#: Largest INT8_ABSMAX scale whose 127 multiple is still a finite float32.
INT8_MAX_SCALE = np.nextafter(np.float32(np.finfo(np.float32).max / 127), np.float32(0))
#: SIGMA8 range: codes cover mean +- SIGMA8_RANGE/2 standard deviations in 256 buckets.
SIGMA8_RANGE = 6.0


class ValueCodec(ABC):
    """Strategy for one value stage."""

    codec_id: ClassVar[CodecId]

    @abstractmethod
    def encode(self, values: Floats, *, block: int) -> Parts:
        """Sections for ``values`` (1-D float32). Never raises on NaN/Inf."""

    @abstractmethod
    def decode(self, parts: Sequence[NDArray[Any]], *, block: int) -> Floats:
        """A float32 array from sections of the right types and sizes: new, or (``none``) a
        read-only view of the payload."""


class NoneCodec(ValueCodec):
    """fp32 as is."""

    codec_id = CodecId.NONE

    def encode(self, values: Floats, *, block: int) -> Parts:
        return (values,)

    def decode(self, parts: Sequence[NDArray[Any]], *, block: int) -> Floats:
        values: Floats = parts[0]  # the read-only view of the payload: no copy
        return values


class Fp16Codec(ValueCodec):
    """IEEE binary16, round to nearest even; finite overflow saturates to +-65504."""

    codec_id = CodecId.FP16

    def encode(self, values: Floats, *, block: int) -> Parts:
        fast = fastcast.to_half(values)
        return (fast if fast is not None else map_slices(float_to_half, values, F16),)

    def decode(self, parts: Sequence[NDArray[Any]], *, block: int) -> Floats:
        fast = fastcast.from_half(parts[0])
        if fast is not None:
            return fast
        return np.take(_HALF_TO_FLOAT, parts[0].view(np.uint16))  # 4x faster than astype


#: float32 value of every fp16 bit pattern (256 KiB, built once).
_HALF_TO_FLOAT = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(F16).astype(np.float32)


#: Bit patterns used by ``float_to_half`` (F. Giesen, "float_to_half_fast3_rtne").
_F32_ABS = np.uint32(0x7FFFFFFF)
_F32_INF = np.uint32(0x7F800000)
_HALF_OVERFLOW = np.uint32(0x477FF000)  # 65520.0: the smallest float32 rounding to fp16 Inf
_HALF_MIN_NORMAL = np.uint32(113 << 23)  # 2**-14 as float32 bits
_REBIAS = np.uint32((((15 - 127) << 23) + 0xFFF) & 0xFFFFFFFF)  # exponent rebias + rounding
_DENORM_MAGIC_BITS = np.uint32(((127 - 15) + (23 - 10) + 1) << 23)
_DENORM_MAGIC = _DENORM_MAGIC_BITS.reshape(1).view(np.float32)[0]


def float_to_half(values: Floats) -> NDArray[np.uint16]:
    """float32 -> fp16 bits, round to nearest even, bit-exact with IEEE conversion except that
    finite values beyond +-65504 saturate. The reference for ``fastcast.to_half`` (used
    instead when torch is installed), and the fallback. Branch-free numpy integer ops: numpy's own cast
    runs in software and is ~20x slower on outputs that are fp16 subnormals (small gradients)."""
    bits = values.view(np.uint32)
    mag = bits & _F32_ABS
    out = (mag >> np.uint32(13)) & np.uint32(1)  # normal results: round to nearest even
    out += mag
    out += _REBIAS
    out >>= np.uint32(13)
    sub = mag.view(np.float32) + _DENORM_MAGIC  # subnormal results: let the FPU round
    sub_bits = sub.view(np.uint32)
    sub_bits -= _DENORM_MAGIC_BITS
    np.copyto(out, sub_bits, where=mag < _HALF_MIN_NORMAL)
    half = out.astype(np.uint16)
    if mag.size and int(mag.max()) >= _HALF_OVERFLOW:  # Inf, NaN or finite overflow: rare
        big = mag >= _HALF_OVERFLOW
        half[big] = np.where(
            mag[big] > _F32_INF, 0x7E00, np.where(mag[big] == _F32_INF, 0x7C00, 0x7BFF)
        )
    half |= (bits >> np.uint32(16)).astype(np.uint16) & np.uint16(0x8000)
    return half.view(F16)


class Bf16Codec(ValueCodec):
    """bfloat16: the high 16 bits of the float32, round to nearest even; NaN kept quiet."""

    codec_id = CodecId.BF16

    def encode(self, values: Floats, *, block: int) -> Parts:
        fast = fastcast.to_bfloat16(values)
        return (fast if fast is not None else map_slices(float_to_bfloat16, values, U16),)

    def decode(self, parts: Sequence[NDArray[Any]], *, block: int) -> Floats:
        wide = parts[0].astype(np.uint32)
        wide <<= np.uint32(16)
        return wide.view(np.float32)


def float_to_bfloat16(values: Floats) -> NDArray[np.uint16]:
    """float32 -> bfloat16 bits, round to nearest even; NaN quiet, finite overflow saturates."""
    bits = values.view(np.uint32)
    mag = bits & np.uint32(0x7FFFFFFF)
    lsb = (mag >> np.uint32(16)) & np.uint32(1)
    mag += np.uint32(0x7FFF)
    mag += lsb
    mag >>= np.uint32(16)
    if mag.size and int(mag.max()) >= 0x7F80:  # Inf, NaN or a finite value rounded up to Inf
        mag[(mag >= 0x7F80) & np.isfinite(values)] = 0x7F7F
        mag[np.isnan(values)] = 0x7FC0
        mag[np.isinf(values)] = 0x7F80
    sign = bits >> np.uint32(16)
    sign &= np.uint32(0x8000)
    mag |= sign
    return mag.astype(U16)


def map_slices(
    fn: Callable[[Floats], NDArray[Any]], values: Floats, dtype: np.dtype
) -> NDArray[Any]:
    """``fn`` applied to cache-sized slices: multi-pass elementwise numpy code runs ~3x faster
    when its temporaries stay in L2 than when each pass streams the whole chunk from RAM."""
    n = values.size
    if n <= SLICE:
        return fn(values)
    out = np.empty(n, dtype)
    for i in range(0, n, SLICE):
        out[i : i + SLICE] = fn(values[i : i + SLICE])
    return out


class Int8AbsmaxCodec(ValueCodec):
    """Blockwise absmax int8: per block ``scale = absmax / 127``, ``code = rint(x / scale)``."""

    codec_id = CodecId.INT8_ABSMAX

    def encode(self, values: Floats, *, block: int) -> Parts:
        n = values.size
        step = block * max(1, SLICE // block)
        if n <= step:
            return _int8_encode(values, block)
        scales = np.empty(-(-n // block), F32)
        codes = np.empty(n, I8)
        for i in range(0, n, step):
            part_scales, part_codes = _int8_encode(values[i : i + step], block)
            scales[i // block : i // block + part_scales.size] = part_scales
            codes[i : i + part_codes.size] = part_codes
        return (scales, codes)

    def decode(self, parts: Sequence[NDArray[Any]], *, block: int) -> Floats:
        scales, codes = parts
        n = codes.size
        full = n // block
        out = np.empty(n, np.float32)
        if full:
            np.multiply(
                codes[: full * block].reshape(full, block),
                scales[:full, None],
                out=out[: full * block].reshape(full, block),
            )
        if n > full * block:
            np.multiply(codes[full * block :], scales[full], out=out[full * block :])
        if n and int(codes.min()) == INT8_NAN_CODE:
            out[codes == INT8_NAN_CODE] = np.nan
        return out


def _int8_encode(values: Floats, block: int) -> tuple[Floats, NDArray[np.int8]]:
    """(scales, codes) of one slice holding whole blocks (the last may be partial)."""
    n = values.size
    nblocks = -(-n // block)
    padded = _padded_blocks(values, block, nblocks)
    absmax = np.maximum(padded.max(axis=1), -padded.min(axis=1)) if n else np.zeros(0, F32)
    bad: NDArray[np.bool_] | None = None
    if not np.isfinite(absmax).all():
        bad = ~np.isfinite(padded)
        padded = np.where(bad, np.float32(0), padded)
        absmax = np.maximum(padded.max(axis=1), -padded.min(axis=1))
    inv = np.zeros(nblocks, F32)
    np.divide(np.float32(127), absmax, out=inv, where=absmax >= INT8_TINY)
    scaled = padded * inv[:, None]
    np.rint(scaled, out=scaled)
    codes = scaled.astype(I8).reshape(-1)[:n]
    if bad is not None:
        codes[bad.reshape(-1)[:n]] = INT8_NAN_CODE
    scale = np.minimum(absmax / np.float32(127), INT8_MAX_SCALE)
    return np.where(inv > 0, scale, np.float32(0)), codes


class Sigma8Codec(ValueCodec):
    """6-sigma uniform 8-bit (hivemind ``Uniform8BitQuantization``, PRIME): per chunk,
    ``scale = 6 * std / 256``, ``code = clip(rint((x - mean) / scale) + 128, 0, 255)``, and a
    256-entry codebook holding the mean of the inputs that fell in each bucket (0 if empty)."""

    codec_id = CodecId.SIGMA8

    def encode(self, values: Floats, *, block: int) -> Parts:
        n = values.size
        mean = float(np.mean(values, dtype=np.float64)) if n else 0.0
        finite = True
        if not np.isfinite(mean):  # NaN/Inf present: statistics over the finite values
            finite = False
            kept = values[np.isfinite(values)]
            mean = float(np.mean(kept, dtype=np.float64)) if kept.size else 0.0
        std = _std(values if finite else kept, np.float32(mean))
        inv64 = SIGMA8_BINS / (SIGMA8_RANGE * std) if std > 0 else 0.0
        inv = np.float32(inv64 if inv64 < 1e38 else 0.0)
        codes = np.empty(n, U8)
        counts = np.zeros(SIGMA8_BINS, np.int64)
        sums = np.zeros(SIGMA8_BINS, np.float64)
        for i in range(0, n, SLICE):  # cache-sized slices (see map_slices)
            v = values[i : i + SLICE]
            code = _sigma8_codes(v, np.float32(mean), inv, finite)
            codes[i : i + SLICE] = code
            counts += np.bincount(code, minlength=SIGMA8_BINS)
            sums += np.bincount(code, weights=v, minlength=SIGMA8_BINS)
        book = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0).astype(F32)
        return (book, codes)

    def decode(self, parts: Sequence[NDArray[Any]], *, block: int) -> Floats:
        book, codes = parts
        return np.take(np.asarray(book, np.float32), codes)


def _padded_blocks(values: Floats, block: int, nblocks: int) -> Floats:
    """``values`` as a (nblocks, block) array, zero-padding the last block (a view if full)."""
    n = values.size
    if n == nblocks * block:
        return values.reshape(nblocks, block)
    padded = np.zeros(nblocks * block, np.float32)
    padded[:n] = values
    return padded.reshape(nblocks, block)


def _sigma8_codes(v: Floats, mean: np.float32, inv: np.float32, finite: bool) -> NDArray[np.uint8]:
    c = v - mean
    c *= inv
    np.rint(c, out=c)
    c += np.float32(SIGMA8_BINS // 2)
    np.clip(c, 0, SIGMA8_BINS - 1, out=c)
    code = c.astype(U8)
    if not finite:
        bad = ~np.isfinite(v)
        code[bad] = np.where(v[bad] == -np.inf, 0, SIGMA8_BINS - 1)
    return code


def _std(values: Floats, mean: np.float32) -> float:
    """Unbiased standard deviation of finite ``values`` around ``mean`` (0 for fewer than 2)."""
    n = values.size
    if n < 2:
        return 0.0
    ss = 0.0
    for i in range(0, n, SLICE):
        c = values[i : i + SLICE] - mean
        part = float(np.dot(c, c))
        if not np.isfinite(part):  # float32 overflow of huge values: redo in float64
            wide = values[i : i + SLICE].astype(np.float64) - float(mean)
            part = float(np.dot(wide, wide))
        ss += part
    return float(np.sqrt(ss / (n - 1)))


VALUE_STRATEGIES: tuple[ValueCodec, ...] = (
    NoneCodec(),
    Fp16Codec(),
    Bf16Codec(),
    Int8AbsmaxCodec(),
    Sigma8Codec(),
)
