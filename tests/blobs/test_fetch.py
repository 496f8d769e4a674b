"""The fetch core on virtual time: spread over holders, a dying holder, a liar, timeouts, resume,
endgame, stall. Holders are simulated here: each answers after its own delay."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import pytest

from node.blobs.fetch import (
    BlobFetch,
    ChunkRequest,
    ChunkVerified,
    FetchDone,
    FetchEvent,
    FetchFailed,
    FetchSettings,
    FetchState,
    HolderBlamed,
    NeedHolders,
    stripe_owner,
)
from node.bundles.manifest import Manifest
from protocol.connection import Channel

CHUNK = 16
BLOB_ID = b"\x07" * 32


def _blob(n: int) -> tuple[bytes, Manifest]:
    data = bytes(random.Random(n).randbytes(n * CHUNK - 3))
    chunks = tuple(hashlib.sha256(data[i:i + CHUNK]).digest() for i in range(0, len(data), CHUNK))
    return data, Manifest(size=len(data), chunk=CHUNK, chunks=chunks)


def _node(i: int) -> bytes:
    return bytes([i]) * 32


class Harness:
    """Runs a fetch against simulated holders on a virtual clock."""

    def __init__(self, fetch: BlobFetch, data: bytes, *, delay: dict[bytes, float],
                 liars: frozenset[bytes] = frozenset(), dead: set[bytes] | None = None) -> None:
        self.fetch, self.data, self.delay, self.liars = fetch, data, delay, liars
        self.dead = dead if dead is not None else set()
        self.now = 0.0
        self.pending: list[tuple[float, bytes, int]] = []
        self.served: Counter[bytes] = Counter()
        self.events: list[FetchEvent] = []
        self.pump()

    def pump(self) -> None:
        for send in self.fetch.messages_to_send():
            assert send.channel is Channel.BULK and isinstance(send.message, ChunkRequest)
            assert send.message.blob_id == BLOB_ID
            if send.dest not in self.dead:
                self.pending.append((self.now + self.delay[send.dest], send.dest, send.message.index))
        while (event := self.fetch.next_event()) is not None:
            self.events.append(event)

    def chunk(self, index: int) -> bytes:
        return self.data[index * CHUNK:(index + 1) * CHUNK]

    def run(self, until: float = 1000.0) -> None:
        while self.fetch.state is FetchState.RUNNING and self.now < until:
            deadline = self.fetch.next_deadline()
            self.pending.sort()
            at = min([p[0] for p in self.pending[:1]] + ([deadline] if deadline is not None else []), default=None)
            if at is None:
                return
            self.now = max(self.now, at)
            if self.pending and self.pending[0][0] <= self.now:
                _, src, index = self.pending.pop(0)
                if src in self.dead:
                    continue
                self.served[src] += 1
                data = self.chunk(index)
                if src in self.liars:
                    data = bytes([data[0] ^ 1]) + data[1:]
                self.fetch.on_chunk(src, index, data, now=self.now)
            else:
                self.fetch.handle_timer(now=self.now)
            self.pump()

    def verified(self) -> dict[int, bytes]:
        return {e.index: e.data for e in self.events if isinstance(e, ChunkVerified)}


def _fetch(manifest: Manifest, holders: list[bytes], *, seed: int = 1, **kw: object) -> BlobFetch:
    settings = FetchSettings(**kw)  # type: ignore[arg-type]
    return BlobFetch(blob_id=BLOB_ID, manifest=manifest, holders=holders, now=0.0,
                     rng=random.Random(seed), settings=settings)


def test_spreads_chunks_over_every_holder_within_the_window() -> None:
    data, manifest = _blob(60)
    holders = [_node(i) for i in range(1, 4)]
    fetch = _fetch(manifest, holders, window=4)
    first = fetch.messages_to_send()
    assert Counter(s.dest for s in first) == {h: 4 for h in holders}
    assert len({s.message.index for s in first}) == 12  # all different chunks
    assert fetch.next_deadline() == 10.0
    fetch = _fetch(manifest, holders, window=4)
    h = Harness(fetch, data, delay={n: 1.0 for n in holders})
    h.run()
    assert h.events[-1] == FetchDone()
    got = h.verified()
    assert b"".join(got[i] for i in range(60)) == data
    assert set(h.served.values()) == {20}  # equal holders share equally
    assert fetch.counters["duplicates"] == 0


def test_a_faster_holder_takes_a_larger_share() -> None:
    data, manifest = _blob(80)
    fast, slow = _node(1), _node(2)
    h = Harness(_fetch(manifest, [fast, slow]), data, delay={fast: 0.1, slow: 1.0})
    h.run()
    assert h.fetch.state is FetchState.DONE
    assert h.served[fast] > 5 * h.served[slow]


def test_two_fetchers_ask_a_seeder_for_different_chunks_first() -> None:
    _, manifest = _blob(64)
    a = _fetch(manifest, [_node(1)], seed=1)
    b = _fetch(manifest, [_node(1)], seed=2)
    assert {s.message.index for s in a.messages_to_send()} != {s.message.index for s in b.messages_to_send()}


def test_a_dying_holder_loses_its_share_and_the_fetch_resumes_from_the_rest() -> None:
    data, manifest = _blob(40)
    a, b = _node(1), _node(2)
    dead: set[bytes] = set()
    h = Harness(_fetch(manifest, [a, b]), data, delay={a: 1.0, b: 1.0}, dead=dead)
    h.run(until=5.0)
    assert 0 < h.fetch.verified_count < 40
    dead.add(b)
    h.fetch.remove_holder(b, now=h.now)
    h.pump()
    assert h.fetch.in_flight(b) == 0 and h.fetch.in_flight(a) == 4
    h.run()
    assert h.fetch.state is FetchState.DONE
    assert h.fetch.counters["timeouts"] == 0
    assert b"".join(h.verified()[i] for i in range(40)) == data


def test_a_silent_holder_times_out_and_is_dropped_after_max_strikes() -> None:
    data, manifest = _blob(30)
    a, b = _node(1), _node(2)
    dead = {b}  # never answers, never reported dead
    h = Harness(_fetch(manifest, [a, b], window=2, request_timeout_s=5.0, max_strikes=3), data,
                delay={a: 1.0, b: 1.0}, dead=dead)
    h.run()
    assert h.fetch.state is FetchState.DONE
    assert b not in h.fetch.holders
    assert h.fetch.counters["timeouts"] == 2 + 1  # its window of 2, then 1 while slow
    assert len(h.verified()) == 30


def test_a_liar_is_blamed_avoided_and_its_chunk_fetched_from_someone_else() -> None:
    data, manifest = _blob(20)
    honest, liar = _node(1), _node(2)
    h = Harness(_fetch(manifest, [honest, liar]), data, delay={honest: 1.0, liar: 0.5},
                liars=frozenset({liar}))
    h.run()
    assert h.fetch.state is FetchState.DONE
    blamed = [e for e in h.events if isinstance(e, HolderBlamed)]
    assert len(blamed) == 1 and blamed[0].holder == liar
    assert h.served[liar] == 4  # its first window, answered before it was blamed; never asked again
    assert liar in h.fetch.avoided
    h.fetch.add_holder(liar, now=h.now)  # the directory names it again: still avoided
    assert liar not in h.fetch.holders
    assert all(e.source == honest for e in h.events if isinstance(e, ChunkVerified))
    assert b"".join(h.verified()[i] for i in range(20)) == data


def test_a_wrong_length_chunk_is_a_lie_too() -> None:
    _, manifest = _blob(3)
    fetch = _fetch(manifest, [_node(1)])
    fetch.messages_to_send()
    fetch.on_chunk(_node(1), 2, b"x" * CHUNK, now=1.0)  # the last chunk is shorter
    assert fetch.next_event() == HolderBlamed(_node(1), 2)
    assert fetch.next_event() == NeedHolders()


def test_resume_fetches_only_what_is_missing() -> None:
    data, manifest = _blob(10)
    fetch = BlobFetch(blob_id=BLOB_ID, manifest=manifest, holders=[_node(1)], have=range(0, 8), now=0.0,
                      rng=random.Random(3), settings=FetchSettings(window=8))
    assert sorted(s.message.index for s in fetch.messages_to_send()) == [8, 9]
    fetch.on_chunk(_node(1), 8, data[8 * CHUNK:9 * CHUNK], now=1.0)
    fetch.on_chunk(_node(1), 9, data[9 * CHUNK:], now=1.0)
    assert fetch.next_event() == ChunkVerified(8, data[8 * CHUNK:9 * CHUNK], _node(1))
    assert isinstance(fetch.next_event(), ChunkVerified)
    assert fetch.next_event() == FetchDone()
    assert fetch.next_deadline() is None
    assert fetch.messages_to_send() == []


def test_nothing_to_fetch_is_done_at_once() -> None:
    _, manifest = _blob(2)
    fetch = BlobFetch(blob_id=BLOB_ID, manifest=manifest, have=[0, 1], now=0.0, rng=random.Random(0))
    assert fetch.state is FetchState.DONE and fetch.next_event() == FetchDone()


def test_endgame_duplicates_the_last_requests_to_idle_holders() -> None:
    data, manifest = _blob(6)
    fast, slow = _node(1), _node(2)
    fetch = _fetch(manifest, [fast, slow], window=2, endgame_chunks=4, endgame_copies=2)
    h = Harness(fetch, data, delay={fast: 1.0, slow: 100.0})
    h.run()
    assert fetch.state is FetchState.DONE
    assert h.now < 20.0  # the slow holder's two chunks came from the fast one
    assert fetch.counters["endgame_requests"] == 2
    assert b"".join(h.verified()[i] for i in range(6)) == data


def test_no_endgame_before_the_last_chunks() -> None:
    _, manifest = _blob(20)
    fetch = _fetch(manifest, [_node(1), _node(2)], window=2, endgame_chunks=2)
    sends = fetch.messages_to_send()
    assert len(sends) == 4 and fetch.counters["endgame_requests"] == 0


def test_partial_holders_are_asked_only_for_what_they_have_and_missing_moves_on() -> None:
    _, manifest = _blob(8)
    part, full = _node(1), _node(2)
    fetch = _fetch(manifest, [], window=8)
    fetch.add_holder(part, now=0.0, have=[0, 1, 2])
    assert sorted(s.message.index for s in fetch.messages_to_send()) == [0, 1, 2]
    fetch.on_missing(part, 1, now=0.5)  # it was evicted there
    fetch.add_holder(full, now=1.0)
    assert sorted(s.message.index for s in fetch.messages_to_send()) == [1, 3, 4, 5, 6, 7]


def test_busy_keeps_the_holder_and_retries_elsewhere() -> None:
    _, manifest = _blob(2)
    a = _node(1)
    fetch = _fetch(manifest, [a], window=1)
    (send,) = fetch.messages_to_send()
    fetch.on_missing(a, send.message.index, now=0.1, busy=True)
    (again,) = fetch.messages_to_send()
    assert again.dest == a and again.message.index == send.message.index


def test_stall_asks_for_holders_then_fails() -> None:
    _, manifest = _blob(4)
    fetch = _fetch(manifest, [], stall_timeout_s=30.0)
    assert fetch.next_event() == NeedHolders()
    assert fetch.next_deadline() == 30.0
    fetch.handle_timer(now=29.0)
    assert fetch.state is FetchState.RUNNING
    fetch.handle_timer(now=30.0)
    assert fetch.state is FetchState.FAILED
    event = fetch.next_event()
    assert isinstance(event, FetchFailed) and "4 chunks" in event.reason
    assert fetch.next_deadline() is None


def test_a_holder_arriving_during_a_stall_rescues_it() -> None:
    data, manifest = _blob(4)
    fetch = _fetch(manifest, [], stall_timeout_s=30.0)
    h = Harness(fetch, data, delay={_node(5): 1.0})
    fetch.add_holder(_node(5), now=10.0)
    h.now = 10.0
    h.pump()
    h.run()
    assert fetch.state is FetchState.DONE
    assert [type(e) for e in h.events].count(NeedHolders) == 1


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        FetchSettings(window=0)
    with pytest.raises(ValueError):
        FetchSettings(request_timeout_s=0)


def test_a_seeder_is_asked_first_for_what_no_partial_holder_has() -> None:
    data, manifest = _blob(16)
    seeder, peer = _node(1), _node(2)
    fetch = _fetch(manifest, [], window=4)
    h = Harness(fetch, data, delay={seeder: 1.0, peer: 1.0})
    fetch.add_holder(peer, now=0.0, have=range(8))
    fetch.add_holder(seeder, now=0.0)
    h.pump()
    asked: dict[bytes, set[int]] = {seeder: set(), peer: set()}
    for _, dest, index in h.pending:
        asked[dest].add(index)
    assert len(asked[peer]) == 4 and asked[peer] <= set(range(8))
    assert len(asked[seeder]) == 4 and not asked[seeder] & set(range(8))  # the peer can give those
    h.run()
    assert h.events[-1] == FetchDone() and h.served[seeder] == 8  # the seeder sent only what the peer lacks


def test_fetchers_that_know_each_other_ask_a_seeder_for_disjoint_stripes() -> None:
    _, manifest = _blob(64)
    seeder, a, b = _node(1), _node(2), _node(3)
    asked: dict[bytes, set[int]] = {}
    for me, other, seed in ((a, b, 1), (b, a, 2)):
        fetch = BlobFetch(blob_id=BLOB_ID, manifest=manifest, now=0.0, rng=random.Random(seed),
                          settings=FetchSettings(window=8), me=me)
        fetch.add_holder(other, now=0.0, have=())  # it has nothing yet
        fetch.add_holder(seeder, now=0.0)
        asked[me] = {s.message.index for s in fetch.messages_to_send() if s.dest == seeder}
        assert len(asked[me]) == 8 and all(stripe_owner(i, [a, b]) == me for i in asked[me])
    assert not asked[a] & asked[b]
    assert stripe_owner(5, [a, b]) == stripe_owner(5, [b, a]) and stripe_owner(5, []) is None
