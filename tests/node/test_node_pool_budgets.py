"""The pool's budgets over real loopback sockets, in one process (integration): failed dials
leave no link, half-open connections are evicted instead of locking peers out, status
clients have a budget and an idle timeout of their own, and a connect storm costs a few
log lines (issue 10)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from node.pool import HARD_LIMIT_FACTOR, Pool, to_evict
from node.testing import loopback_pools, until
from node.transport import Link, LinkSettings, Spawn
from protocol import crypto
from protocol.connection import Channel, Connection, HandshakeOptions, Role
from protocol.errors import ErrorCode, LocalProtocolError, TransportError

uvloop = pytest.importorskip("uvloop")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

LOOPS = [pytest.param(asyncio.new_event_loop, id="asyncio"),
         pytest.param(uvloop.new_event_loop, id="uvloop")]


def run_on(loop_factory: Callable[[], asyncio.AbstractEventLoop],
           main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


@contextlib.contextmanager
def idle_sockets(address: str, n: int, *, source: str = "127.0.0.1") -> Iterator[list[socket.socket]]:
    """``n`` TCP connections to ``address`` from ``source`` that never send a byte."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((source, 0))
            s.connect(host_port(address))
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def half_open(pool: Pool) -> list[Link]:
    return [link for link in pool.links() if link.role is Role.RESPONDER and link.peer is None]


