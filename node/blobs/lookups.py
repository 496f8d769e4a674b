"""When one fetch asks for holders again (sans-I/O).

Theory of operation
-------------------
A fetch asks the blob's directory members who holds it when it starts. Fetches that start
together are not recorded there yet (each records itself once it has the manifest), so a fetch
that asked only then would never learn of the others and all of them would pull from the one
seeder. So a fetch looks up again while it runs: every ``every_s`` (``due``), and at once when
its core runs out of holders (``urgent``, on ``NeedHolders``). A lookup that finds nobody new
doubles the interval, up to ``max_every_s``; one that finds someone new resets it, so a swarm
that is still forming is watched closely and a settled one costs a directory ask every
``max_every_s``.

Bounds: at most one lookup in flight (``begin`` ... ``end``). When the directory knows nobody,
the fetch may ask random live members instead (``fallback``): ``fallback_members`` of them at
most once per ``fallback_every_s``, so a fetch of a blob nobody holds costs a trickle, not a
flood.
"""

from __future__ import annotations

from node.core import Stats


class HolderLookups:
    """One fetch's schedule of holder lookups (module docstring)."""

    def __init__(self, *, now: float, every_s: float = 1.0, max_every_s: float = 8.0,
                 fallback_every_s: float = 10.0, fallback_members: int = 8) -> None:
        if not 0 < every_s <= max_every_s or fallback_every_s <= 0 or fallback_members < 0:
            raise ValueError("expected 0 < every_s <= max_every_s, fallback_every_s > 0, fallback_members >= 0")
        self.every_s = every_s
        self.max_every_s = max_every_s
        self.fallback_every_s = fallback_every_s
        self.fallback_members = fallback_members
        self.in_flight = False
        self._interval = every_s
        self._next = self._began = now
        self._urgent = False
        self._fallback_at = now
        self.counters = {"lookups": 0, "fallbacks": 0}

    def urgent(self) -> None:
        """The fetch has no usable holder: the next lookup is due now."""
        self._urgent = True

    def due(self, *, now: float) -> bool:
        """A lookup should start now (none is in flight)."""
        return not self.in_flight and (self._urgent or now >= self._next)

    def begin(self, *, now: float) -> None:
        """A lookup starts (call only when ``due``)."""
        assert not self.in_flight, "one lookup at a time"
        self.in_flight = True
        self._urgent = False
        self._began = now
        self.counters["lookups"] += 1

    def end(self, *, found_new: bool) -> None:
        """The lookup ended; ``found_new``: it found a holder the fetch did not know."""
        self.in_flight = False
        self._interval = self.every_s if found_new else min(self.max_every_s, self._interval * 2)
        self._next = self._began + self._interval

    def fallback(self, *, now: float) -> int:
        """How many random members the lookup may ask, the directory knowing nobody: 0 until
        ``fallback_every_s`` after the last time."""
        if now < self._fallback_at or not self.fallback_members:
            return 0
        self._fallback_at = now + self.fallback_every_s
        self.counters["fallbacks"] += 1
        return self.fallback_members

    def next_deadline(self) -> float | None:
        """When the next lookup is due (None while one is in flight; it is due now when urgent)."""
        if self.in_flight:
            return None
        return self._began if self._urgent else self._next

    def stats(self) -> Stats:
        return {f"blob_holder_{k}_total": float(v) for k, v in self.counters.items()}
