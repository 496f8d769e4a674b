"""The all-reduce rounds of one node, sans-I/O: which run, which ended, what waits for a start.

Theory of operation
-------------------
``RoundTable`` is the bookkeeping around one node's ``AllReduceRound`` cores, the same for
the node (``service.py``) and the simulator (``testing.AllReduceSim``), so both run one path:

* Rounds. ``add(round_id, item)`` registers a round this node starts (``item`` is
  what the adapter keeps per round) and returns the control messages held for it, to be fed
  to it in arrival order; ``get``; ``end`` when it finished or failed (counted by outcome).
* Keys. ``key_for(group, key)``: the caller's key, else the group's call counter (the n-th
  call on a group is round ``seq:n``), so members that call in the same order agree.
* Recent rounds. The last ``limits.recent`` ended round ids. An id runs once here (``add``
  raises ``ConfigError``); a late control message for one is dropped, except that a finished
  round's ``Epilogue`` answers a late report, commit or takeover with its AR_FINISH.
* Inbox. A control message for a round not started here is held until ``add`` (members
  start at slightly different times), within bounds (``InboxLimits``): messages and bytes
  per sender, messages per round, round ids, bytes in total (a message's size is its encoded
  body). Beyond them the newest message is dropped, except that a new round id or the total
  byte cap evicts the oldest round's messages (the oldest is the likeliest stale). Held
  messages expire ``limits.ttl`` after their round's first one arrived: ``handle_timer`` at
  ``next_deadline()`` drops them (and any later hold does). Tensor messages for a round not
  running are dropped: a member streams data only after the owner's AR_BEGIN, and the
  round's deadlines cope with any loss.
* Outputs. ``messages_to_send()``: the epilogues' AR_FINISH answers. ``stats()``: rounds by
  outcome, finished rounds' durations, what is held, dropped messages by reason.

``same_as_receivers`` is the lossy-codec rule both adapters apply to a finished result;
``required_contributors`` / ``check_contributors`` the caller's ``min_contributors`` rule
(checked before a round starts and on its result; a purely local policy, not on the wire).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from node.allreduce.events import (
    DEFAULT_MIN_CONTRIBUTORS,
    AllReduceError,
    AllReduceOutcome,
    AllReduceResult,
    Floats,
    TooFewContributors,
)
from node.allreduce.round import Epilogue
from node.core import Histogram, Send, Stats
from protocol.connection import Channel
from protocol.errors import ConfigError
from protocol.messages.tensor import (
    ArAverage,
    ArBegin,
    ArCancel,
    ArCommit,
    ArFinish,
    ArPart,
    ArReport,
    ArTakeover,
    DropReason,
)
from protocol.schema import Message, encode_body

log = logging.getLogger("starmesh.allreduce")

R = TypeVar("R")

ControlMessage = ArBegin | ArReport | ArCommit | ArFinish | ArCancel | ArTakeover

#: Round ids with messages waiting for the local start, and messages held per round id.
MAX_PENDING_ROUNDS = 64
MAX_PENDING_PER_ROUND = 1024
#: Seconds a pending message waits for its round to start before it is dropped.
PENDING_TTL_S = 60.0
#: Round ids remembered after they end (their late messages are dropped or answered, not held).
RECENT_ROUNDS = 1024
#: Round ids remembered whose held messages were dropped before the round started here.
MISSED_KEPT = 256
#: Buckets (seconds) of the finished-round duration histogram.
ROUND_SECONDS_BOUNDS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class InboxLimits:
    """Bounds of what a node holds for rounds it has not started (module docstring)."""

    rounds: int = MAX_PENDING_ROUNDS
    """Round ids with held messages; a new one evicts the oldest."""
    per_round: int = MAX_PENDING_PER_ROUND
    """Messages held for one round id."""
    per_sender: int = 4096
    """Messages held from one sender, over all round ids."""
    sender_bytes: int = 4 << 20
    """Encoded bytes held from one sender, over all round ids."""
    total_bytes: int = 32 << 20
    """Encoded bytes held in all; beyond it the oldest rounds' messages are evicted."""
    ttl: float = PENDING_TTL_S
    """Seconds after its round's first held message that a message is dropped."""
    recent: int = RECENT_ROUNDS
    """Ended round ids remembered."""

    def __post_init__(self) -> None:
        for name in ("rounds", "per_round", "per_sender", "sender_bytes", "total_bytes", "recent"):
            v = getattr(self, name)
            if type(v) is not int or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if not (isinstance(self.ttl, int | float) and math.isfinite(self.ttl) and self.ttl > 0):
            raise ConfigError(f"ttl must be a positive number of seconds, got {self.ttl!r}")


