"""``RoundTable`` on explicit virtual time: the bounded inbox (messages and bytes, per sender,
per round and in total; TTL purge by ``handle_timer``), recent rounds and their epilogues,
default keys, and ``stats()``."""

from __future__ import annotations

import numpy as np
import pytest

from node.allreduce import (
    AllReduceConfig,
    AllReduceError,
    AllReduceRound,
    DropReason,
    InboxLimits,
    Outcome,
)
from node.allreduce.events import AllReduceResult
from node.allreduce.round import Epilogue
from node.allreduce.rounds import (
    ROUND_SECONDS_BOUNDS,
    RoundTable,
    SentAverage,
    outcome_of,
    same_as_receivers,
)
from node.allreduce.testing import node_ids
from node.core import Histogram, Send
from protocol.connection import Channel
from protocol.errors import ConfigError
from protocol.messages.tensor import ArBegin, ArCancel, ArFinish, ArPart, ArReport
from protocol.schema import encode_body
from protocol.tensor import CodecSpec, encode_chunk

A, B, C = node_ids(3)


def rid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def begin(i: int) -> ArBegin:
    return ArBegin(round_id=rid(i), numel=10, layout=b"L" * 16)


SIZE = len(encode_body(begin(0)))  # every ``begin(i)`` encodes to the same size


def dropped(t: RoundTable[object]) -> dict[str, float]:
    return {k: v for k, v in t.stats()["allreduce_dropped_messages_total"].items() if v}  # type: ignore[union-attr]


def test_held_messages_wait_for_the_start_and_come_back_in_order() -> None:
    t: RoundTable[str] = RoundTable()
    assert t.on_control(A, begin(1), now=0.0) is None
    assert t.on_control(B, ArCancel(round_id=rid(1)), now=0.5) is None
    assert (t.pending_rounds, t.pending_bytes) == (1, SIZE + len(encode_body(ArCancel(round_id=rid(1)))))
    assert t.add(rid(1), "round 1") == [(A, begin(1)), (B, ArCancel(round_id=rid(1)))]
    assert (t.pending_rounds, t.pending_bytes, t.next_deadline()) == (0, 0, None)
    assert t.on_control(A, begin(1), now=1.0) == "round 1" and t.get(rid(1)) == "round 1"
    assert t.messages_to_send() == [] and dropped(t) == {}


def test_round_count_cap_evicts_the_oldest_round() -> None:
    t: RoundTable[str] = RoundTable(limits=InboxLimits(rounds=2))
    for i in range(3):
        t.on_control(A, begin(i), now=float(i))
    assert t.pending_rounds == 2 and t.pending_bytes == 2 * SIZE
    assert t.add(rid(0), "r0") == []  # evicted
    assert t.add(rid(2), "r2") == [(A, begin(2))]
    assert dropped(t) == {"inbox_evicted": 1}


def test_per_round_count_cap_drops_the_newest() -> None:
    t: RoundTable[str] = RoundTable(limits=InboxLimits(per_round=2))
    for src in (A, B, C):
        t.on_control(src, begin(1), now=0.0)
    assert [src for src, _ in t.add(rid(1), "r")] == [A, B]
    assert dropped(t) == {"inbox_round": 1}


def test_per_sender_bytes_and_count_caps() -> None:
    t: RoundTable[str] = RoundTable(limits=InboxLimits(sender_bytes=2 * SIZE))
    for i in range(3):
        t.on_control(A, begin(i), now=0.0)
    t.on_control(B, begin(2), now=0.0)  # another sender has its own budget
    assert t.pending_rounds == 3 and t.pending_bytes == 3 * SIZE
    assert dropped(t) == {"inbox_sender": 1}
    t.add(rid(0), "r0")  # starting a round frees its sender's budget
    t.on_control(A, begin(3), now=0.0)
    assert t.pending_bytes == 3 * SIZE and dropped(t) == {"inbox_sender": 1}

    t = RoundTable(limits=InboxLimits(per_sender=2))
    for i in range(3):
        t.on_control(A, begin(i), now=0.0)
    assert t.pending_rounds == 2 and dropped(t) == {"inbox_sender": 1}


