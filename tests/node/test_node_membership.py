"""``node.membership.Membership`` on a fake event loop (explicit time, no sockets, no sleeps):
what it persists after absurd claims, the live peers kept from events and written on a timer,
a leave that never raises, and the join state (issue 10, defects 2 and 8; leave; join timeout)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from discovery.config import SwimConfig
from discovery.swim import Swim
from discovery.testing import node_id_for
from node.membership import (
    MAX_START_INCARNATION,
    JoinState,
    Membership,
    WriteBehind,
    start_incarnation,
)
from node.status import build_status_reply
from protocol.errors import ErrorCode, RemoteProtocolError, StarmeshError, TransportError
from protocol.messages.gossip import (
    Alive,
    Dead,
    MemberState,
    MemberStatus,
    NodeMeta,
    PushPull,
    Suspect,
)
from protocol.schema import Message, decode_body, encode_body

#: The test preset without probes in the first ~1,300 s (nothing answers them here).
CFG = dataclasses.replace(SwimConfig.test(), probe_interval=10_000.0)
ME = "me:1"
ME_ID = node_id_for(ME)
WIRE_MAX = 2**64 - 1


class FakeHandle:
    def __init__(self, at: float, callback: Callable[[], None]) -> None:
        self.at, self.callback, self.cancelled = at, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """A clock and ``call_at``; ``run_until(t)`` fires due handles in time order."""

    def __init__(self) -> None:
        self.now = 0.0
        self.handles: list[FakeHandle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, at: float, callback: Callable[[], None]) -> FakeHandle:
        handle = FakeHandle(at, callback)
        self.handles.append(handle)
        return handle

    def run_until(self, t: float) -> None:
        while True:
            due = [h for h in self.handles if not h.cancelled and h.at <= t]
            if not due:
                break
            handle = min(due, key=lambda h: h.at)
            handle.cancelled = True
            self.now = max(self.now, handle.at)
            handle.callback()
        self.handles = [h for h in self.handles if not h.cancelled]
        self.now = max(self.now, t)


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send_many_nowait(self, messages: list[Message]) -> bool:
        for m in messages:
            decode_body(encode_body(m))  # every message we write must cross the wire
        self.sent.extend(messages)
        return True


class FakePool:
    """Every address has an open link, unless it is in ``dial_errors`` (then a dial fails)."""

    def __init__(self) -> None:
        self.link = FakeLink()
        self.dial_errors: dict[str, StarmeshError] = {}
        self.closed: list[str] = []
        self.buffers_empty: Callable[[], bool] = lambda: True

    def get_open(self, address: str, channel: object) -> FakeLink | None:
        return None if address in self.dial_errors else self.link

    async def connect(self, address: str, channel: object) -> FakeLink:
        error = self.dial_errors.get(address)
        if error is not None:
            raise error
        return self.link

    def close_address(self, address: str) -> None:
        self.closed.append(address)

    def write_buffers_empty(self) -> bool:
        return self.buffers_empty()


class Harness:
    def __init__(self, *, incarnation: int = 0, config: SwimConfig = CFG,
                 peers_interval: float = 5.0) -> None:
        self.loop = FakeLoop()
        self.pool = FakePool()
        self.incarnations: list[int] = []
        self.peers: list[list[str]] = []
        self.tasks: list[Coroutine[Any, Any, None]] = []
        self.swim = Swim(node_id=ME_ID, address=ME, meta=NodeMeta(hostname="me"), config=config,
                         rng=random.Random(1), now=0.0, incarnation=incarnation)
        self.m = Membership(swim=self.swim, node_id=ME_ID, pool=self.pool,  # type: ignore[arg-type]
                            spawn=self.tasks.append, on_incarnation=self.incarnations.append,
                            on_peers=self.peers.append, peers_interval=peers_interval,
                            loop=self.loop)  # type: ignore[arg-type]

    def deliver(self, src: str, msg: Message, *, at: float | None = None) -> None:
        """What ``Membership._handle`` does with a message from ``src`` (through the codec)."""
        if at is not None:
            self.loop.run_until(at)
        self.swim.on_message(src, node_id_for(src), decode_body(encode_body(msg)), now=self.loop.now)
        self.m.step()

    def run_dials(self) -> None:
        """Run the dial tasks Membership spawned (each completes at once here)."""
        while self.tasks:
            with contextlib.suppress(StopIteration):
                self.tasks.pop(0).send(None)


def alive(i: int, inc: int = 0) -> Alive:
    address = f"p{i}:1"
    return Alive(incarnation=inc, node=node_id_for(address), address=address, meta=NodeMeta())


# ----------------------------------------------------------- incarnation (defect 2)


def test_absurd_claims_never_persist_an_incarnation_the_next_start_refuses() -> None:
    h = Harness(incarnation=start_incarnation(MAX_START_INCARNATION - 2**20))
    h.deliver("p1:1", alive(1))
    for inc in (WIRE_MAX, 1 << 63, MAX_START_INCARNATION, MAX_START_INCARNATION - 1, 2**64 - 2):
        for msg in (Suspect(incarnation=inc, node=ME_ID, sender=node_id_for("liar:1")),
                    Dead(incarnation=inc, node=ME_ID, sender=node_id_for("liar:1")),
                    Alive(incarnation=inc, node=ME_ID, address=ME, meta=NodeMeta(hostname="x"))):
            h.deliver("liar:1", msg)
    assert h.incarnations[-1] == MAX_START_INCARNATION  # refuted once (MAX - 1), then saturated
    for persisted in h.incarnations:
        assert persisted <= MAX_START_INCARNATION
        start_incarnation(persisted)  # the next start accepts whatever was persisted
    assert h.m.stats()["implausible_claims_total"] == 12
    reply = build_status_reply(h.m.members(), self_id=ME_ID, now=h.loop.now, uptime_s=1.0)
    decode_body(encode_body(reply))  # status still answers
    h.m.leave()
    assert Dead(incarnation=MAX_START_INCARNATION, node=ME_ID, sender=ME_ID) in h.pool.link.sent
    h.m.stop()
    assert not h.m.busy()


# ------------------------------------------------------------- live peers (defect 8)


def test_member_events_never_sort_the_table_and_peers_are_written_on_the_timer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(peers_interval=5.0)

    def no_full_scan(self: Swim) -> list[object]:
        raise AssertionError("Swim.members() called while handling membership events")

    monkeypatch.setattr(Swim, "members", no_full_scan)
    h.deliver("p0:1", alive(0))
    h.loop.run_until(0.0)
    assert h.peers == [["p0:1"]]  # the first change after a quiet period is written at once
    for i in range(1, 1_000):
        h.deliver(f"p{i}:1", alive(i), at=i / 1_000)
    h.loop.run_until(4.99)
    assert len(h.peers) == 1  # a flood of events: no write before the interval
    h.loop.run_until(5.0)
    assert h.peers[-1] == sorted(f"p{i}:1" for i in range(1_000)) and len(h.peers) == 2
    dead = [node_id_for(f"p{i}:1") for i in (3, 4)]
    h.deliver("p5:1", Dead(incarnation=0, node=dead[0], sender=node_id_for("p5:1")), at=6.0)
    h.deliver("p4:1", Dead(incarnation=0, node=dead[1], sender=dead[1]), at=6.5)  # p4 left
    h.loop.run_until(9.99)
    assert len(h.peers) == 2
    h.loop.run_until(10.0)
    assert h.peers[-1] == sorted(f"p{i}:1" for i in range(1_000) if i not in (3, 4))
    h.loop.run_until(30.0)  # nothing changed: nothing written; the reaping changes no peer
    assert len(h.peers) == 3
    h.deliver("p3:1", alive(3, inc=1), at=31.0)  # p3 rejoins; stop() writes it at once
    h.m.stop()
    assert h.peers[-1] == sorted(f"p{i}:1" for i in range(1_000) if i != 4) and len(h.peers) == 4
    h.loop.run_until(100.0)
    assert len(h.peers) == 4


def test_dropped_events_rebuild_the_peers_from_the_table() -> None:
    h = Harness(config=dataclasses.replace(CFG, max_events=8))
    states = tuple(MemberState(node=node_id_for(f"p{i}:1"), address=f"p{i}:1", incarnation=0,
                               status=MemberStatus.ALIVE, meta=NodeMeta()) for i in range(50))
    h.deliver("p0:1", PushPull(reply=True, members=states))
    assert h.swim.events_dropped > 0
    h.loop.run_until(0.0)
    assert h.peers == [sorted(f"p{i}:1" for i in range(50))]


@pytest.mark.parametrize(("deadlines", "want"), [
    ([0.0], [0.0]),
    ([0.0, 1.0, 2.0], [0.0, 5.0]),
    ([0.0, 6.0], [0.0, 6.0]),
    ([0.0, 4.0, 12.0], [0.0, 5.0, 12.0]),
])
def test_write_behind_writes_at_most_once_per_interval(deadlines: list[float],
                                                       want: list[float]) -> None:
    writes: list[float] = []
    now = 0.0
    w = WriteBehind(interval=5.0, write=lambda: writes.append(now))
    for t in [*deadlines, 100.0]:
        due = w.next_deadline()
        while due is not None and due <= t:
            now = due
            w.handle_timer(now=due)
            due = w.next_deadline()
        now = t
        if t < 100.0:
            w.changed(now=t)
    assert writes == want
    assert w.next_deadline() is None and not w.pending


# ------------------------------------------------------------------ leave (SIGTERM)


def test_leave_never_raises_and_busy_then_waits_for_nothing(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    h.deliver("p1:1", alive(1))
    assert h.m.busy()  # our Alive and p1's are queued for gossip

    def broken(self: Swim, *, now: float) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(Swim, "leave", broken)
    with caplog.at_level(logging.ERROR, logger="starmesh.members"):
        h.m.leave()
    assert "announcing the leave failed" in caplog.text
    assert not h.m.busy()
    h.m.stop()
    assert not h.m.busy()


def test_busy_never_raises() -> None:
    h = Harness()
    h.deliver("p1:1", alive(1))

    def broken() -> bool:
        raise RuntimeError("transport gone")

    h.pool.buffers_empty = broken
    h.loop.run_until(10.0)  # gossip drained
    assert h.swim.pending_broadcasts == 0
    assert h.m.busy() is False


def test_a_leave_announces_itself_and_busy_ends_once_gossip_is_out() -> None:
    h = Harness()
    h.deliver("p1:1", alive(1))
    h.loop.run_until(5.0)
    h.m.leave()
    assert Dead(incarnation=0, node=ME_ID, sender=ME_ID) in h.pool.link.sent
    t = 5.0
    while h.m.busy():
        t += CFG.gossip_interval
        assert t < 10.0, "the leave announcement never finished"
        h.loop.run_until(t)


# ------------------------------------------------------------------ join state


def test_join_state_tells_a_wrong_mesh_key_from_unreachable_seeds() -> None:
    h = Harness()
    assert h.m.join_state() == JoinState(joined=False, seeds=(), refused_auth=frozenset(),
                                         unreachable=frozenset(), errors={}, since=0.0)
    h.loop.run_until(2.0)
    h.pool.dial_errors = {
        "s1:1": RemoteProtocolError("mesh secret proof failed", code=ErrorCode.AUTH_FAILED),
        "s2:1": RemoteProtocolError("mesh secret proof failed", code=ErrorCode.AUTH_FAILED),
        "s3:1": TransportError("connection refused"),
    }
    h.m.join(["s1:1", "s2:1", "s3:1", ME])
    h.run_dials()
    st = h.m.join_state()
    assert (st.joined, st.seeds, st.since) == (False, ("s1:1", "s2:1", "s3:1"), 2.0)
    assert st.refused_auth == {"s1:1", "s2:1"} and st.unreachable == {"s3:1"}
    assert st.errors["s1:1"] == "AUTH_FAILED: mesh secret proof failed"
    assert st.all_failing and not st.all_refused_auth
    del h.pool.dial_errors["s3:1"]  # s3 comes up with another key
    h.pool.dial_errors["s3:1"] = RemoteProtocolError("bad proof", code=ErrorCode.AUTH_FAILED)
    h.loop.run_until(2.0 + CFG.join_retry_interval)
    h.run_dials()
    st = h.m.join_state()
    assert st.all_refused_auth and st.refused_auth == {"s1:1", "s2:1", "s3:1"}
    del h.pool.dial_errors["s2:1"]  # s2 answers: we are in, no errors remain
    h.loop.run_until(2.0 + 2 * CFG.join_retry_interval)
    h.run_dials()
    h.deliver("s2:1", PushPull(join=True, reply=True, members=(
        MemberState(node=node_id_for("s2:1"), address="s2:1", incarnation=0,
                    status=MemberStatus.ALIVE, meta=NodeMeta()),)))
    st = h.m.join_state()
    assert st.joined and not st.all_failing and st.errors == {} and st.refused_auth == set()


def test_join_without_seeds_is_joined_at_once() -> None:
    h = Harness()
    h.m.join([])
    assert h.m.join_state().joined
    coro = h.m.wait_joined()
    with pytest.raises(StopIteration):
        coro.send(None)
