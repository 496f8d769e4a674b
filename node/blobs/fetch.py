"""The multi-source fetch of one blob (sans-I/O).

Theory of operation
-------------------
A ``BlobFetch`` knows the blob's ``Manifest`` (already checked against the blob id by its
owner), which chunks are already held (``have=``: a resumed fetch starts from what the store
kept) and a set of **holders**, each with the chunks it has (``None``: all of them). It emits
``ChunkRequest``s (``messages_to_send()``) and takes ``on_chunk`` / ``on_missing`` answers.

Chunk states: *missing* -> *requested* (from one holder; two or more in the endgame) ->
*verified*. Triggers:

* **schedule** (after every input): each usable holder gets requests until it has ``window``
  in flight (a holder that timed out gets a window of 1 until it answers in time again). A
  holder takes the first missing chunk of this fetch's shuffled chunk order that it has and
  that nobody is asked for, so different fetchers of one blob ask a seeder for different
  chunks first and can then trade them (swarming), and one fetch spreads over every holder.
  A complete holder (a seeder) is asked first for a chunk no partial holder has (among the
  next ``SEED_LOOKAHEAD`` free ones), and of those first for one in this fetch's *stripe*: the
  chunks that rendezvous hashing of the chunk index gives to ``me`` among this fetch and the
  partial holders it knows (``stripe_owner``). Fetchers that know each other agree on the
  stripes, so they ask the seeder for disjoint chunks and its upload, the scarce one, carries
  each chunk about once; the rest they trade.
* **on_chunk**: the chunk's SHA-256 must equal the manifest's digest. A match is *verified*
  (``ChunkVerified`` carries the bytes, once per chunk; duplicates are counted and dropped).
  A mismatch **blames** the sender: it is never asked again, its requests move to others.
* **on_missing** (the holder says it lacks the chunk, or is busy): that chunk leaves the
  holder's known set (busy: only this request ends) and goes back to missing.
* **timeout** (``request_timeout_s`` after a request): the chunk goes back to missing (a late
  answer is still taken if it verifies), the holder's window drops to 1; after
  ``max_strikes`` timeouts in a row it is dropped (it lost its share to the others).
* **remove_holder** (the holder died or left): its requests go back to missing. The chunks
  already verified are kept: nothing is fetched twice (resume).
* **endgame**: once every unverified chunk is requested and at most ``endgame_chunks`` remain,
  an idle holder may also be asked for a chunk already requested elsewhere (at most
  ``endgame_copies`` requests per chunk); the first verified copy wins.
* **stall**: with chunks left and no usable holder, ``NeedHolders`` is emitted (the owner asks
  the directory again and calls ``add_holder``); after ``stall_timeout_s`` with none the fetch
  fails (``FetchFailed``).

Invariants: a chunk is verified at most once and only with the manifest's digest; nothing
unverified is ever emitted; every request in flight has a deadline; a blamed holder is never
asked again by this fetch, nor is anything it sends taken.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import random
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from node.bundles.manifest import Manifest
from node.core import Send, Stats
from protocol.connection import Channel


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchSettings:
    """How one fetch schedules its requests."""

    window: int = 4
    """Requests in flight to one holder at once (1 MiB chunks: 4 fill a 100 Mbit/s, 100 ms link)."""
    request_timeout_s: float = 10.0
    """Seconds a chunk request may take before it is given to someone else."""
    max_strikes: int = 3
    """Timeouts in a row after which a holder is dropped from this fetch."""
    endgame_chunks: int = 4
    """Unverified chunks left at which idle holders may duplicate requests."""
    endgame_copies: int = 2
    """Most requests in flight for one chunk in the endgame."""
    stall_timeout_s: float = 30.0
    """Seconds without a usable holder before the fetch fails."""

    def __post_init__(self) -> None:
        if not 1 <= self.window <= 256:
            raise ValueError(f"window {self.window} is not in 1..256")
        if self.request_timeout_s <= 0 or self.stall_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_strikes < 1 or self.endgame_copies < 1 or self.endgame_chunks < 0:
            raise ValueError("max_strikes and endgame_copies must be >= 1, endgame_chunks >= 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkRequest:
    """Ask the destination for chunk ``index`` of ``blob_id`` (the adapter sends ``BLOB_CHUNK_GET``)."""

    blob_id: bytes
    index: int


@dataclass(frozen=True, slots=True)
class ChunkVerified:
    """Chunk ``index`` arrived from ``source`` and matches the manifest: store it."""

    index: int
    data: bytes
    source: bytes


@dataclass(frozen=True, slots=True)
class HolderBlamed:
    """``holder`` sent chunk ``index`` with the wrong digest; it is avoided from now on."""

    holder: bytes
    index: int


@dataclass(frozen=True, slots=True)
class NeedHolders:
    """No usable holder is left while chunks are missing: find more (``add_holder``)."""


@dataclass(frozen=True, slots=True)
class FetchDone:
    """Every chunk is verified."""


@dataclass(frozen=True, slots=True)
class FetchFailed:
    reason: str


#: Free chunks a complete holder's next request looks through for one no partial holder has.
SEED_LOOKAHEAD = 64

FetchEvent = ChunkVerified | HolderBlamed | NeedHolders | FetchDone | FetchFailed


class FetchState(enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(slots=True)
class _Holder:
    node: bytes
    have: set[int] | None
    """Chunks it has; None: all."""
    inflight: dict[int, float] = field(default_factory=dict)
    """Chunk -> deadline of our request."""
    strikes: int = 0
    slow: bool = False
    received: int = 0

    def has(self, index: int) -> bool:
        return self.have is None or index in self.have


def stripe_owner(index: int, nodes: Iterable[bytes]) -> bytes | None:
    """The node whose stripe chunk ``index`` is in, of ``nodes`` (rendezvous hashing)."""
    key = index.to_bytes(8, "big")
    return max(nodes, key=lambda n: hashlib.blake2b(key + n, digest_size=8).digest(), default=None)


class BlobFetch:
    """One blob's fetch from many holders (module docstring)."""

    def __init__(self, *, blob_id: bytes, manifest: Manifest, holders: Iterable[bytes] = (),
                 have: Iterable[int] = (), now: float, rng: random.Random,
                 settings: FetchSettings | None = None, me: bytes | None = None) -> None:
        self.blob_id = blob_id
        self.me = me
        """This node (its stripe of the chunks is asked of seeders first); None: no stripes."""
        self.manifest = manifest
        self.settings = settings or FetchSettings()
        self._rng = rng
        n = len(manifest.chunks)
        self._verified = [False] * n
        for i in have:
            if 0 <= i < n:
                self._verified[i] = True
        self.verified_count = sum(self._verified)
        order = [i for i in range(n) if not self._verified[i]]
        rng.shuffle(order)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(order)
        """Unverified chunks nobody is asked for, in this fetch's order."""
        self._requested: dict[int, set[bytes]] = {}
        """Unverified chunks asked of at least one holder -> those holders."""
        self._holders: dict[bytes, _Holder] = {}
        self._avoid: set[bytes] = set()
        """Blamed holders: never asked again, nothing they send is taken."""
        self._dropped: set[bytes] = set()
        """Holders dropped for timing out: not asked again, a late chunk is still taken."""
        self._sends: list[Send[ChunkRequest]] = []
        self._events: list[FetchEvent] = []
        self._stall_at: float | None = None
        self._need_sent = False
        self.state = FetchState.RUNNING
        self.counters = {"requests": 0, "timeouts": 0, "duplicates": 0, "blamed": 0, "missing": 0,
                         "bytes": 0, "endgame_requests": 0}
        for node in holders:
            self.add_holder(node, now=now)
        self._step(now)

    # ---- inputs ---------------------------------------------------------------------

    def add_holder(self, node: bytes, *, now: float, have: Iterable[int] | None = None) -> None:
        """``node`` holds ``have`` (None: every chunk); known holders get their set replaced."""
        if node in self._avoid or node in self._dropped or self.state is not FetchState.RUNNING:
            return
        chunks = None if have is None else {i for i in have if 0 <= i < len(self._verified)}
        holder = self._holders.get(node)
        if holder is None:
            self._holders[node] = _Holder(node=node, have=chunks)
        else:
            holder.have = chunks
        self._step(now)

    def remove_holder(self, node: bytes, *, now: float) -> None:
        """``node`` is gone (died, left): its requests go to the others."""
        holder = self._holders.pop(node, None)
        if holder is not None:
            self._release(holder)
            self._step(now)

    def on_chunk(self, source: bytes, index: int, data: bytes, *, now: float) -> None:
        """Chunk ``index`` arrived from ``source`` (requested or not)."""
        holder = self._holders.get(source)
        if holder is not None and index in holder.inflight:
            del holder.inflight[index]
            self._unask(index, source)
        if not 0 <= index < len(self._verified) or source in self._avoid or self.state is not FetchState.RUNNING:
            return
        if self._verified[index]:
            self.counters["duplicates"] += 1
            self._step(now)
            return
        if len(data) != self._chunk_size(index) or hashlib.sha256(data).digest() != self.manifest.chunks[index]:
            self._blame(source, index)
            self._step(now)
            return
        self._verified[index] = True
        self.verified_count += 1
        self.counters["bytes"] += len(data)
        self._requested.pop(index, None)
        self._free.pop(index, None)
        if holder is not None:
            holder.received += 1
            holder.strikes = 0
            holder.slow = False
        self._events.append(ChunkVerified(index, data, source))
        self._step(now)

    def on_missing(self, source: bytes, index: int, *, now: float, busy: bool = False) -> None:
        """``source`` answered that it lacks chunk ``index`` (``busy``: it cannot serve it now)."""
        holder = self._holders.get(source)
        if holder is None:
            return
        if holder.inflight.pop(index, None) is not None:
            self._unask(index, source)
        if not busy:
            self.counters["missing"] += 1
            if holder.have is None:
                holder.have = set(range(len(self._verified)))
            holder.have.discard(index)
        self._step(now)

    def handle_timer(self, *, now: float) -> None:
        for holder in list(self._holders.values()):
            late = [i for i, at in holder.inflight.items() if at <= now]
            for index in late:
                del holder.inflight[index]
                self._unask(index, holder.node)
                self.counters["timeouts"] += 1
                holder.strikes += 1
                holder.slow = True
            if holder.strikes >= self.settings.max_strikes:
                self._drop(holder)
        if self.state is FetchState.RUNNING and self._stall_at is not None and now >= self._stall_at:
            self._finish(FetchState.FAILED, f"no holder could serve the remaining "
                         f"{len(self._verified) - self.verified_count} chunks")
        self._step(now)

    def cancel(self, reason: str) -> None:
        if self.state is FetchState.RUNNING:
            self._finish(FetchState.FAILED, reason)

    # ---- outputs --------------------------------------------------------------------

    def messages_to_send(self) -> list[Send[ChunkRequest]]:
        out, self._sends = self._sends, []
        return out

    def next_event(self) -> FetchEvent | None:
        return self._events.pop(0) if self._events else None

    def next_deadline(self) -> float | None:
        if self.state is not FetchState.RUNNING:
            return None
        times = [at for h in self._holders.values() for at in h.inflight.values()]
        if self._stall_at is not None:
            times.append(self._stall_at)
        return min(times, default=None)

    @property
    def holders(self) -> list[bytes]:
        return list(self._holders)

    @property
    def avoided(self) -> frozenset[bytes]:
        return frozenset(self._avoid)

    @property
    def dropped(self) -> frozenset[bytes]:
        """Holders dropped for timing out (not asked again by this fetch)."""
        return frozenset(self._dropped)

    def has(self, index: int) -> bool:
        return 0 <= index < len(self._verified) and self._verified[index]

    def verified(self) -> list[int]:
        return [i for i, v in enumerate(self._verified) if v]

    def in_flight(self, node: bytes | None = None) -> int:
        if node is not None:
            h = self._holders.get(node)
            return 0 if h is None else len(h.inflight)
        return sum(len(h.inflight) for h in self._holders.values())

    def stats(self) -> Stats:
        return {f"blob_fetch_{k}_total": float(v) for k, v in self.counters.items()}

    # ---- scheduling -----------------------------------------------------------------

    def _chunk_size(self, index: int) -> int:
        m = self.manifest
        return min(m.chunk, m.size - index * m.chunk)

    def _blame(self, node: bytes, index: int) -> None:
        self.counters["blamed"] += 1
        self._events.append(HolderBlamed(node, index))
        holder = self._holders.pop(node, None)
        self._avoid.add(node)
        if holder is not None:
            self._release(holder)

    def _drop(self, holder: _Holder) -> None:
        self._holders.pop(holder.node, None)
        self._dropped.add(holder.node)
        self._release(holder)

    def _release(self, holder: _Holder) -> None:
        for index in holder.inflight:
            self._unask(index, holder.node)
        holder.inflight.clear()

    def _unask(self, index: int, node: bytes) -> None:
        """``node`` is no longer asked for ``index``; nobody asked: it is free again (first in line)."""
        asked = self._requested.get(index)
        if asked is None:
            return
        asked.discard(node)
        if not asked:
            del self._requested[index]
            if not self._verified[index]:
                self._free[index] = None
                self._free.move_to_end(index, last=False)

    def _finish(self, state: FetchState, reason: str = "") -> None:
        self.state = state
        for holder in self._holders.values():
            holder.inflight.clear()
        self._requested.clear()
        self._free.clear()
        self._events.append(FetchDone() if state is FetchState.DONE else FetchFailed(reason))

    def _step(self, now: float) -> None:
        if self.state is not FetchState.RUNNING:
            return
        if self.verified_count == len(self._verified):
            self._finish(FetchState.DONE)
            return
        usable = [h for h in self._holders.values() if self._useful(h)]
        self._rng.shuffle(usable)
        progress = True
        while progress:  # round-robin, one request per holder per pass: an even spread
            progress = False
            for holder in usable:
                window = 1 if holder.slow else self.settings.window
                if len(holder.inflight) < window and self._assign(holder, now):
                    progress = True
        if usable:
            self._stall_at = None
            self._need_sent = False
        elif self._stall_at is None:
            self._stall_at = now + self.settings.stall_timeout_s
            if not self._need_sent:
                self._need_sent = True
                self._events.append(NeedHolders())

    def _useful(self, holder: _Holder) -> bool:
        if holder.have is None:
            return True
        return any(not self._verified[i] for i in holder.have)

    def _assign(self, holder: _Holder, now: float) -> bool:
        if holder.have is None:
            index = self._for_seeder()
        else:
            index = next((i for i in self._free if i in holder.have), None)
        if index is not None:
            self._request(holder, index, now)
            return True
        if self._free or len(self._requested) > self.settings.endgame_chunks:
            return False
        for index, asked in self._requested.items():  # endgame: every unverified chunk is asked for
            if holder.node not in asked and len(asked) < self.settings.endgame_copies and holder.has(index):
                self.counters["endgame_requests"] += 1
                self._request(holder, index, now)
                return True
        return False

    def _for_seeder(self) -> int | None:
        """Among the next ``SEED_LOOKAHEAD`` free chunks, the first in this fetch's stripe that
        no partial holder has, else the first no partial holder has; else the first free one."""
        partial = {h.node: h.have for h in self._holders.values() if h.have is not None}
        if partial:
            fresh = [i for i in itertools.islice(self._free, SEED_LOOKAHEAD)
                     if not any(i in have for have in partial.values())]
            if self.me is not None:
                swarm = [self.me, *partial]
                mine = next((i for i in fresh if stripe_owner(i, swarm) == self.me), None)
                if mine is not None:
                    return mine
            if fresh:
                return fresh[0]
        return next(iter(self._free), None)

    def _request(self, holder: _Holder, index: int, now: float) -> None:
        holder.inflight[index] = now + self.settings.request_timeout_s
        self._free.pop(index, None)
        self._requested.setdefault(index, set()).add(holder.node)
        self.counters["requests"] += 1
        self._sends.append(Send(dest=holder.node, channel=Channel.BULK,
                                message=ChunkRequest(blob_id=self.blob_id, index=index)))