def test_total_bytes_cap_evicts_the_oldest_rounds_then_refuses() -> None:
    t: RoundTable[str] = RoundTable(limits=InboxLimits(total_bytes=3 * SIZE))
    for i, src in enumerate((A, B, C)):
        t.on_control(src, begin(i), now=float(i))
    assert t.pending_bytes == 3 * SIZE
    t.on_control(A, begin(3), now=3.0)  # a fourth round: the oldest (round 0) makes room
    assert t.pending_bytes == 3 * SIZE and t.add(rid(0), "r0") == []
    assert dropped(t) == {"inbox_evicted": 1}
    t = RoundTable(limits=InboxLimits(total_bytes=2 * SIZE))
    t.on_control(A, begin(7), now=0.0)
    t.on_control(B, begin(7), now=0.0)
    t.on_control(C, begin(7), now=0.0)  # its own round fills the inbox: nothing to evict
    assert t.pending_bytes == 2 * SIZE and dropped(t) == {"inbox_total": 1}


def test_ttl_purge_runs_on_the_timer_with_explicit_now() -> None:
    ttl = 60.0
    t: RoundTable[str] = RoundTable(limits=InboxLimits(ttl=ttl))
    assert t.next_deadline() is None
    t.on_control(A, begin(1), now=10.0)
    t.on_control(B, begin(1), now=30.0)  # the round's TTL runs from its first held message
    t.on_control(A, begin(2), now=20.0)
    assert t.next_deadline() == 10.0 + ttl
    t.handle_timer(now=10.0 + ttl - 0.001)
    assert t.pending_rounds == 2 and dropped(t) == {}
    t.handle_timer(now=10.0 + ttl)
    assert t.pending_rounds == 1 and t.pending_bytes == SIZE and t.next_deadline() == 20.0 + ttl
    assert dropped(t) == {"inbox_expired": 2}
    t.handle_timer(now=1000.0)
    assert (t.pending_rounds, t.pending_bytes, t.next_deadline()) == (0, 0, None)
    assert dropped(t) == {"inbox_expired": 3}
    assert t.add(rid(1), "r1") == []


def test_recent_rounds_are_unique_and_late_askers_get_the_finish_once() -> None:
    t: RoundTable[str] = RoundTable(limits=InboxLimits(recent=2))
    t.add(rid(1), "r1")
    finish = ArFinish(round_id=rid(1), epoch=1, leader=0)
    t.end(rid(1), outcome=Outcome.FINISHED, seconds=0.3, epilogue=Epilogue(finish, (A, B, C), A))
    with pytest.raises(ConfigError):
        t.add(rid(1), "again")
    report = ArReport(round_id=rid(1), epoch=1, leader=0, holdings=(), averages=(), exclusions=())
    assert t.on_control(B, report, now=1.0) is None
    assert t.on_control(B, report, now=1.1) is None  # once per member
    assert t.on_control(A, report, now=1.1) is None  # ourselves: never
    assert t.on_control(C, begin(1), now=1.2) is None  # not a question
    assert t.messages_to_send() == [Send(dest=B, channel=Channel.CONTROL, message=finish)]
    assert t.messages_to_send() == []
    chunk = ArPart(round_id=rid(1), slice=0, chunk=0, data=encode_chunk(np.ones(2, np.float32), CodecSpec()))
    assert t.on_tensor(chunk) is None
    assert t.on_tensor(ArPart(round_id=rid(9), slice=0, chunk=0, data=chunk.data)) is None
    assert dropped(t) == {"ended": 4, "not_running": 1}
    for i in (2, 3):  # only the last ``recent`` ids are remembered
        t.add(rid(i), "r")
        t.end(rid(i), outcome=Outcome.FAILED)
    t.add(rid(1), "r1 again")


