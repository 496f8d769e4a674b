"""Who asked this node for a blob, to be told what it gains (sans-I/O).

Theory of operation
-------------------
A member that asks for a blob's manifest (``BlobWant``) is recorded as *interested* in it for
``ttl_s`` (``add``; a fetch asks a partial holder again every second or so, which refreshes
the record). As this node gains chunks of the blob, the owner asks ``to_announce`` whom to send
``BlobHave``: the unexpired interested members, at most once per ``every_s`` per blob
(``force``: the blob is complete, always). Once it is complete nobody needs more news of it:
``forget``. Members that left or died go (``keep_only``); the timer sweeps expired records
every ``sweep_s`` (``next_deadline``), so a record nobody refreshes is gone within
``ttl_s + sweep_s``.

Bounds: at most ``max_blobs`` blobs (asking about one more forgets the blob asked about least
recently) and ``max_peers`` members per blob (the oldest record goes).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass, field

from node.core import Stats


@dataclass(slots=True)
class _Asked:
    peers: dict[bytes, float] = field(default_factory=dict)
    """Member -> when its record expires (most recent last)."""
    announced: float = -math.inf


class Interest:
    """The members interested in each blob, until their records expire (module docstring)."""

    def __init__(self, *, now: float, ttl_s: float = 30.0, every_s: float = 0.5, sweep_s: float = 5.0,
                 max_blobs: int = 1024, max_peers: int = 64) -> None:
        self.ttl_s = ttl_s
        self.every_s = every_s
        self.sweep_s = sweep_s
        self.max_blobs = max_blobs
        self.max_peers = max_peers
        self._blobs: OrderedDict[bytes, _Asked] = OrderedDict()
        self._next_sweep = now + sweep_s
        self.expired = 0

    def __len__(self) -> int:
        """Records held (member, blob)."""
        return sum(len(a.peers) for a in self._blobs.values())

    def add(self, blob_id: bytes, peer: bytes, *, now: float) -> None:
        """``peer`` asked about ``blob_id``: record it until ``now + ttl_s``."""
        asked = self._blobs.get(blob_id)
        if asked is None:
            asked = self._blobs[blob_id] = _Asked()
            while len(self._blobs) > self.max_blobs:
                self._blobs.popitem(last=False)
        self._blobs.move_to_end(blob_id)
        asked.peers.pop(peer, None)
        asked.peers[peer] = now + self.ttl_s
        while len(asked.peers) > self.max_peers:
            del asked.peers[next(iter(asked.peers))]

    def to_announce(self, blob_id: bytes, *, now: float, force: bool = False) -> list[bytes]:
        """The members to send ``BlobHave`` about ``blob_id`` now: none when nobody is
        interested, or when the last announcement was less than ``every_s`` ago (``force``: anyway)."""
        asked = self._blobs.get(blob_id)
        if asked is None or (not force and now - asked.announced < self.every_s):
            return []
        peers = [p for p, at in asked.peers.items() if at > now]
        if peers:
            asked.announced = now
        return peers

    def forget(self, blob_id: bytes) -> None:
        """Nobody needs news of ``blob_id`` any more (this node holds all of it)."""
        self._blobs.pop(blob_id, None)

    def keep_only(self, live: Container[bytes]) -> None:
        """Forget every record of a member not in ``live`` (it left or died)."""
        for blob_id in list(self._blobs):
            asked = self._blobs[blob_id]
            for peer in [p for p in asked.peers if p not in live]:
                del asked.peers[peer]
            if not asked.peers:
                del self._blobs[blob_id]

    def handle_timer(self, *, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.sweep_s
        for blob_id in list(self._blobs):
            asked = self._blobs[blob_id]
            for peer in [p for p, at in asked.peers.items() if at <= now]:
                del asked.peers[peer]
                self.expired += 1
            if not asked.peers:
                del self._blobs[blob_id]

    def next_deadline(self) -> float | None:
        return self._next_sweep if self._blobs else None

    def stats(self) -> Stats:
        return {"blob_interested_records": float(len(self))}