class Outcome(enum.Enum):
    """How a round ended here (the ``outcome`` label of ``allreduce_rounds_total``)."""

    FINISHED = "finished"
    FAILED = "failed"
    TIMEOUT = "timeout"
    """Failed at or after its ``round_timeout`` (the caller's ``timeout``)."""
    CANCELLED = "cancelled"
    """This node left it (``cancel``: the caller was cancelled, the node is closing)."""


def outcome_of(error: AllReduceError | None, *, timed_out: bool) -> Outcome:
    """The outcome of a round that ended with ``error`` (None: finished); ``timed_out``: it
    ended at or after its round deadline."""
    if error is None:
        return Outcome.FINISHED
    if timed_out:
        return Outcome.TIMEOUT
    return Outcome.CANCELLED if error.reason is DropReason.CANCELLED else Outcome.FAILED


class Dropped(enum.Enum):
    """Why a message was dropped (the ``reason`` label of ``allreduce_dropped_messages_total``)."""

    ENDED = "ended"
    """For a round that already ended here (and that has nothing to answer)."""
    NOT_RUNNING = "not_running"
    """A tensor chunk for a round not running here."""
    SENDER_FULL = "inbox_sender"
    """Held for a round not started: its sender's messages or bytes are at their bound."""
    ROUND_FULL = "inbox_round"
    """Held for a round not started: that round's messages are at their bound."""
    TOTAL_FULL = "inbox_total"
    """Held for a round not started: it does not fit the inbox's byte bound beside its own
    round's messages."""
    EVICTED = "inbox_evicted"
    """Held, then evicted for a newer round (round ids or total bytes at their bound)."""
    EXPIRED = "inbox_expired"
    """Held longer than the TTL: its round never started here."""


@dataclass(slots=True)
class _Held:
    """What waits for one round id: messages in arrival order, since when, how many bytes."""

    since: float
    messages: collections.deque[tuple[bytes, ControlMessage, int]] = dataclasses.field(
        default_factory=collections.deque)
    nbytes: int = 0


