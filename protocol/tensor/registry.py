"""The codec registry: one strategy object per ``CodecId``, checked complete at import."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from protocol.tensor.ids import VALUE_CODECS, CodecId
from protocol.tensor.stages import TopKStage, ZstdStage
from protocol.tensor.values import VALUE_STRATEGIES, ValueCodec

TOPK = TopKStage()
ZSTD = ZstdStage()

#: CodecId -> value stage strategy.
VALUES: Mapping[CodecId, ValueCodec] = MappingProxyType({s.codec_id: s for s in VALUE_STRATEGIES})

#: CodecId -> strategy, for every stage on the wire.
STAGES: Mapping[CodecId, ValueCodec | TopKStage | ZstdStage] = MappingProxyType(
    {**VALUES, TOPK.codec_id: TOPK, ZSTD.codec_id: ZSTD}
)


def check_complete() -> None:
    """Raise unless every ``CodecId`` has exactly one strategy of the right kind."""
    missing = [c.name for c in CodecId if c not in STAGES]
    if missing:
        raise TypeError(f"codec ids without a strategy: {missing}")
    if set(VALUES) != VALUE_CODECS:
        raise TypeError(f"value stages {sorted(VALUES)} != {sorted(VALUE_CODECS)}")
    for cid, strategy in STAGES.items():
        if strategy.codec_id is not cid:
            raise TypeError(f"{type(strategy).__name__} registered under {cid.name}")


check_complete()