def closed_by_peer(s: socket.socket, timeout: float = 5.0) -> bool:
    """Read until EOF or reset (True), or ``timeout`` with the socket still open (False)."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def still_open(s: socket.socket) -> bool:
    """No EOF or reset so far (reads what arrived: an ERROR frame precedes the EOF)."""
    s.setblocking(False)
    try:
        while s.recv(65536):
            pass
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


# ---- 1. failed dials leave no link (uvloop made the protocol before connecting) ----------


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_failed_dials_leave_no_link_and_do_not_fill_the_table(loop_factory: Any) -> None:
    async def main() -> None:
        async with loopback_pools(2) as (a, b):  # 64 connections at most
            dead = f"127.0.0.1:{closed_port()}"
            for _ in range(100):
                with pytest.raises(TransportError):
                    await a.pool.connect(dead, Channel.CONTROL)
                assert a.pool.links() == []
            connections = a.pool.stats()["connections"]
            assert isinstance(connections, dict) and set(connections.values()) == {0.0}
            link = await a.pool.connect(b.address, Channel.CONTROL)  # not locked out
            assert link.is_open and a.pool.links() == [link]

    run_on(loop_factory, main)


# ---- 2. half-open connections: first flight, eviction, per-address quota ---------------


async def test_silent_connection_is_closed_at_its_first_flight_deadline() -> None:
    async with loopback_pools(1, handshake_timeout=60.0, first_flight_timeout=2.0) as (b,):
        with idle_sockets(b.address, 1) as (silent,):
            await until(lambda: len(half_open(b.pool)) == 1)
            (link,) = half_open(b.pool)
            due = link.next_deadline()
            assert due is not None and due == pytest.approx(link.last_active + 2.0)
            link.handle_timer(now=due - 0.001)
            assert not link.closed.is_set()
            link.handle_timer(now=due)
            assert isinstance(link.close_reason, LocalProtocolError)
            assert link.close_reason.code is ErrorCode.HANDSHAKE_TIMEOUT
            assert b.pool.settings.traffic.rejected["HANDSHAKE_TIMEOUT"] == 1
            assert await asyncio.to_thread(closed_by_peer, silent)  # an ERROR frame, then EOF
            assert b.pool.links() == []


async def test_first_flight_deadline_is_only_for_inbound_links_until_the_init_arrives() -> None:
    async with loopback_pools(2, handshake_timeout=60.0, first_flight_timeout=2.0) as (a, b):
        link = await a.pool.connect(b.address, Channel.CONTROL)
        assert link.first_flight_in and link.next_deadline() is None
        await until(lambda: b.pool.get_open(a.address, Channel.CONTROL) is not None)
        inbound = b.pool.get_open(a.address, Channel.CONTROL)
        assert inbound is not None and inbound.first_flight_in and inbound.next_deadline() is None


async def test_idle_strangers_holding_every_handshake_slot_do_not_lock_members_out() -> None:
    # first flight and handshake timeouts far away: only eviction can make room
    async with loopback_pools(2, max_handshaking=8, max_handshaking_per_address=16,
                              first_flight_timeout=60.0, handshake_timeout=60.0, eviction_grace=0.0) as (a, b):
        with idle_sockets(b.address, 8) as strangers:
            await until(lambda: len(half_open(b.pool)) == 8)
            link = await a.pool.connect(b.address, Channel.CONTROL)
            assert link.is_open
            # the member's connection evicted the oldest stranger
            assert await asyncio.to_thread(closed_by_peer, strangers[0])
            assert all(still_open(s) for s in strangers[1:])
            assert len(half_open(b.pool)) == 7
            evicted = b.pool.stats()["evicted_handshakes_total"]
            assert isinstance(evicted, dict) and evicted["max_handshaking"] == 1


async def test_eviction_spares_a_connection_whose_first_flight_arrived() -> None:
    async with loopback_pools(1, max_handshaking=3, max_handshaking_per_address=3,
                              first_flight_timeout=60.0, handshake_timeout=60.0, eviction_grace=0.0) as (b,):
        secret = b.pool.settings.mesh_secret
        initiator = Connection(role=Role.INITIATOR, identity=crypto.generate_identity(), mesh_secret=secret,
                               options=HandshakeOptions(None, Channel.CLIENT), now=0.0)
        with idle_sockets(b.address, 1) as (talker,):
            talker.sendall(initiator.data_to_send())  # a valid INIT, and then nothing
            await until(lambda: any(link.first_flight_in for link in half_open(b.pool)))
            with idle_sockets(b.address, 2) as (s1, s2):
                await until(lambda: len(half_open(b.pool)) == 3)
                with idle_sockets(b.address, 1) as (s3,):
                    await until(lambda: not still_open(s1))  # the oldest silent one
                    assert still_open(talker) and still_open(s2) and still_open(s3)


async def test_per_address_quota_evicts_from_that_address_only() -> None:
    async with loopback_pools(1, max_handshaking=16, max_handshaking_per_address=2,
                              first_flight_timeout=60.0, handshake_timeout=60.0, eviction_grace=0.0) as (b,):
        with idle_sockets(b.address, 2, source="127.0.0.2") as others, \
                idle_sockets(b.address, 2) as (old, young):
            await until(lambda: len(half_open(b.pool)) == 4)
            with idle_sockets(b.address, 1) as (newest,):
                await until(lambda: not still_open(old))
                assert still_open(young) and still_open(newest) and all(still_open(s) for s in others)
            evicted = b.pool.stats()["evicted_handshakes_total"]
            assert isinstance(evicted, dict) and evicted == {"max_handshaking": 0.0, "per_address": 1.0}


@dataclasses.dataclass
class Fake:
    connected_at: float
    first_flight_in: bool = False


@pytest.mark.parametrize(
    ("links", "limit", "evicted"),
    [
        # under the limit: nothing
        ([Fake(0.0), Fake(1.0)], 3, []),
        # at the limit: the oldest past its grace (1 s at now=10)
        ([Fake(0.0), Fake(1.0), Fake(2.0)], 3, [0]),
        # one whose first flight arrived is spared, however old
        ([Fake(0.0, True), Fake(1.0), Fake(2.0)], 3, [1]),
        # over the limit: down to limit - 1, oldest first
        ([Fake(0.0), Fake(1.0), Fake(2.0), Fake(3.0), Fake(4.0)], 3, [0, 1, 2]),
        # all in their grace: none, below the hard limit (12 here)
        ([Fake(9.5)] * 11, 3, []),
        # ... and at it, the oldest without first flight, whatever its age
        ([Fake(9.1, True), Fake(9.2), *[Fake(9.5)] * 10], 3, [1]),
        ([Fake(9.1, True)] * 12, 3, [0]),
    ],
)
def test_to_evict(links: list[Fake], limit: int, evicted: list[int]) -> None:
    assert to_evict(links, limit=limit, grace=1.0, now=10.0, hard_limit=12) == [links[i] for i in evicted]
    if len(links) >= 12:  # without a hard limit only those past their grace go
        assert to_evict(links, limit=limit, grace=1.0, now=10.0) == []


async def test_a_burst_of_new_connections_is_not_evicted_in_its_grace() -> None:
    async with loopback_pools(1, max_handshaking=2, max_handshaking_per_address=1,
                              first_flight_timeout=60.0, handshake_timeout=60.0,
                              eviction_grace=30.0) as (b,):
        with idle_sockets(b.address, 2 * HARD_LIMIT_FACTOR) as burst:
            await until(lambda: len(half_open(b.pool)) == len(burst))  # over the limit, in grace
            with idle_sockets(b.address, 1) as (last,):  # the hard limit: the oldest goes
                await until(lambda: not still_open(burst[0]))
                assert still_open(last) and all(still_open(s) for s in burst[1:])


# ---- 3. CLIENT links: a budget and an idle timeout of their own ------------------------


async def open_client(address: str, secret: bytes, spawn: Spawn) -> Link:
    """One CLIENT link to ``address``, as ``python -m node status`` opens it."""
    settings = LinkSettings(identity=crypto.generate_identity(), mesh_secret=secret, listen_address=None)

    def make() -> Link:
        return Link(role=Role.INITIATOR, channel=Channel.CLIENT, settings=settings, dispatch={},
                    spawn=spawn, on_open=lambda _: None, on_close=lambda _l, _e: None)

    host, port = host_port(address)
    _, link = await asyncio.get_running_loop().create_connection(make, host, port)
    await link.opened
    return link


def clients(pool: Pool) -> list[Link]:
    return [link for link in pool.links() if link.peer is not None and link.peer.channel is Channel.CLIENT]


async def test_status_clients_do_not_use_the_members_budget() -> None:
    async with asyncio.TaskGroup() as tasks, \
            loopback_pools(3, max_connections=2, max_client_connections=3) as (a, b, c):
        opened = [await open_client(b.address, b.pool.settings.mesh_secret, tasks.create_task)
                  for _ in range(6)]
        await until(lambda: len(clients(b.pool)) == 3)
        # each new client closed the one idle the longest, with a goodbye
        await until(lambda: [link.is_open for link in opened] == [False] * 3 + [True] * 3)
        assert all(link.close_reason is None for link in opened[:3])
        closed = b.pool.stats()["closed_client_connections_total"]
        assert isinstance(closed, dict) and closed["budget"] == 3
        # members still get in: 2 member links (a, c) despite the clients
        assert (await a.pool.connect(b.address, Channel.CONTROL)).is_open
        assert (await c.pool.connect(b.address, Channel.CONTROL)).is_open
        for link in opened:
            link.close()


async def test_idle_status_client_is_closed_after_client_idle_timeout() -> None:
    async with asyncio.TaskGroup() as tasks, \
            loopback_pools(2, idle_timeout=300.0, client_idle_timeout=10.0) as (a, b):
        member = await a.pool.connect(b.address, Channel.CONTROL)
        client = await open_client(b.address, b.pool.settings.mesh_secret, tasks.create_task)
        await until(lambda: len(clients(b.pool)) == 1)
        (served,) = clients(b.pool)
        assert b.pool.reap_idle(now=served.last_active + 9.9) == 0
        assert b.pool.reap_idle(now=max(served.last_active, member.last_active) + 10.0) == 1
        await until(lambda: not client.is_open)
        assert client.close_reason is None and member.is_open  # a goodbye; members untouched
        closed = b.pool.stats()["closed_client_connections_total"]
        assert isinstance(closed, dict) and closed["idle"] == 1


# ---- 4. rejected connections are counted one by one, logged a few times -----------------


async def test_connect_storm_is_counted_but_logged_once_per_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with loopback_pools(1) as (b,):
        for _ in range(30):
            with idle_sockets(b.address, 1) as (junk,):
                junk.sendall(b"\x00\x00\x00\x05hello")  # a frame, but no handshake
                assert await asyncio.to_thread(closed_by_peer, junk)
        await until(lambda: sum(b.pool.settings.traffic.rejected.values()) == 30)
        assert b.pool.settings.traffic.rejected["BAD_MSGPACK"] == 30
        assert caplog.text.count("rejected") == 1  # well within REJECT_LOG_INTERVAL_S
