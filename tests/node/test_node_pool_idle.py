"""Idle reaping and duplicate links in the pool, over real loopback sockets (integration)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from discovery.events import EventKind, MemberEvent
from node.config import Address, LinkConfig, NodeConfig
from node.pool import RETIRED_QUIET_S, Pool, retired_quiet, sweep_interval
from node.runtime import Node
from node.testing import loopback_pools, until
from node.transport import Link
from protocol.connection import Channel, Role
from protocol.messages.gossip import Ack, Alive, GpuInfo, MemberStatus, NodeMeta
from protocol.schema import Message
from protocol.tags import MsgType

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.mark.parametrize(
    ("idle_timeout", "interval"), [(0.01, 0.05), (0.2, 0.05), (1.0, 0.25), (60.0, 15.0), (300.0, 30.0)]
)
def test_sweep_interval_is_a_clamped_quarter(idle_timeout: float, interval: float) -> None:
    assert sweep_interval(idle_timeout) == interval


@pytest.mark.parametrize(("idle_timeout", "quiet"), [(0.0, 0.0), (0.2, 0.2), (60.0, RETIRED_QUIET_S)])
def test_retired_quiet_is_at_most_the_idle_timeout(idle_timeout: float, quiet: float) -> None:
    assert retired_quiet(idle_timeout) == quiet


@dataclasses.dataclass
class Peer:
    pool: Pool
    address: str
    node_id: bytes
    got: list[tuple[Link, int]]
    lost: list[tuple[Link, BaseException | None]]
    gate: asyncio.Event | None


@asynccontextmanager
async def pools(n: int, *, idle_timeout: float, inbox_messages: int = 64,
                gates: Sequence[asyncio.Event] = ()) -> AsyncIterator[list[Peer]]:
    """``n`` pools on loopback; each records the ACKs (their seq) and ALIVEs (a bulky message:
    their incarnation) it receives on BULK with their link (pool ``i`` after ``gates[i]`` is
    set, if given: a slow handler)."""
    async with loopback_pools(n, idle_timeout=idle_timeout, inbox_messages=inbox_messages) as loopback:
        peers: list[Peer] = []
        for i, lp in enumerate(loopback):
            gate = gates[i] if i < len(gates) else None
            got: list[tuple[Link, int]] = []

            async def on_bulk(link: Link, message: Message, got: list[tuple[Link, int]] = got,
                              gate: asyncio.Event | None = gate) -> None:
                assert isinstance(message, Ack | Alive)
                if gate is not None:
                    await gate.wait()
                got.append((link, message.seq if isinstance(message, Ack) else message.incarnation))

            lp.dispatch[Channel.BULK][MsgType.ACK] = lp.dispatch[Channel.BULK][MsgType.ALIVE] = on_bulk
            peers.append(Peer(lp.pool, lp.address, lp.node_id, got, lp.lost, gate))
        yield peers


def bulky(incarnation: int) -> Alive:
    """A message of about 2.5 KB."""
    gpus = tuple(GpuInfo(name="g" * 128, memory_bytes=1) for _ in range(16))
    return Alive(incarnation=incarnation, node=bytes(32), address="127.0.0.1:1",
                 meta=NodeMeta(hostname="h" * 128, gpus=gpus))


def open_links(peer: Peer, channel: Channel) -> list[Link]:
    return [link for link in peer.pool.links() if link.is_open and link.peer and link.peer.channel is channel]


async def test_idle_link_is_closed_gracefully_on_both_sides_and_redialed() -> None:
    async with pools(2, idle_timeout=0.2) as (a, b):
        link = await a.pool.connect(b.address, Channel.BULK)
        await link.send(Ack(seq=1))
        await until(lambda: len(b.got) == 1)
        inbound = b.got[0][0]
        # no traffic: the sweep closes it with a goodbye, seen as graceful on both sides
        await until(lambda: not link.is_open and not inbound.is_open and bool(a.lost) and bool(b.lost))
        assert a.lost == [(link, None)] and b.lost == [(inbound, None)]
        assert a.pool.get_open(b.address, Channel.BULK) is None
        assert b.pool.get_open(a.address, Channel.BULK) is None
        again = await a.pool.connect(b.address, Channel.BULK)  # dialed afresh
        assert again is not link and again.is_open
        await again.send(Ack(seq=2))
        await until(lambda: len(b.got) == 2)
        assert b.got[1][1] == 2


async def test_links_with_traffic_or_unhandled_messages_are_not_reaped() -> None:
    release = asyncio.Event()
    async with pools(2, idle_timeout=60.0, inbox_messages=2, gates=(release, release)) as (a, b):  # sweep asleep
        link = await a.pool.connect(b.address, Channel.BULK)
        for i in range(4):
            await link.send(Ack(seq=i))
        await until(lambda: any(x.inbox_size > 0 for x in open_links(b, Channel.BULK)))
        (inbound,) = open_links(b, Channel.BULK)
        # bytes moved less than idle_timeout ago: kept
        assert a.pool.reap_idle(now=link.last_active + 59.0) == 0
        # long silent, but messages still wait for their handler: kept
        assert b.pool.reap_idle(now=inbound.last_active + 600.0) == 0 and inbound.is_open
        release.set()
        await until(lambda: inbound.inbox_size == 0)
        assert b.pool.reap_idle(now=inbound.last_active + 60.0) == 1
        await until(lambda: not link.is_open)
        assert a.lost == [(link, None)] and b.lost == [(inbound, None)]


async def test_simultaneous_dials_settle_on_one_connection() -> None:
    async with pools(2, idle_timeout=60.0) as (a, b):  # idle sweep every 15 s
        small, large = sorted((a, b), key=lambda p: p.node_id)
        from_small, from_large = await asyncio.gather(
            small.pool.connect(large.address, Channel.BULK), large.pool.connect(small.address, Channel.BULK))
        await from_small.send(Ack(seq=1))
        await from_large.send(Ack(seq=2))  # maybe on the link being retired: delivered all the same
        # the duplicate closes with a goodbye once drained and quiet, on both sides, well
        # before the idle sweep interval (until gives up after 10 s)
        await until(lambda: all(len(p.lost) == 1 and len(open_links(p, Channel.BULK)) == 1 for p in (a, b)))
        (retired_on_small, error_on_small), (retired_on_large, error_on_large) = small.lost + large.lost
        assert error_on_small is None and error_on_large is None
        assert retired_on_small.role is Role.RESPONDER and retired_on_large.role is Role.INITIATOR
        await until(lambda: len(small.got) == 1 and len(large.got) == 1)
        assert (small.got[0][1], large.got[0][1]) == (2, 1)
        # both sides send on the link the smaller node id dialed, the one left
        (on_small,), (on_large,) = open_links(small, Channel.BULK), open_links(large, Channel.BULK)
        assert small.pool.get_open(large.address, Channel.BULK) is on_small and on_small.role is Role.INITIATOR
        assert large.pool.get_open(small.address, Channel.BULK) is on_large and on_large.role is Role.RESPONDER
        assert await large.pool.connect(small.address, Channel.BULK) is on_large  # no redial
        await on_small.send(Ack(seq=3))
        await on_large.send(Ack(seq=4))
        await until(lambda: len(small.got) == 2 and len(large.got) == 2)
        assert small.got[1] == (on_small, 4) and large.got[1] == (on_large, 3)  # one connection
        # idle: the last link closes, gracefully on both sides
        assert large.pool.reap_idle(now=on_large.last_active + 60.0) == 1
        await until(lambda: len(small.lost) == 2 == len(large.lost))
        assert small.lost[1] == (on_small, None) and large.lost[1] == (on_large, None)


async def test_a_link_from_the_smaller_id_takes_over_and_the_other_closes_once_quiet() -> None:
    async with pools(2, idle_timeout=60.0) as (a, b):
        small, large = sorted((a, b), key=lambda p: p.node_id)
        first = await large.pool.connect(small.address, Channel.BULK)
        await first.send(Ack(seq=1))
        await until(lambda: len(small.got) == 1)
        answered = small.got[0][0]
        assert small.pool.get_open(large.address, Channel.BULK) is answered  # answered on it
        # the smaller node dials too, under an alias of the larger one's address
        alias = "localhost:" + large.address.rsplit(":", 1)[1]
        second = await small.pool.connect(alias, Channel.BULK)
        await until(lambda: large.pool.get_open(small.address, Channel.BULK) is not first)
        on_large = large.pool.get_open(small.address, Channel.BULK)
        assert on_large is not None and on_large.role is Role.RESPONDER
        assert small.pool.get_open(large.address, Channel.BULK) is second
        assert await large.pool.connect(small.address, Channel.BULK) is on_large
        await second.send(Ack(seq=2))
        await on_large.send(Ack(seq=3))
        await until(lambda: len(small.got) == 2 and len(large.got) == 1)
        assert small.got[1] == (second, 3) and large.got[0] == (on_large, 2)  # one connection
        # the retired link closes with a goodbye once quiet, while the kept one stays open
        await until(lambda: len(small.lost) == 1 == len(large.lost))
        assert small.lost == [(answered, None)] and large.lost == [(first, None)]
        assert open_links(small, Channel.BULK) == [second] and open_links(large, Channel.BULK) == [on_large]
        await second.send(Ack(seq=4))
        await on_large.send(Ack(seq=5))
        await until(lambda: len(small.got) == 3 and len(large.got) == 2)
        assert small.got[2] == (second, 5) and large.got[1] == (on_large, 4)


async def test_a_retired_link_is_not_closed_while_messages_wait_or_data_is_unsent() -> None:
    gates = (asyncio.Event(), asyncio.Event())
    async with pools(2, idle_timeout=60.0, inbox_messages=2, gates=gates) as (a, b):
        small, large = sorted((a, b), key=lambda p: p.node_id)
        assert small.gate is not None and large.gate is not None
        first = await large.pool.connect(small.address, Channel.BULK)  # the link to retire
        await until(lambda: len(open_links(small, Channel.BULK)) == 1)
        (answered,) = open_links(small, Channel.BULK)
        for seq in range(3):  # one waits in the larger side's handler, two in its inbox
            await answered.send(Ack(seq=seq))
        await until(lambda: first.inbox_size == 2)
        second = await small.pool.connect("localhost:" + large.address.rsplit(":", 1)[1], Channel.BULK)
        await until(lambda: large.pool.get_open(small.address, Channel.BULK) is not first)
        assert small.pool.get_open(large.address, Channel.BULK) is second
        # the smaller side dialed the kept link: closing the retired one is the other side's job
        assert answered.buffered_bytes() == 0 and answered.inbox_size == 0
        assert small.pool.close_retired(now=answered.last_active + 600.0) == 0 and answered.is_open
        # the larger side answered the kept link, but messages wait for their handler
        assert first.buffered_bytes() == 0
        assert large.pool.close_retired(now=first.last_active + 600.0) == 0 and first.is_open
        # unsent data: the larger side writes on the retired link while the smaller does not read
        seq = 3
        async with asyncio.timeout(10.0):
            while first.buffered_bytes() == 0:
                assert first.send_many_nowait([bulky(s) for s in range(seq, seq + 100)])
                seq += 100
                await asyncio.sleep(0)
        large.gate.set()
        await until(lambda: first.inbox_size == 0 and len(large.got) == 3)
        assert first.buffered_bytes() > 0
        assert large.pool.close_retired(now=first.last_active + 600.0) == 0 and first.is_open
        # the smaller side reads everything; then the retired link closes with a goodbye
        small.gate.set()
        await until(lambda: not first.is_open and not answered.is_open)
        assert large.lost == [(first, None)] and small.lost == [(answered, None)]
        # every message written on it before the goodbye was handled, on both sides
        await until(lambda: len(small.got) == seq - 3)
        assert [s for _, s in small.got] == list(range(3, seq)) and {x for x, _ in small.got} == {answered}
        assert large.got == [(first, 0), (first, 1), (first, 2)]
        # one link left on each side, and it carries traffic both ways
        (on_large,) = open_links(large, Channel.BULK)
        assert open_links(small, Channel.BULK) == [second]
        await second.send(Ack(seq=seq))
        await on_large.send(Ack(seq=seq + 1))
        await until(lambda: len(large.got) == 4 and len(small.got) == seq - 2)
        assert large.got[3] == (on_large, seq) and small.got[-1] == (second, seq + 1)


async def test_closing_the_preferred_link_promotes_the_retired_one() -> None:
    async with pools(2, idle_timeout=0.0) as (a, b):
        small, large = sorted((a, b), key=lambda p: p.node_id)
        await asyncio.gather(small.pool.connect(large.address, Channel.CONTROL),
                             large.pool.connect(small.address, Channel.CONTROL))
        await until(lambda: len(open_links(a, Channel.CONTROL)) == 2 == len(open_links(b, Channel.CONTROL)))
        preferred = large.pool.get_open(small.address, Channel.CONTROL)
        assert preferred is not None and preferred.role is Role.RESPONDER
        preferred.close()
        (survivor,) = open_links(large, Channel.CONTROL)
        assert large.pool.get_open(small.address, Channel.CONTROL) is survivor
        assert await large.pool.connect(small.address, Channel.CONTROL) is survivor
        assert large.pool.reap_idle(now=survivor.last_active + 1e6) == 0  # idle_timeout 0: off


def _config(tmp_path: Path, name: str, key: Path, seeds: tuple[Address, ...] = ()) -> NodeConfig:
    return NodeConfig(listen=Address("127.0.0.1", 0), data_dir=tmp_path / name, mesh_key_file=key,
                      seeds=seeds, preset="test", use_uvloop=False, links=LinkConfig(idle_timeout=0.2))


async def test_nodes_close_idle_links_without_suspicion_and_redial(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="starmesh.pool")
    key = tmp_path / "mesh.key"
    got: list[tuple[Link, Message]] = []

    async def on_ack(link: Link, message: Message) -> None:
        got.append((link, message))

    async with Node(_config(tmp_path, "a", key)) as a:
        seed = (Address("127.0.0.1", int(a.address.rsplit(":", 1)[1])),)
        async with Node(_config(tmp_path, "b", key, seed)) as b, Node(_config(tmp_path, "c", key, seed)) as c:
            nodes = [a, b, c]
            b.on_message(MsgType.ACK, on_ack)

            def all_alive() -> bool:
                return all(sum(m.status is MemberStatus.ALIVE for m in n.members()) == 3 for n in nodes)

            await until(all_alive)
            events: list[MemberEvent] = []
            for n in nodes:
                n.on_member_event(events.append)
            link = await a.link_to(b.node_id)
            await link.send(Ack(seq=1))
            await until(lambda: len(got) == 1)
            inbound = got[0][0]
            # the BULK link goes idle and closes gracefully on both sides; gossip goes on, its
            # CONTROL links close between probes (a probe every 0.5 s per pair > 0.2 s) and redial
            await until(lambda: link.closed.is_set() and inbound.closed.is_set())
            assert link.close_reason is None and inbound.close_reason is None
            await until(lambda: caplog.text.count("closing idle CONTROL link") >= 2)
            await a.send(b.node_id, Ack(seq=3))  # redials
            await until(lambda: len(got) == 2)
            assert got[1][0] is not inbound and got[1][1] == Ack(seq=3)
            assert all_alive()
            assert not [e for e in events if e.kind in (EventKind.DEAD, EventKind.LEFT)]
