"""Codec identifiers (the wire enum) and ``CodecSpec``, the per-job choice of codec chain.

A codec chain is always ``[TOPK] VALUE [ZSTD]`` (PROTOCOL.md §10):

* ``TOPK`` (optional) keeps the ``k`` largest magnitudes and sends their indices;
* ``VALUE`` (exactly one) turns the kept float32 values into bytes: ``NONE`` (fp32 as is),
  ``FP16``, ``BF16``, ``INT8_ABSMAX`` (blockwise absmax int8) or ``SIGMA8`` (the 6-sigma
  uniform 8-bit scheme of hivemind and PRIME, with a bucket-mean codebook);
* ``ZSTD`` (optional, last) byte-plane shuffles the float sections and zstd-compresses.

The text form (``CodecSpec.parse`` / ``.name``) joins parts with ``+``::

    none | fp32 | fp16 | bf16 | int8[:BLOCK] | sigma8      the value stage (default none)
    topk[:RATIO]                                          first, if present (0 < RATIO <= 1)
    zstd[:LEVEL]                                          after the value stage (-7..22, not 0)
    chunk:N                                               last: elements per chunk

e.g. ``"int8+zstd"``, ``"topk:0.01+fp16+zstd"``, ``"zstd:3"`` (= ``none+zstd:3``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocol.errors import ConfigError
from protocol.limits import MAX_DECOMPRESSED_CHUNK_BYTES, MAX_TENSOR_CHUNK_BYTES
from protocol.tensor.ids import VALUE_CODECS, CodecId
from protocol.tensor.layout import raw_size

#: Most stages a chain can have (TOPK, VALUE, ZSTD).
MAX_STAGES = 3

#: Most elements one chunk may declare: its float32 output must fit the decompression cap.
MAX_CHUNK_ELEMENTS = MAX_DECOMPRESSED_CHUNK_BYTES // 4

#: Elements per chunk unless the spec says otherwise: 4 MiB of fp32, so encode, send and
#: reduce pipeline while every codec's payload fits ``MAX_TENSOR_CHUNK_BYTES``.
DEFAULT_CHUNK_ELEMENTS = 1 << 20

#: int8 absmax block size (elements per float32 scale): 512 puts int8 at 0.2520x of fp32.
#: Measured on the wire (``bench allreduce --data grad``, the round's result against the exact
#: mean): int8+zstd 0.208x / 0.202x / 0.198x / 0.193x of fp32 at blocks 128 / 256 / 512 / 1024,
#: error 0.0087 / 0.0095 / 0.0106 / 0.0122. 512 is the smallest block under 0.2x with zstd.
DEFAULT_INT8_BLOCK = 512
MIN_INT8_BLOCK = 8
MAX_INT8_BLOCK = 1 << 16

#: Default top-k ratio when ``topk`` has no ``:RATIO``.
DEFAULT_TOPK_RATIO = 0.01

#: zstd level 1: ~0.4-0.5 GB/s per core on gradients; quantize first and let zstd finish.
DEFAULT_ZSTD_LEVEL = 1
MIN_ZSTD_LEVEL = -7
MAX_ZSTD_LEVEL = 22

#: Text names of the value stages (``fp32`` is accepted as an alias of ``none``).
_VALUE_NAMES = {
    "none": CodecId.NONE,
    "fp32": CodecId.NONE,
    "fp16": CodecId.FP16,
    "bf16": CodecId.BF16,
    "int8": CodecId.INT8_ABSMAX,
    "sigma8": CodecId.SIGMA8,
}
_VALUE_TEXT = {
    CodecId.NONE: "none",
    CodecId.FP16: "fp16",
    CodecId.BF16: "bf16",
    CodecId.INT8_ABSMAX: "int8",
    CodecId.SIGMA8: "sigma8",
}


def topk_count(numel: int, ratio: float) -> int:
    """How many values top-k keeps of ``numel``: ``clamp(ceil(ratio * numel), 1, numel)``."""
    if numel <= 0:
        return 0
    return min(numel, max(1, math.ceil(ratio * numel - 1e-9)))


@dataclass(frozen=True, slots=True)
class CodecSpec:
    """A codec chain and its knobs. Frozen; build with ``CodecSpec.parse(text)`` or directly."""

    value: CodecId = CodecId.NONE
    """The value stage: NONE, FP16, BF16, INT8_ABSMAX or SIGMA8."""
    topk_ratio: float | None = None
    """Fraction of each chunk's elements top-k keeps (``None``: no top-k stage). 0 < r <= 1."""
    zstd_level: int | None = None
    """zstd level of the final stage (``None``: no zstd). -7..22, not 0."""
    int8_block: int = DEFAULT_INT8_BLOCK
    """Elements per float32 scale in INT8_ABSMAX (MIN_INT8_BLOCK..MAX_INT8_BLOCK)."""
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    """Elements per chunk; a caller splits a tensor into pieces of at most this many."""

    def __post_init__(self) -> None:
        if not isinstance(self.value, CodecId) or self.value not in VALUE_CODECS:
            raise ConfigError(
                f"codec value stage must be one of {sorted(_VALUE_NAMES)}, got {self.value!r}"
            )
        r = self.topk_ratio
        if r is not None and (type(r) is not float or not 0.0 < r <= 1.0):
            raise ConfigError(f"top-k ratio must be a float in (0, 1], got {r!r}")
        z = self.zstd_level
        if z is not None and (
            type(z) is not int or not MIN_ZSTD_LEVEL <= z <= MAX_ZSTD_LEVEL or z == 0
        ):
            raise ConfigError(
                f"zstd level must be in {MIN_ZSTD_LEVEL}..{MAX_ZSTD_LEVEL} and not 0, got {z!r}"
            )
        b = self.int8_block
        if type(b) is not int or not MIN_INT8_BLOCK <= b <= MAX_INT8_BLOCK:
            raise ConfigError(
                f"int8 block must be in {MIN_INT8_BLOCK}..{MAX_INT8_BLOCK}, got {b!r}"
            )
        n = self.chunk_elements
        if type(n) is not int or not 1 <= n <= MAX_CHUNK_ELEMENTS:
            raise ConfigError(f"chunk_elements must be in 1..{MAX_CHUNK_ELEMENTS}, got {n!r}")
        worst = self.max_payload_bytes()
        if worst > MAX_TENSOR_CHUNK_BYTES:
            raise ConfigError(
                f"codec {self.name!r}: a chunk of {n} elements may need {worst} payload bytes, "
                f"over the {MAX_TENSOR_CHUNK_BYTES} cap; use a smaller chunk:N"
            )

    @property
    def stages(self) -> tuple[CodecId, ...]:
        """The chain as carried on the wire (a chunk may drop ZSTD when it would not shrink it)."""
        out = [CodecId.TOPK] if self.topk_ratio is not None else []
        out.append(self.value)
        if self.zstd_level is not None:
            out.append(CodecId.ZSTD)
        return tuple(out)

    @property
    def lossless(self) -> bool:
        """True when decode(encode(x)) == x bit for bit (fp32, optionally zstd)."""
        return self.value is CodecId.NONE and self.topk_ratio is None

    def max_payload_bytes(self) -> int:
        """Largest payload of a full chunk: its raw size (a chunk whose zstd frame would not
        be smaller than that is sent without ZSTD)."""
        n = self.chunk_elements
        kept = n if self.topk_ratio is None else topk_count(n, self.topk_ratio)
        return raw_size(self.stages, kept=kept, block=self.int8_block)

    @property
    def name(self) -> str:
        """Canonical text form; ``CodecSpec.parse(spec.name) == spec``."""
        parts = []
        if self.topk_ratio is not None:
            parts.append(f"topk:{self.topk_ratio!r}")
        value = _VALUE_TEXT[self.value]
        if self.value is CodecId.INT8_ABSMAX and self.int8_block != DEFAULT_INT8_BLOCK:
            value += f":{self.int8_block}"
        if self.value is not CodecId.NONE or (not parts and self.zstd_level is None):
            parts.append(value)
        if self.zstd_level is not None:
            parts.append(
                "zstd" if self.zstd_level == DEFAULT_ZSTD_LEVEL else f"zstd:{self.zstd_level}"
            )
        if self.chunk_elements != DEFAULT_CHUNK_ELEMENTS:
            parts.append(f"chunk:{self.chunk_elements}")
        return "+".join(parts)

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str) -> CodecSpec:
        """Parse the text form (see the module docstring). ``ConfigError`` on anything else."""
        if not isinstance(text, str) or not text or len(text) > 200:
            raise ConfigError(f"codec spec must be a short non-empty string, got {text!r:.80}")
        kwargs: dict[str, object] = {}
        order = 0  # 0: topk allowed, 1: value allowed, 2: zstd allowed, 3: chunk allowed, 4: done
        for part in text.strip().lower().split("+"):
            head, sep, arg = part.strip().partition(":")
            if sep and not arg:
                raise ConfigError(f"codec spec {text!r}: {head!r} has an empty parameter")
            rank = (
                0
                if head == "topk"
                else 1
                if head in _VALUE_NAMES
                else 2
                if head == "zstd"
                else 3
                if head == "chunk"
                else -1
            )
            if rank < 0:
                raise ConfigError(f"codec spec {text!r}: unknown part {part!r}")
            if rank < order:
                raise ConfigError(
                    f"codec spec {text!r}: {head!r} is out of order or repeated (topk+VALUE+zstd+chunk)"
                )
            order = rank + 1
            _parse_part(head, arg if sep else None, kwargs, text)
        return cls(**kwargs)  # type: ignore[arg-type]


def _parse_part(head: str, arg: str | None, kwargs: dict[str, object], text: str) -> None:
    def number(kind: type[int] | type[float]) -> int | float:
        try:
            v = kind(arg)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigError(f"codec spec {text!r}: bad {head} parameter {arg!r}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"codec spec {text!r}: bad {head} parameter {arg!r}")
        return v

    if head == "topk":
        kwargs["topk_ratio"] = DEFAULT_TOPK_RATIO if arg is None else float(number(float))
    elif head == "zstd":
        kwargs["zstd_level"] = DEFAULT_ZSTD_LEVEL if arg is None else int(number(int))
    elif head == "chunk":
        if arg is None:
            raise ConfigError(f"codec spec {text!r}: chunk needs a size, e.g. chunk:262144")
        kwargs["chunk_elements"] = int(number(int))
    else:
        kwargs["value"] = _VALUE_NAMES[head]
        if arg is not None:
            if head != "int8":
                raise ConfigError(f"codec spec {text!r}: {head} takes no parameter")
            kwargs["int8_block"] = int(number(int))