def test_default_keys_count_calls_per_group() -> None:
    t: RoundTable[str] = RoundTable()
    assert [t.key_for((A, B), None) for _ in range(2)] == [b"seq:1", b"seq:2"]
    assert t.key_for((A, C), None) == b"seq:1"
    assert t.key_for((A, B), "step-7") == b"step-7" and t.key_for((A, B), b"k") == b"k"
    assert t.key_for((A, B), None) == b"seq:3"


def test_stats_count_outcomes_durations_and_what_is_held() -> None:
    t: RoundTable[str] = RoundTable()
    stats = t.stats()
    assert set(stats) == {"allreduce_rounds_total", "allreduce_round_seconds", "allreduce_rounds_active",
                          "allreduce_pending_rounds", "allreduce_pending_bytes",
                          "allreduce_dropped_messages_total"}
    assert stats["allreduce_rounds_total"] == {"finished": 0, "failed": 0, "timeout": 0, "cancelled": 0}
    hist = stats["allreduce_round_seconds"]
    assert isinstance(hist, Histogram) and tuple(hist.bounds) == ROUND_SECONDS_BOUNDS
    for i, outcome in enumerate([Outcome.FINISHED, Outcome.FINISHED, Outcome.TIMEOUT, Outcome.CANCELLED]):
        t.add(rid(i), "r")
        t.end(rid(i), outcome=outcome, seconds=0.07 * (i + 1))
    t.add(rid(9), "running")
    t.on_control(A, begin(8), now=0.0)
    t.end(rid(42), outcome=Outcome.FAILED)  # not running here: ignored
    stats = t.stats()
    assert stats["allreduce_rounds_total"] == {"finished": 2, "failed": 0, "timeout": 1, "cancelled": 1}
    assert hist.count == 2 and hist.total == pytest.approx(0.21)
    assert hist.cumulative()[:4] == [("0.01", 0), ("0.05", 0), ("0.1", 1), ("0.5", 2)]
    assert (stats["allreduce_rounds_active"], stats["allreduce_pending_rounds"],
            stats["allreduce_pending_bytes"]) == (1, 1, SIZE)


def test_outcome_of() -> None:
    assert outcome_of(None, timed_out=True) is Outcome.FINISHED
    assert outcome_of(AllReduceError("x"), timed_out=True) is Outcome.TIMEOUT
    assert outcome_of(AllReduceError("x", reason=DropReason.CANCELLED), timed_out=False) is Outcome.CANCELLED
    assert outcome_of(AllReduceError("x", reason=DropReason.STALLED), timed_out=False) is Outcome.FAILED


def test_same_as_receivers_patches_only_what_still_holds() -> None:
    average = np.arange(8, dtype=np.float32)
    average.flags.writeable = False
    result = AllReduceResult(round_id=rid(1), average=average, contributors=(A,), dropped={}, epoch=1,
                             contributed=True)
    decoded = np.full(4, 9.0, np.float32)
    stale = SentAverage(4, np.zeros(4, np.float32), decoded)  # an older epoch's values: not ours now
    assert same_as_receivers(result, [stale]) is result
    patched = same_as_receivers(result, [stale, SentAverage(0, average[:4].copy(), decoded)])
    assert patched.average.tolist() == [9.0] * 4 + [4.0, 5.0, 6.0, 7.0]
    assert average.tolist() == list(range(8))  # a read-only average is copied, not written


def test_a_round_answers_late_askers_through_its_epilogue() -> None:
    ids = node_ids(1)
    r = AllReduceRound(node_id=ids[0], group=ids, key=b"k", tensor=np.ones(3, np.float32), now=0.0,
                       config=AllReduceConfig.test())
    assert r.epilogue is None  # a group of one never committed: nothing to answer