class RoundTable(Generic[R]):
    """One node's rounds, recent round ids, inbox and keys (see module docstring)."""

    def __init__(self, *, limits: InboxLimits | None = None) -> None:
        self.limits = limits or InboxLimits()
        self._running: dict[bytes, R] = {}
        self._recent: collections.OrderedDict[bytes, Epilogue | None] = collections.OrderedDict()
        self._held: dict[bytes, _Held] = {}  # oldest first (``since`` only grows)
        self._missed: dict[bytes, None] = {}  # rounds whose held messages were dropped (newest last)
        self._sender_messages: collections.Counter[bytes] = collections.Counter()
        self._sender_bytes: collections.Counter[bytes] = collections.Counter()
        self._held_bytes = 0
        self._sequence: dict[tuple[bytes, ...], int] = {}
        self._sends: list[Send[Message]] = []
        self._outcomes = dict.fromkeys((o.value for o in Outcome), 0)
        self._dropped = dict.fromkeys((d.value for d in Dropped), 0)
        self._seconds = Histogram(bounds=ROUND_SECONDS_BOUNDS)

    # ---- rounds ----------------------------------------------------------------------

    def key_for(self, group: tuple[bytes, ...], key: bytes | str | None) -> bytes:
        """The caller's key, or the group's call counter: the n-th call on a group is round n."""
        if isinstance(key, str):
            return key.encode()
        if key is not None:
            return key
        n = self._sequence.get(group, 0) + 1
        self._sequence[group] = n
        return b"seq:%d" % n

    def add(self, round_id: bytes, item: R) -> list[tuple[bytes, ControlMessage]]:
        """Register a round this node starts; returns the messages held for it (feed them to
        it in this order). ``ConfigError`` if the id runs or ran here."""
        if round_id in self._running or round_id in self._recent:
            raise ConfigError(f"round {round_id.hex()[:12]} already ran or is running here: "
                              "every round of a group needs its own key")
        self._running[round_id] = item
        held = self._held.pop(round_id, None)
        if held is None:
            return []
        self._release(held)
        return [(src, msg) for src, msg, _ in held.messages]

    def get(self, round_id: bytes) -> R | None:
        return self._running.get(round_id)

    def running(self) -> list[R]:
        return list(self._running.values())

    def has_round(self, round_id: bytes) -> bool:
        return round_id in self._running

    def holds(self, round_id: bytes) -> bool:
        """Messages wait in the inbox for this round (another member has begun it)."""
        return round_id in self._held

    def missed(self, round_id: bytes) -> bool:
        """Messages of this round came and were dropped before it started here (the others went
        on without this node; one of the last ``MISSED_KEPT`` such rounds)."""
        return round_id in self._missed

    def _mark_missed(self, round_id: bytes) -> None:
        self._missed[round_id] = None
        while len(self._missed) > MISSED_KEPT:
            del self._missed[next(iter(self._missed))]

    def end(self, round_id: bytes, *, outcome: Outcome, seconds: float | None = None,
            epilogue: Epilogue | None = None) -> None:
        """The round ended (``seconds`` after it started): forget it, remember its id (and
        what answers late askers), count it."""
        if self._running.pop(round_id, None) is None:
            return
        self._recent[round_id] = epilogue
        while len(self._recent) > self.limits.recent:
            self._recent.popitem(last=False)
        self._outcomes[outcome.value] += 1
        if outcome is Outcome.FINISHED and seconds is not None:
            self._seconds.observe(seconds)

    # ---- inputs ----------------------------------------------------------------------

    def on_control(self, src: bytes, msg: ControlMessage, *, now: float) -> R | None:
        """A control message from ``src``: its round if running here, else None (then it was
        held for a later start, answered for an ended round, or dropped)."""
        item = self._running.get(msg.round_id)
        if item is not None:
            return item
        if msg.round_id in self._recent:
            epilogue = self._recent[msg.round_id]
            late = epilogue.answer(src, msg) if epilogue is not None else None
            if late is None:
                self._drop(Dropped.ENDED)
            else:
                self._sends.append(Send(dest=src, channel=Channel.CONTROL, message=late))
            return None
        self._hold(src, msg, now)
        return None

    def on_tensor(self, msg: ArPart | ArAverage) -> R | None:
        """A tensor chunk's round if running here, else None (dropped)."""
        item = self._running.get(msg.round_id)
        if item is None:
            self._drop(Dropped.ENDED if msg.round_id in self._recent else Dropped.NOT_RUNNING)
        return item

    def handle_timer(self, *, now: float) -> None:
        self._expire(now)

    def next_deadline(self) -> float | None:
        first = next(iter(self._held.values()), None)
        return None if first is None else first.since + self.limits.ttl

    def messages_to_send(self) -> list[Send[Message]]:
        sends, self._sends = self._sends, []
        return sends

    # ---- queries ---------------------------------------------------------------------

    @property
    def pending_rounds(self) -> int:
        """Round ids with messages held for a local start that has not happened yet."""
        return len(self._held)

    @property
    def pending_bytes(self) -> int:
        return self._held_bytes

    def stats(self) -> Stats:
        return {
            "allreduce_rounds_total": dict(self._outcomes),
            "allreduce_round_seconds": self._seconds,
            "allreduce_rounds_active": len(self._running),
            "allreduce_pending_rounds": len(self._held),
            "allreduce_pending_bytes": self._held_bytes,
            "allreduce_dropped_messages_total": dict(self._dropped),
        }

    # ---- the inbox -------------------------------------------------------------------

    def _hold(self, src: bytes, msg: ControlMessage, now: float) -> None:
        self._expire(now)
        lim, rid = self.limits, msg.round_id
        size = len(encode_body(msg))
        if (self._sender_messages[src] >= lim.per_sender
                or self._sender_bytes[src] + size > lim.sender_bytes):
            self._refuse(Dropped.SENDER_FULL, msg)
            return
        held = self._held.get(rid)
        if held is not None and len(held.messages) >= lim.per_round:
            self._refuse(Dropped.ROUND_FULL, msg)
            return
        if size > lim.total_bytes:
            self._refuse(Dropped.TOTAL_FULL, msg)
            return
        while self._held_bytes + size > lim.total_bytes:
            victim = next((r for r in self._held if r != rid), None)
            if victim is None:
                self._refuse(Dropped.TOTAL_FULL, msg)
                return
            self._evict(victim, "the inbox holds too many bytes")
        if held is None:
            if len(self._held) >= lim.rounds:
                self._evict(next(iter(self._held)), f"{lim.rounds} rounds pending")
            held = self._held[rid] = _Held(since=now)
        held.messages.append((src, msg, size))
        held.nbytes += size
        self._held_bytes += size
        self._sender_messages[src] += 1
        self._sender_bytes[src] += size

    def _expire(self, now: float) -> None:
        while self._held:
            rid, held = next(iter(self._held.items()))
            if held.since + self.limits.ttl > now:
                return
            del self._held[rid]
            self._release(held)
            self._mark_missed(rid)
            self._drop(Dropped.EXPIRED, len(held.messages))
            log.info("dropped %d message(s) of round %s: it never started here",
                     len(held.messages), rid.hex()[:12])

    def _evict(self, rid: bytes, why: str) -> None:
        held = self._held.pop(rid)
        self._release(held)
        self._mark_missed(rid)
        self._drop(Dropped.EVICTED, len(held.messages))
        log.warning("forgot %d message(s) of round %s that never started here: %s",
                    len(held.messages), rid.hex()[:12], why)

    def _release(self, held: _Held) -> None:
        self._held_bytes -= held.nbytes
        for src, _msg, size in held.messages:
            self._sender_messages[src] -= 1
            self._sender_bytes[src] -= size
            if not self._sender_messages[src]:
                del self._sender_messages[src], self._sender_bytes[src]

    def _refuse(self, why: Dropped, msg: ControlMessage) -> None:
        self._drop(why)
        log.warning("dropped %s for pending round %s: %s", msg.TAG.name, msg.round_id.hex()[:12], why.value)

    def _drop(self, why: Dropped, count: int = 1) -> None:
        self._dropped[why.value] += count


