"""Transmit-limited broadcast queue (memberlist queue.go ``TransmitLimitedQueue``).

Theory of operation
-------------------
Gossip (``Alive``/``Suspect``/``Dead``) is not sent once to everyone: each node keeps a
queue of recent news and attaches a few items to every message it sends anyway (probes,
acks) and to a small gossip round every ``gossip_interval`` (SWIM section 4.1,
"infection-style dissemination"). Each item is sent at most
``retransmit_limit(retransmit_mult, N)`` times, which is enough for an epidemic to reach
all N members with high probability, and then dropped.

* *Urgent* items (suspicions, deaths, refutations: news that starts or stops a timer
  somewhere) go before all others; then items sent fewer times; among equals the newest.
  Without the urgent class a refutation queued during a join storm is starved by the
  stream of fresh joins (fewest-sent first) and a suspicion elsewhere can outlive it.
* News about a member invalidates older news about the same member (keyed by node id):
  only the latest state of a member is worth spreading.
* The queue is bounded: beyond ``max_size`` the items sent most often are dropped.
* Passive feedback under pressure (after Demers et al. 1987, "rumor mongering with
  feedback"): while more than ``FEEDBACK_ABOVE`` items are queued, hearing the very news
  we are spreading from someone else counts as one of our transmissions (``heard``): the
  rumour is out already. A mesh of N that all start at once must otherwise send
  N * N * limit Alives (minutes of saturated gossip at N = 1000); with it about half as
  many. A short queue (the normal case: a few changes at a time) keeps the full limit,
  so single updates keep their reach.

Implementation: a heap of ``[class, transmits, -id, key, message, live, heard]`` entries with lazy
deletion, so taking ``m`` items costs O(m log q).
"""

from __future__ import annotations

import heapq
import math
from typing import Any

from protocol.schema import Message


def retransmit_limit(retransmit_mult: int, n: int) -> int:
    """How many times one broadcast is sent: ``retransmit_mult * ceil(log10(n + 1))``."""
    return retransmit_mult * math.ceil(math.log10(n + 1))


#: Queue length above which ``heard`` counts (below it every item gets its full limit).
FEEDBACK_ABOVE = 64

# Entry layout (a list so transmits can be bumped in place).
_PRIO, _TX, _NEG_ID, _KEY, _MSG, _LIVE, _HEARD = range(7)


class BroadcastQueue:
    """Bounded queue of gossip messages, each transmitted a limited number of times."""

    __slots__ = ("_by_key", "_heap", "_next_id", "dropped", "max_size", "retransmit_mult")

    def __init__(self, *, retransmit_mult: int, max_size: int) -> None:
        self.retransmit_mult = retransmit_mult
        self.max_size = max_size
        self._heap: list[list[Any]] = []
        self._by_key: dict[bytes, list[Any]] = {}
        self._next_id = 0
        self.dropped = 0
        """Items dropped because the queue was full (not counting normal retirement)."""

    def __len__(self) -> int:
        return len(self._by_key)

    def queue(self, key: bytes, msg: Message, *, urgent: bool = False) -> None:
        """Add ``msg`` about member ``key``, replacing any older item about it."""
        old = self._by_key.get(key)
        if old is not None:
            old[_LIVE] = False
        self._next_id += 1
        entry: list[Any] = [0 if urgent else 1, 0, -self._next_id, key, msg, True, 0]
        self._by_key[key] = entry
        heapq.heappush(self._heap, entry)
        if len(self._by_key) > self.max_size:
            self._prune()
        elif len(self._heap) > 2 * len(self._by_key) + 64:
            self._compact()

    def get(self, limit: int, *, n_members: int) -> list[Message]:
        """Take up to ``limit`` messages to send now, counting one transmission for each.

        ``n_members`` (the live member count, ourselves included) sets the retransmit limit.
        """
        max_tx = retransmit_limit(self.retransmit_mult, n_members)
        taken: list[list[Any]] = []
        later: list[list[Any]] = []
        heap = self._heap
        while heap and len(taken) < limit:
            entry = heapq.heappop(heap)
            if not entry[_LIVE]:
                continue
            if entry[_HEARD]:  # apply feedback now: its place in the heap changes
                entry[_TX] += entry[_HEARD]
                entry[_HEARD] = 0
                if entry[_TX] >= max_tx:
                    entry[_LIVE] = False
                    del self._by_key[entry[_KEY]]
                else:
                    later.append(entry)
                continue
            taken.append(entry)
        for entry in later:
            heapq.heappush(heap, entry)
        out: list[Message] = []
        for entry in taken:
            out.append(entry[_MSG])
            entry[_TX] += 1
            if entry[_TX] >= max_tx:
                entry[_LIVE] = False
                del self._by_key[entry[_KEY]]
            else:
                heapq.heappush(heap, entry)
        return out

    def has_urgent(self) -> bool:
        """Whether an urgent item (a suspicion, death or refutation) is waiting to be sent."""
        heap = self._heap
        while heap and not heap[0][_LIVE]:
            heapq.heappop(heap)
        return bool(heap) and heap[0][0] == 0

    def heard(self, key: bytes, msg: Message) -> None:
        """Someone sent us ``msg``, which we are spreading too: count one transmission
        (only while the queue is longer than ``FEEDBACK_ABOVE``)."""
        if len(self._by_key) <= FEEDBACK_ABOVE:
            return
        entry = self._by_key.get(key)
        if entry is not None and (entry[_MSG] is msg or entry[_MSG] == msg):
            entry[_HEARD] += 1

    def pending(self) -> list[Message]:
        """The queued messages in send order (for inspection and tests)."""
        return [e[_MSG] for e in sorted(self._by_key.values())]

    def _prune(self) -> None:
        """Drop the most-sent (then oldest) items until ``max_size`` remain."""
        entries = sorted(self._by_key.values())
        for entry in entries[self.max_size :]:
            entry[_LIVE] = False
            del self._by_key[entry[_KEY]]
            self.dropped += 1
        self._compact()

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if e[_LIVE]]
        heapq.heapify(self._heap)
