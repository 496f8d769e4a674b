"""One ``AllReduceRound`` fed message by message: exact outputs, timers and events.

Member indices follow ``node_ids(n)`` (ascending); ``me`` is the core under test and the
other members are played by hand-built messages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from node.allreduce import (
    AllReduceConfig,
    AllReduceRound,
    DropReason,
    OutgoingChunk,
    PeerDropped,
    RoundFailed,
    RoundFinished,
    RoundState,
    TensorKind,
)
from node.allreduce.layout import layout_digest, slice_sizes
from node.allreduce.testing import node_ids
from node.core import Send
from protocol.connection import Channel
from protocol.errors import ConfigError, LocalProtocolError
from protocol.messages.tensor import (
    ArAverage,
    ArBegin,
    ArCancel,
    ArCommit,
    ArFinish,
    ArPart,
    ArReport,
    ArTakeover,
    Exclusion,
    Holding,
)
from protocol.schema import Message
from protocol.tensor import CodecSpec, encode_chunk

CFG = AllReduceConfig.test().replace(chunk_elements=4, window_bytes=32)
IDS = node_ids(3)
NUMEL = 24  # 3 slices of 8 = 2 chunks of 4 each


def core(me: int = 1, *, n: int = 3, numel: int = NUMEL, cfg: AllReduceConfig = CFG,
         values: np.ndarray | None = None) -> AllReduceRound:
    tensor = np.arange(numel, dtype=np.float32) + 100 * me if values is None else values
    return AllReduceRound(node_id=IDS[me] if n == 3 else node_ids(n)[me], group=node_ids(n), key=b"k",
                          tensor=tensor, now=0.0, config=cfg)


def begin(r: AllReduceRound) -> ArBegin:
    return ArBegin(round_id=r.round_id, numel=NUMEL, layout=layout_digest(NUMEL, (8, 8, 8), 4, "none"))


def part(r: AllReduceRound, s: int, chunk: int, values: np.ndarray) -> tuple[ArPart, np.ndarray]:
    return ArPart(round_id=r.round_id, slice=s, chunk=chunk, data=encode_chunk(values, CodecSpec())), values


@dataclass(frozen=True)
class Chunk:
    """A BULK output flattened for asserts: its ``Send.dest`` and its ``OutgoingChunk``."""

    dest: bytes
    out: OutgoingChunk

    @property
    def kind(self) -> TensorKind:
        return self.out.kind

    @property
    def slice(self) -> int:
        return self.out.slice

    @property
    def chunk(self) -> int:
        return self.out.chunk

    @property
    def offset(self) -> int:
        return self.out.offset

    @property
    def values(self) -> np.ndarray:
        return self.out.values

    @property
    def nbytes(self) -> int:
        return self.out.nbytes


def drain(r: AllReduceRound) -> tuple[list[Send[Message]], list[Chunk], list[object]]:
    sends = r.messages_to_send()
    events = []
    while (ev := r.next_event()) is not None:
        events.append(ev)
    control: list[Send[Message]] = []
    chunks: list[Chunk] = []
    for s in sends:
        if isinstance(s.message, OutgoingChunk):
            assert s.channel is Channel.BULK
            chunks.append(Chunk(s.dest, s.message))
        else:
            assert s.channel is Channel.CONTROL
            control.append(Send(dest=s.dest, channel=s.channel, message=s.message))
    return control, chunks, events


def test_start_announces_itself_and_arms_the_join_deadline() -> None:
    r = core(1)
    msgs, tensors, events = drain(r)
    assert [(m.dest, type(m.message)) for m in msgs] == [(IDS[2], ArBegin), (IDS[0], ArBegin)]
    assert msgs[0].message == begin(r) and tensors == [] and events == []
    assert r.state is RoundState.REDUCE_SCATTER and r.leader == IDS[0]
    assert r.next_deadline() == CFG.join_timeout


def test_parts_wait_for_the_owner_and_respect_the_window() -> None:
    cfg = CFG.replace(window_bytes=16)  # one chunk of 4 floats in flight
    r = core(1, cfg=cfg)
    drain(r)
    r.on_message(IDS[2], begin(r), now=0.1)
    _, tensors, _ = drain(r)
    assert [(t.dest, t.kind, t.slice, t.chunk, t.offset, t.values.tolist()) for t in tensors] == [
        (IDS[2], TensorKind.PART, 2, 0, 16, [116.0, 117.0, 118.0, 119.0])]
    assert drain(r)[1] == []  # the window is full until the adapter says it was written
    r.on_sent(IDS[2], 16, now=0.2)
    _, tensors, _ = drain(r)
    assert [(t.chunk, t.offset) for t in tensors] == [(1, 20)]
    msg = tensors[0].out.to_message(encode_chunk(tensors[0].values, CodecSpec()))
    assert isinstance(msg, ArPart) and (msg.slice, msg.chunk) == (2, 1)


def test_mismatched_layout_and_malformed_chunks_drop_the_sender() -> None:
    r = core(1)
    drain(r)
    r.on_message(IDS[2], ArBegin(round_id=r.round_id, numel=NUMEL + 1, layout=b"x" * 16), now=0.1)
    r.on_tensor(IDS[0], *part(r, 1, 2, np.zeros(4, np.float32)), now=0.1)  # slice 1 has chunks 0, 1
    msgs, tensors, events = drain(r)
    assert tensors == []
    assert [(e.node, e.reason) for e in events if isinstance(e, PeerDropped)] == [
        (IDS[2], DropReason.MISMATCH), (IDS[0], DropReason.PROTOCOL_ERROR)]
    # Both others failed on evidence: this member leads, commits S = {1} and finishes alone.
    assert [type(m.message) for m in msgs] == [ArTakeover, ArTakeover, ArCommit, ArCommit, ArFinish, ArFinish]
    assert isinstance(events[-1], RoundFinished) and events[-1].result.contributors == (IDS[1],)
    assert events[-1].result.dropped == {IDS[0]: DropReason.PROTOCOL_ERROR, IDS[2]: DropReason.MISMATCH}
    assert np.array_equal(events[-1].result.average, np.arange(NUMEL, dtype=np.float32) + 100)
    with pytest.raises(LocalProtocolError):
        r.on_message(IDS[0], part(r, 1, 0, np.zeros(4, np.float32))[0], now=0.2)


def test_owner_reports_once_its_slice_is_complete_and_non_finite_is_excluded() -> None:
    r = core(0)  # the leader: its own report goes to itself, so watch the commit instead
    drain(r)
    for m in (1, 2):
        r.on_message(IDS[m], begin(r), now=0.1)
    for t in drain(r)[1]:  # our parts of slices 1 and 2 fill both windows until written
        r.on_sent(t.dest, t.nbytes, now=0.1)
    r.on_tensor(IDS[1], *part(r, 0, 0, np.ones(4, np.float32)), now=0.2)
    r.on_tensor(IDS[1], *part(r, 0, 1, np.ones(4, np.float32)), now=0.2)
    bad = np.array([1, np.nan, 1, 1], np.float32)
    r.on_tensor(IDS[2], *part(r, 0, 0, bad), now=0.3)
    assert drain(r)[0] == []  # still waiting for the other owners' reports
    for m in (1, 2):
        hold = (Holding(slice=m, senders=(0, 1, 2), sq_norms=(1.0, 1.0, 1.0)),)
        r.on_message(IDS[m], ArReport(round_id=r.round_id, epoch=0, leader=0, holdings=hold, averages=(),
                                      exclusions=()), now=0.4)
    msgs, tensors, _ = drain(r)
    commits = [m.message for m in msgs if isinstance(m.message, ArCommit)]
    assert len(commits) == 2 and commits[0] == commits[1]
    c = commits[0]
    assert (c.contributors, c.receivers, c.dropped) == ((0, 1), (0, 1, 2), (Exclusion(member=2, reason=DropReason.NON_FINITE),))
    # the owner averages slice 0 over S = {0, 1} and streams it to both receivers
    assert {(t.dest, t.kind, t.slice) for t in tensors} == {(IDS[1], TensorKind.AVERAGE, 0), (IDS[2], TensorKind.AVERAGE, 0)}
    first = next(t for t in tensors if t.chunk == 0)
    assert first.values.tolist() == [0.5, 1.0, 1.5, 2.0]  # (arange + 1) / 2
    assert r.state is RoundState.ALL_GATHER and r.epoch == 1


def _committed(me: int = 1) -> tuple[AllReduceRound, ArCommit]:
    r = core(me)
    drain(r)
    c = ArCommit(round_id=r.round_id, epoch=1, leader=0, contributors=(0, 1, 2), contributors_since=1,
                 receivers=(0, 1, 2), owners=(0, 1, 2), resend=(), dropped=())
    r.on_message(IDS[0], c, now=1.0)
    return r, c


def test_finish_returns_the_gathered_average_only_on_the_leaders_word() -> None:
    r, _ = _committed(2)
    avg = np.arange(NUMEL, dtype=np.float32) / 7
    r.on_message(IDS[2 - 1], begin(r), now=1.0)  # a late Begin after the commit changes nothing
    for s in (0, 1):
        for chunk in (0, 1):
            lo = 8 * s + 4 * chunk
            msg = ArAverage(round_id=r.round_id, epoch=1, slice=s, chunk=chunk,
                            data=encode_chunk(avg[lo:lo + 4], CodecSpec()))
            r.on_tensor(IDS[s], msg, avg[lo:lo + 4], now=1.1)
    msgs, _, events = drain(r)
    assert events == [] and r.result is None
    assert [type(m.message) for m in msgs] == []  # its own slice 2 is still missing contributions
    r.on_message(IDS[0], ArFinish(round_id=r.round_id, epoch=1, leader=0), now=1.5)
    _, _, events = drain(r)
    assert len(events) == 1 and isinstance(events[0], RoundFailed)  # it is not done: dropped
    assert events[0].error.reason is DropReason.STALLED and r.next_deadline() is None


def test_stale_commit_is_answered_with_the_current_one() -> None:
    r, c = _committed(1)
    drain(r)
    old = ArCommit(round_id=r.round_id, epoch=1, leader=0, contributors=(0, 1), contributors_since=1,
                   receivers=(0, 1), owners=(0, 1, 0), resend=(), dropped=())
    r.on_message(IDS[2], old, now=1.2)  # same epoch, lower-or-equal ballot: ignored
    newer = ArCommit(round_id=r.round_id, epoch=2, leader=1, contributors=(1, 2), contributors_since=2,
                     receivers=(1, 2), owners=(1, 1, 2), resend=(), dropped=())
    r.on_message(IDS[2], newer, now=1.3)
    r.on_message(IDS[0], c, now=1.4)
    msgs, _, events = drain(r)
    assert [(m.dest, m.message) for m in msgs if isinstance(m.message, ArCommit)] == [(IDS[0], newer)]
    assert r.epoch == 2 and r.leader == IDS[1]
    assert [(e.node, e.reason) for e in events if isinstance(e, PeerDropped)] == [(IDS[0], DropReason.STALLED)]


def test_takeover_and_cancel() -> None:
    r = core(2)
    drain(r)
    r.on_message(IDS[1], ArTakeover(round_id=r.round_id, epoch=0, leader=1), now=0.5)
    assert r.leader == IDS[1]
    r.cancel(now=0.6)
    msgs, _, events = drain(r)
    assert [(m.dest, type(m.message)) for m in msgs] == [(IDS[0], ArCancel), (IDS[1], ArCancel)]
    assert isinstance(events[-1], RoundFailed) and events[-1].error.reason is DropReason.CANCELLED
    r.cancel(now=0.7)
    assert r.messages_to_send() == [] and r.next_event() is None


def test_every_wait_has_a_deadline_and_the_round_one_bounds_them() -> None:
    r = core(1)
    drain(r)
    now, seen = 0.0, []
    while (at := r.next_deadline()) is not None:
        assert at > now
        now = at
        r.handle_timer(now=now)
        seen.extend(type(e).__name__ for e in drain(r)[2])
    assert r.state is RoundState.FAILED and now <= CFG.round_timeout
    assert "isolated" in str(r.error) and seen.count("PeerDropped") == 2


def test_group_of_one_and_bad_arguments() -> None:
    ids = node_ids(1)
    t = np.ones(5, np.float32)
    r = AllReduceRound(node_id=ids[0], group=ids, key=b"k", tensor=t, now=0.0)
    assert isinstance(r.next_event(), RoundFinished) and r.result is not None
    assert np.array_equal(r.result.average, t) and r.result.average is not t and r.next_deadline() is None
    for bad in (np.ones(5, np.float64), np.ones((2, 2), np.float32), np.ones(0, np.float32), np.ones(10, np.float32)[::2]):
        with pytest.raises(ConfigError):
            AllReduceRound(node_id=IDS[0], group=IDS, key=b"k", tensor=bad, now=0.0)
    with pytest.raises(ConfigError):
        AllReduceRound(node_id=b"x" * 32, group=IDS, key=b"k", tensor=t, now=0.0)
    assert slice_sizes(NUMEL, [1, 1, 1]) == (8, 8, 8)


def test_finished_member_answers_late_askers_once() -> None:
    r, c = _committed(1)
    avg = np.arange(NUMEL, dtype=np.float32)
    for s, chunk in [(0, 0), (0, 1), (2, 0), (2, 1)]:
        lo = 8 * s + 4 * chunk
        msg = ArAverage(round_id=r.round_id, epoch=1, slice=s, chunk=chunk,
                        data=encode_chunk(avg[lo:lo + 4], CodecSpec()))
        r.on_tensor(IDS[s], msg, avg[lo:lo + 4], now=1.1)
    r.on_tensor(IDS[2], *part(r, 1, 0, np.ones(4, np.float32)), now=1.1)
    r.on_tensor(IDS[0], *part(r, 1, 0, np.ones(4, np.float32)), now=1.1)
    r.on_tensor(IDS[2], *part(r, 1, 1, np.ones(4, np.float32)), now=1.1)
    r.on_tensor(IDS[0], *part(r, 1, 1, np.ones(4, np.float32)), now=1.1)
    msgs, tensors, _ = drain(r)  # its own slice's average goes out, computed chunk by chunk
    assert sorted((t.dest, t.slice, t.chunk) for t in tensors) == sorted(
        (IDS[d], 1, k) for d in (0, 2) for k in (0, 1))
    assert [(m.dest, type(m.message)) for m in msgs] == [(IDS[0], ArReport)]  # then it is done
    r.on_message(IDS[0], ArFinish(round_id=r.round_id, epoch=1, leader=0), now=1.3)
    assert r.state is RoundState.FINISHED and r.result is not None and r.next_deadline() is None
    expected = avg.copy()
    expected[8:16] = np.float32((np.float64(1) + np.arange(8, 16) + 100 + 1) / 3)
    assert np.array_equal(r.result.average, expected)
    late = ArReport(round_id=r.round_id, epoch=1, leader=2, holdings=(), averages=(), exclusions=())
    r.on_message(IDS[2], late, now=2.0)
    r.on_message(IDS[2], late, now=2.1)
    assert [(m.dest, m.message) for m in drain(r)[0]] == [
        (IDS[2], ArFinish(round_id=r.round_id, epoch=1, leader=0))]
    msg = part(r, 0, 0, np.ones(4, np.float32))[0]
    with pytest.raises(LocalProtocolError):  # the adapter must hand over decoded float32 values
        r.on_tensor(IDS[0], msg, np.ones(4), now=2.2)
    assert c.epoch == 1