# ---------------------------------------------------------------------- min_contributors


def required_contributors(min_contributors: int | None, *, group: Sequence[bytes]) -> int:
    """The contributors a caller's result needs: ``min_contributors``, or
    ``DEFAULT_MIN_CONTRIBUTORS`` (2) when None. ``ConfigError`` unless it is an int >= 1;
    ``TooFewContributors`` at once when ``group`` (canonical) is smaller: no round can give
    that many, and a group of one is an error unless the caller passed 1."""
    need = DEFAULT_MIN_CONTRIBUTORS if min_contributors is None else min_contributors
    if type(need) is not int or need < 1:
        raise ConfigError(f"min_contributors must be an int >= 1, got {min_contributors!r:.40}")
    if len(group) < need:
        if len(group) == 1:
            why = ("the group is this node alone, and an average of one tensor is no average: "
                   "wait for the others first (wait_for_members(n, tag=...)), or pass "
                   "min_contributors=1 to average alone on purpose")
        else:
            why = f"the group has {len(group)} members, min_contributors is {need}"
        raise TooFewContributors(why, required=need, contributors=tuple(group))
    return need


def check_contributors(outcome: AllReduceOutcome, *, required: int) -> AllReduceOutcome:
    """``outcome`` if its average covers at least ``required`` members, else
    ``TooFewContributors`` carrying it."""
    got = len(outcome.contributors)
    if got >= required:
        return outcome
    dropped = ", ".join(f"{node.hex()[:12]} {reason.name}" for node, reason in outcome.dropped.items())
    raise TooFewContributors(
        f"round {outcome.round_id.hex()[:12]}: {got} contributor(s), min_contributors is "
        f"{required}" + (f" (dropped: {dropped})" if dropped else ""),
        required=required, contributors=outcome.contributors, outcome=outcome)


# ---------------------------------------------------------------------- lossy codecs


@dataclass(frozen=True, slots=True, eq=False)
class SentAverage:
    """An average chunk this member sent: where it starts, its values, what receivers decode."""

    offset: int
    values: Floats
    decoded: Floats


def same_as_receivers(result: AllReduceResult, sent: Iterable[SentAverage]) -> AllReduceResult:
    """With a lossy codec the receivers of a slice this member averaged get the decoded
    chunks, not the exact average: use those in our result too, so every survivor returns
    the same bits (a chunk counts only if the result still holds the values it encoded)."""
    patches: Sequence[tuple[int, Floats]] = [
        (enc.offset, enc.decoded) for enc in sent
        if np.array_equal(result.average[enc.offset:enc.offset + enc.values.size], enc.values)]
    if not patches:
        return result
    average = result.average if result.average.flags.writeable else result.average.copy()
    for lo, decoded in patches:
        average[lo:lo + decoded.size] = decoded
    return dataclasses.replace(result, average=average)
