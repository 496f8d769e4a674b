"""Copies on purpose: leased remote pins (sans-I/O), both ends.

Theory of operation
-------------------
A node that wants a blob kept on ``k`` other members (``replicate(id, copies=k)``) runs one
``Replicator``; every member runs one ``Leases`` table for the copies it keeps for others.

**Requester** (``Replicator``). A *target* is (blob id, copies wanted). Its *copies* are the
members asked to keep the blob, each in one of three states:

* ``ASKING``: a ``BlobLease`` is due (at ``due``) or in flight; not confirmed;
* ``FETCHING``: the member leased it and is fetching it; asked again every ``poll_s``;
* ``HELD``: the member holds the whole blob under our lease until ``held_until``; asked again
  (renewed) every ``lease_s / 3``. Only ``HELD`` copies are *confirmed*.

Triggers: ``replicate`` / ``set_members`` **top up** a target to ``copies`` members, taken in
rendezvous order of the blob id over the live members (``node.placement.rank``), first those
not known to hold the blob already, then those that do (so a small mesh still gets its
copies); the requester itself is never a copy. An answer moves a copy (``on_reply``): ``HELD``
and ``FETCHING`` as above; ``REFUSED`` / ``FAILED`` drop it and bar that member for this blob
for ``retry_after_s``. ``on_no_reply`` (the ask timed out or the link failed) counts a miss;
``max_misses`` in a row drop the copy the same way. A member that leaves or dies
(``set_members``) is dropped at once. A ``HELD`` copy whose lease ran out unrenewed goes back
to ``ASKING``. ``release`` sends ``BlobRelease`` to every copy and forgets the target; an
answer about a blob or member no target has is answered by ``BlobRelease`` too (a stray lease
ends now rather than at its expiry). Every change of a target's confirmed set is a
``CopiesChanged`` event.

**Holder** (``Leases``). ``grant`` records (requester, blob) until ``now + lease_s``, refusing
past ``max_total`` leases or ``max_per_requester`` for one requester; ``release`` ends one at
once. The timer sweeps: ``LeaseEnded(blob_id)`` once the last lease on a blob has run out or
was released, and the owner lets the blob become an ordinary cache entry again (LRU).

Invariants: at most ``max_blobs`` targets and ``max_copies`` copies each (so at most
``max_blobs * max_copies`` leases held); a holder grants at most ``max_total``; each copy has
at most one ask in flight; nothing here touches a clock or a socket.
"""

from __future__ import annotations

import enum
import heapq
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from node.blobs.manifest import BlobError
from node.core import Send, Stats
from node.placement import rank
from protocol.connection import Channel
from protocol.messages.blobs import MAX_COPIES, MAX_HINTS, BlobLease, BlobRelease, LeaseStatus


class ReplicaLimit(BlobError):
    """Past a bound: too many blobs replicated at once, or too many copies of one."""


class ReplicationTimeout(BlobError):
    """Fewer copies than asked were confirmed in time; ``holders``: those that were. The copies
    are still sought (and the confirmed ones renewed) until the blob is released."""

    def __init__(self, message: str, *, holders: tuple[bytes, ...]) -> None:
        super().__init__(message)
        self.holders = holders


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaSettings:
    """How a requester keeps its copies."""

    lease_s: float = 60.0
    """Lease asked for each copy; renewed every ``lease_s / 3``. A copy whose requester is gone
    is an ordinary cache entry again after at most this long."""
    poll_s: float = 1.0
    """Seconds between asks while a copy is not confirmed yet (being fetched, or unanswered)."""
    max_misses: int = 3
    """Asks in a row without an answer after which a copy is dropped (and replaced)."""
    retry_after_s: float = 60.0
    """A member that refused or failed a copy is not asked again for that blob for this long."""
    max_blobs: int = 1024
    """Blobs this node keeps copies of at once."""
    max_copies: int = MAX_COPIES
    """Copies of one blob at most."""

    def __post_init__(self) -> None:
        if not 1.0 <= self.lease_s <= 3600.0 or self.poll_s <= 0 or self.retry_after_s < 0:
            raise ValueError("lease_s must be in 1..3600 s, poll_s positive, retry_after_s >= 0")
        if self.max_misses < 1 or self.max_blobs < 1 or not 1 <= self.max_copies <= MAX_COPIES:
            raise ValueError(f"max_misses, max_blobs >= 1 and max_copies in 1..{MAX_COPIES}")

    @property
    def renew_s(self) -> float:
        return self.lease_s / 3


