"""The node's blob settings (``NodeConfig.blobs``; every field is a ``--blob-*`` flag)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocol.errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobConfig:
    """How a node's blob service runs."""

    cache_bytes: int = 8 * 1024 ** 3
    """Bound of the blob store: complete blobs plus fetches in progress (unpinned ones are
    evicted, least recently used first)."""
    upload_rate: float = 0.0
    """Bytes per second this node uploads to peers at most; 0: no limit."""
    lease_s: float = 60.0
    """Seconds of the lease this node asks for each copy it keeps elsewhere (``blob put
    --copies``, ``replicate``), renewed every third of it; 1..3600."""
    max_lease_s: float = 600.0
    """Longest lease this node grants another member, whatever it asks: a requester that died
    pins nothing here for longer; 1..86400."""

    def __post_init__(self) -> None:
        if type(self.cache_bytes) is not int or not 0 < self.cache_bytes <= 1 << 50:
            raise ConfigError(f"blob cache bytes {self.cache_bytes!r}: expected a positive integer")
        if not isinstance(self.upload_rate, int | float) or not math.isfinite(self.upload_rate) \
                or self.upload_rate < 0:
            raise ConfigError(f"blob upload rate {self.upload_rate!r}: expected bytes per second >= 0")
        for name, value, most in (("lease", self.lease_s, 3600.0), ("max lease", self.max_lease_s, 86400.0)):
            if not isinstance(value, int | float) or not 1.0 <= value <= most:
                raise ConfigError(f"blob {name} {value!r}: expected seconds in 1..{most:g}")
