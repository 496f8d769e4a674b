"""The provider directory a member keeps for the blobs it ranks first for (sans-I/O).

Theory of operation
-------------------
Holders send ``BlobProvide`` (blob ids, ``ttl_s``) to the first ``DIRECTORY_SIZE`` live members
in rendezvous order of each id (PROTOCOL.md §14.3). Such a member keeps, per blob, the holders
and when each record expires; ``provide`` adds or refreshes records (most recent last),
``find`` answers who holds a blob (most recent first, expired ones left out), ``keep_only``
(or ``drop_holder``) forgets members that left or died. Records also expire on their own: ``handle_timer`` sweeps
every record every ``sweep_s`` (``next_deadline``), so a directory that nobody asks still
forgets holders that stopped providing.

Bounds: at most ``max_blobs`` blobs (a provide for a new blob past it is ignored) and
``max_holders`` holders per blob (the oldest record goes first).
"""

from __future__ import annotations

from collections.abc import Container, Iterable

from node.core import Stats

#: Members in rendezvous order of a blob id that record its holders.
DIRECTORY_SIZE = 3


class ProviderDirectory:
    """Holders recorded per blob, each until its record expires (module docstring)."""

    def __init__(self, *, now: float, sweep_s: float = 5.0, max_blobs: int = 100_000,
                 max_holders: int = 256) -> None:
        self.sweep_s = sweep_s
        self.max_blobs = max_blobs
        self.max_holders = max_holders
        self._records: dict[bytes, dict[bytes, float]] = {}
        self._next_sweep = now + sweep_s
        self.expired = 0
        self.ignored = 0

    def __len__(self) -> int:
        """Records held (holder, blob)."""
        return sum(map(len, self._records.values()))

    def provide(self, holder: bytes, blob_ids: Iterable[bytes], *, ttl_s: float, now: float) -> None:
        """``holder`` holds each of ``blob_ids``: record it until ``now + ttl_s``."""
        expires = now + ttl_s
        for blob_id in blob_ids:
            holders = self._records.get(blob_id)
            if holders is None:
                if len(self._records) >= self.max_blobs:
                    self.ignored += 1
                    continue
                holders = self._records[blob_id] = {}
            holders.pop(holder, None)
            holders[holder] = expires  # most recent last
            if len(holders) > self.max_holders:
                del holders[next(iter(holders))]

    def find(self, blob_id: bytes, *, now: float) -> list[bytes]:
        """The holders recorded for ``blob_id``, most recently provided first."""
        holders = self._records.get(blob_id, {})
        return [n for n, at in reversed(holders.items()) if at > now]

    def drop_holder(self, holder: bytes) -> None:
        """Forget every record of ``holder`` (it left or died)."""
        for blob_id in [b for b, hs in self._records.items() if hs.pop(holder, None) is not None and not hs]:
            del self._records[blob_id]

    def keep_only(self, live: Container[bytes]) -> None:
        """Forget every record of a holder not in ``live`` (it left or died)."""
        for blob_id in list(self._records):
            holders = self._records[blob_id]
            for node in [n for n in holders if n not in live]:
                del holders[node]
            if not holders:
                del self._records[blob_id]

    def handle_timer(self, *, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.sweep_s
        for blob_id in list(self._records):
            holders = self._records[blob_id]
            for node in [n for n, at in holders.items() if at <= now]:
                del holders[node]
                self.expired += 1
            if not holders:
                del self._records[blob_id]

    def next_deadline(self) -> float | None:
        return self._next_sweep if self._records else None

    def stats(self) -> Stats:
        return {"blob_directory_records": float(len(self)), "blob_directory_expired_total": float(self.expired)}