class CopyState(enum.Enum):
    ASKING = "asking"
    FETCHING = "fetching"
    HELD = "held"


@dataclass(frozen=True, slots=True)
class CopiesChanged:
    """The confirmed copies of ``blob_id`` changed: now ``holders`` (in rank order)."""

    blob_id: bytes
    holders: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class LeaseEnded:
    """No lease keeps ``blob_id`` any more (every one ran out or was released)."""

    blob_id: bytes


@dataclass(slots=True)
class _Copy:
    state: CopyState = CopyState.ASKING
    due: float = 0.0
    inflight: bool = False
    misses: int = 0
    held_until: float = 0.0


@dataclass(slots=True)
class _Target:
    copies: int
    known: frozenset[bytes]
    """Members known to hold the blob already: chosen after every other."""
    hints: tuple[bytes, ...]
    members: dict[bytes, _Copy] = field(default_factory=dict)
    barred: dict[bytes, float] = field(default_factory=dict)
    confirmed: tuple[bytes, ...] = ()


class Replicator:
    """The requester's copies of every blob it replicates (module docstring)."""

    def __init__(self, *, node_id: bytes, settings: ReplicaSettings | None = None) -> None:
        self.node_id = node_id
        self.settings = settings or ReplicaSettings()
        self._targets: dict[bytes, _Target] = {}
        self._live: list[bytes] = []
        self._sends: list[Send[BlobLease | BlobRelease]] = []
        self._events: deque[CopiesChanged] = deque()
        self.counters: Counter[str] = Counter()

    # ---- inputs ---------------------------------------------------------------------

    def replicate(self, blob_id: bytes, copies: int, *, now: float, known: Iterable[bytes] = (),
                  hints: Iterable[bytes] = ()) -> None:
        """Keep ``copies`` leased copies of ``blob_id`` (0: ``release``). ``known``: members
        that hold it already (chosen last); ``hints``: members to fetch it from (sent along).
        ``ReplicaLimit`` past ``max_copies`` or ``max_blobs``."""
        if copies == 0:
            self.release(blob_id)
            return
        if not 0 < copies <= self.settings.max_copies:
            raise ReplicaLimit(f"{copies} copies: at most {self.settings.max_copies}")
        target = self._targets.get(blob_id)
        if target is None:
            if len(self._targets) >= self.settings.max_blobs:
                raise ReplicaLimit(f"already keeping copies of {len(self._targets)} blobs (at most "
                                   f"{self.settings.max_blobs}): release some first")
            target = self._targets[blob_id] = _Target(copies=copies, known=frozenset(), hints=())
        target.copies = copies
        target.known = frozenset(known) - {self.node_id}
        target.hints = tuple(dict.fromkeys(hints))[:MAX_HINTS]
        self._shrink(blob_id, target)
        self._top_up(blob_id, target, now=now)

    def release(self, blob_id: bytes) -> None:
        """Stop keeping copies of ``blob_id``: ``BlobRelease`` to each copy."""
        target = self._targets.pop(blob_id, None)
        if target is None:
            return
        for node in target.members:
            self._sends.append(Send(dest=node, channel=Channel.CONTROL, message=BlobRelease(blob_id=blob_id)))
        self.counters["released"] += 1

    def set_members(self, live: Iterable[bytes], *, now: float) -> None:
        """The live members now (others than this node): copies on the others are dropped."""
        self._live = [n for n in live if n != self.node_id]
        alive = set(self._live)
        for blob_id, target in self._targets.items():
            for node in [n for n in target.members if n not in alive]:
                del target.members[node]
                self.counters["lost"] += 1
            self._top_up(blob_id, target, now=now)
            self._confirm(blob_id, target)

    def on_reply(self, node: bytes, blob_id: bytes, status: LeaseStatus, *, lease_s: float, now: float) -> None:
        """``node`` answered our ``BlobLease`` for ``blob_id``."""
        target = self._targets.get(blob_id)
        copy = None if target is None else target.members.get(node)
        if target is None or copy is None:
            if status in (LeaseStatus.HELD, LeaseStatus.FETCHING):  # a lease nobody wants: end it now
                self._sends.append(Send(dest=node, channel=Channel.CONTROL, message=BlobRelease(blob_id=blob_id)))
            return
        copy.inflight = False
        copy.misses = 0
        if status is LeaseStatus.HELD and lease_s > 0:
            copy.state = CopyState.HELD
            copy.held_until = now + lease_s
            copy.due = now + min(lease_s, self.settings.lease_s) / 3
        elif status in (LeaseStatus.HELD, LeaseStatus.FETCHING):
            copy.state = CopyState.FETCHING
            copy.due = now + self.settings.poll_s
        else:
            self._drop(blob_id, target, node, now=now)
            self.counters["refused"] += 1
        self._confirm(blob_id, target)

    def on_no_reply(self, node: bytes, blob_id: bytes, *, now: float) -> None:
        """Our ``BlobLease`` to ``node`` went unanswered (timeout, or the link failed)."""
        target = self._targets.get(blob_id)
        copy = None if target is None else target.members.get(node)
        if target is None or copy is None:
            return
        copy.inflight = False
        copy.misses += 1
        self.counters["misses"] += 1
        if copy.misses >= self.settings.max_misses:
            self._drop(blob_id, target, node, now=now)
        else:
            copy.due = now + self.settings.poll_s
        self._confirm(blob_id, target)

    def handle_timer(self, *, now: float) -> None:
        for blob_id, target in self._targets.items():
            for node, until in list(target.barred.items()):
                if until <= now:
                    del target.barred[node]
            for node, copy in target.members.items():
                if copy.state is CopyState.HELD and copy.held_until <= now:
                    copy.state = CopyState.ASKING  # the lease ran out unrenewed
                if not copy.inflight and copy.due <= now:
                    copy.inflight = True
                    self.counters["asks"] += 1
                    self._sends.append(Send(dest=node, channel=Channel.CONTROL, message=BlobLease(
                        req=0, blob_id=blob_id, lease_s=self.settings.lease_s, hints=target.hints)))
            self._top_up(blob_id, target, now=now)
            self._confirm(blob_id, target)

    # ---- outputs --------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest ask due, lease to lapse or bar to lift (a scan: at most
        ``max_blobs * max_copies`` copies)."""
        best: float | None = None
        for target in self._targets.values():
            for copy in target.members.values():
                for at in ((copy.due,) if not copy.inflight else ()) + \
                        ((copy.held_until,) if copy.state is CopyState.HELD else ()):
                    best = at if best is None or at < best else best
            if len(target.members) < target.copies:
                for at in target.barred.values():
                    best = at if best is None or at < best else best
        return best

    def messages_to_send(self) -> list[Send[BlobLease | BlobRelease]]:
        out, self._sends = self._sends, []
        return out

    def next_event(self) -> CopiesChanged | None:
        return self._events.popleft() if self._events else None

    def confirmed(self, blob_id: bytes) -> tuple[bytes, ...]:
        """The members holding a confirmed copy of ``blob_id`` (rank order)."""
        target = self._targets.get(blob_id)
        return () if target is None else target.confirmed

    def copies_wanted(self, blob_id: bytes) -> int:
        target = self._targets.get(blob_id)
        return 0 if target is None else target.copies

    def copies(self, blob_id: bytes) -> dict[bytes, CopyState]:
        target = self._targets.get(blob_id)
        return {} if target is None else {n: c.state for n, c in target.members.items()}

    def stats(self) -> Stats:
        out: dict[str, float] = {
            "blob_replicated_blobs": float(len(self._targets)),
            "blob_replica_copies": float(sum(len(t.confirmed) for t in self._targets.values())),
        }
        out.update({f"blob_replica_{k}_total": float(v) for k, v in self.counters.items()})
        return out

    # ---- internals ------------------------------------------------------------------

    def _top_up(self, blob_id: bytes, target: _Target, *, now: float) -> None:
        missing = target.copies - len(target.members)
        if missing <= 0:
            return
        ranked = [n for n in rank(blob_id, self._live) if n not in target.members and n not in target.barred]
        fresh = [n for n in ranked if n not in target.known]
        for node in [*fresh, *(n for n in ranked if n in target.known)][:missing]:
            target.members[node] = _Copy(due=now)

    def _shrink(self, blob_id: bytes, target: _Target) -> None:
        """Fewer copies wanted: release the unconfirmed first, then the last in rank."""
        extra = len(target.members) - target.copies
        if extra <= 0:
            return
        order = {n: i for i, n in enumerate(rank(blob_id, list(target.members)))}
        victims = sorted(target.members, key=lambda n: (target.members[n].state is CopyState.HELD, -order[n]))
        for node in victims[:extra]:
            del target.members[node]
            self._sends.append(Send(dest=node, channel=Channel.CONTROL, message=BlobRelease(blob_id=blob_id)))
        self._confirm(blob_id, target)

    def _drop(self, blob_id: bytes, target: _Target, node: bytes, *, now: float) -> None:
        del target.members[node]
        target.barred[node] = now + self.settings.retry_after_s
        self._top_up(blob_id, target, now=now)

    def _confirm(self, blob_id: bytes, target: _Target) -> None:
        held = {n for n, c in target.members.items() if c.state is CopyState.HELD}
        confirmed = tuple(n for n in rank(blob_id, list(held)))
        if confirmed != target.confirmed:
            target.confirmed = confirmed
            self._events.append(CopiesChanged(blob_id, confirmed))


class Leases:
    """The leases this node grants: (requester, blob) until a time (module docstring)."""

    def __init__(self, *, max_total: int = 4096, max_per_requester: int = 1024) -> None:
        self.max_total = max_total
        self.max_per_requester = max_per_requester
        self._by_blob: dict[bytes, dict[bytes, float]] = {}
        self._per_requester: Counter[bytes] = Counter()
        self._total = 0
        self._heap: list[tuple[float, bytes, bytes]] = []
        self._events: deque[LeaseEnded] = deque()
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return self._total

    def leased(self, blob_id: bytes) -> bool:
        return blob_id in self._by_blob

    def grant(self, requester: bytes, blob_id: bytes, lease_s: float, *, now: float) -> bool:
        """Lease (or renew) ``blob_id`` for ``requester`` until ``now + lease_s``; False when
        that is past ``max_total`` or ``max_per_requester`` (a renewal always passes)."""
        holders = self._by_blob.get(blob_id)
        if holders is None or requester not in holders:
            if len(self) >= self.max_total or self._per_requester[requester] >= self.max_per_requester:
                self.counters["refused"] += 1
                return False
            holders = self._by_blob.setdefault(blob_id, {})
            self._per_requester[requester] += 1
            self._total += 1
            self.counters["granted"] += 1
        until = now + lease_s
        holders[requester] = until
        if len(self._heap) > 4 * max(16, len(self)):  # renewals leave stale entries: rebuild
            self._heap = [(t, b, r) for b, rs in self._by_blob.items() for r, t in rs.items()]
            heapq.heapify(self._heap)
        else:
            heapq.heappush(self._heap, (until, blob_id, requester))
        return True

    def release(self, requester: bytes, blob_id: bytes) -> None:
        """End ``requester``'s lease on ``blob_id`` now."""
        holders = self._by_blob.get(blob_id)
        if holders is None or holders.pop(requester, None) is None:
            return
        self._forget(requester)
        if not holders:
            del self._by_blob[blob_id]
            self._events.append(LeaseEnded(blob_id))

    def handle_timer(self, *, now: float) -> None:
        """Sweep the leases that ran out."""
        while self._heap and self._heap[0][0] <= now:
            until, blob_id, requester = heapq.heappop(self._heap)
            holders = self._by_blob.get(blob_id)
            if holders is None or holders.get(requester) != until:
                continue  # renewed or released since
            del holders[requester]
            self._forget(requester)
            self.counters["expired"] += 1
            if not holders:
                del self._by_blob[blob_id]
                self._events.append(LeaseEnded(blob_id))

    def next_deadline(self) -> float | None:
        while self._heap:
            until, blob_id, requester = self._heap[0]
            if self._by_blob.get(blob_id, {}).get(requester) == until:
                return until
            heapq.heappop(self._heap)
        return None

    def next_event(self) -> LeaseEnded | None:
        return self._events.popleft() if self._events else None

    def stats(self) -> Stats:
        out: dict[str, float] = {"blob_leases_granted": float(len(self))}
        out.update({f"blob_lease_{k}_total": float(v) for k, v in self.counters.items()})
        return out

    def _forget(self, requester: bytes) -> None:
        self._total -= 1
        self._per_requester[requester] -= 1
        if self._per_requester[requester] <= 0:
            del self._per_requester[requester]
