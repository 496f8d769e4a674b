"""A link under transport faults and its memory (issue 10): a transport that refuses a write
finishes the link instead of raising out of a callback, a closed link is freed by reference
counting (no cycle, no traceback holding it), and the log limiter of rejected peers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest

import node.pool
from node.config import LinkConfig
from node.testing import loopback_pools, until
from node.transport import Link, LinkSettings, LogLimiter, fresh_error
from protocol import crypto
from protocol.connection import Channel, Role
from protocol.errors import ErrorCode, RemoteProtocolError, TransportError, detached
from protocol.messages.gossip import Ack
from protocol.schema import Message
from protocol.tags import MsgType

uvloop = pytest.importorskip("uvloop")

LOOPS = [pytest.param(asyncio.new_event_loop, id="asyncio"),
         pytest.param(uvloop.new_event_loop, id="uvloop")]

UVLOOP_CLOSED = "unable to perform operation on <TCPTransport closed=True>; the handler is closed"


# ---- 5. a write the transport refuses finishes the link ---------------------------------


class FakeTransport(asyncio.Transport):
    """In memory: ``write`` delivers to ``peer`` on the next loop turn, or raises what uvloop
    raises on a closed handle once ``refuse`` is set."""

    def __init__(self, *, refuse: bool = False) -> None:
        super().__init__()
        self.refuse = refuse
        self.peer: Link | None = None
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 9) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: Any) -> None:
        if self.refuse:
            raise RuntimeError(UVLOOP_CLOSED)
        asyncio.get_running_loop().call_soon(self._deliver, bytes(data))

    def _deliver(self, data: bytes) -> None:
        peer = self.peer
        while data and peer is not None and not peer.closed.is_set():
            buf = peer.get_buffer(len(data))
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            peer.buffer_updated(n)
            data = data[n:]

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def make_link(role: Role, closes: list[BaseException | None], spawn: Any, *, secret: bytes,
              **config: Any) -> Link:
    settings = LinkSettings(identity=crypto.generate_identity(), mesh_secret=secret,
                            listen_address=None, config=LinkConfig(**config))
    return Link(role=role, channel=Channel.CONTROL, settings=settings,
                dispatch={Channel.CONTROL: {MsgType.ACK: _ignore}}, spawn=spawn,
                on_open=lambda _: None, on_close=lambda _, error: closes.append(error))


async def _ignore(link: Link, message: Message) -> None:
    pass


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What reached the event loop's exception handler (an exception out of a callback)."""
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    yield errors
    loop.set_exception_handler(None)


async def test_refused_write_in_connection_made_finishes_the_link(loop_errors: list[Any]) -> None:
    closes: list[BaseException | None] = []
    async with asyncio.TaskGroup() as tasks:
        link = make_link(Role.INITIATOR, closes, tasks.create_task, secret=crypto.new_mesh_secret())
        link.connection_made(FakeTransport(refuse=True))  # writes the INIT: refused
        assert link.closed.is_set() and not link.is_open
        assert isinstance(link.close_reason, TransportError) and "RuntimeError" in str(link.close_reason)
        link.connection_lost(None)  # the transport's own report comes later: nothing more
        assert closes == [link.close_reason]
    assert loop_errors == []


async def test_refused_write_in_a_timer_callback_finishes_the_link(loop_errors: list[Any]) -> None:
    closes: list[BaseException | None] = []
    async with asyncio.TaskGroup() as tasks:
        link = make_link(Role.RESPONDER, closes, tasks.create_task, secret=crypto.new_mesh_secret(),
                         handshake_timeout=0.01)
        link.connection_made(FakeTransport(refuse=True))
        # the handshake deadline fires from the loop's timer: its ERROR frame cannot be written
        async with asyncio.timeout(5):
            await link.closed.wait()
        assert isinstance(link.close_reason, RemoteProtocolError)
        assert link.close_reason.code is ErrorCode.HANDSHAKE_TIMEOUT
        assert closes == [link.close_reason]
    assert loop_errors == []


async def test_refused_write_of_a_message_finishes_the_link(loop_errors: list[Any]) -> None:
    closes_a: list[BaseException | None] = []
    closes_b: list[BaseException | None] = []
    secret = crypto.new_mesh_secret()
    async with asyncio.TaskGroup() as tasks:
        a = make_link(Role.INITIATOR, closes_a, tasks.create_task, secret=secret)
        b = make_link(Role.RESPONDER, closes_b, tasks.create_task, secret=secret)
        to_b, to_a = FakeTransport(), FakeTransport()
        to_b.peer, to_a.peer = b, a
        b.connection_made(to_a)
        a.connection_made(to_b)
        async with asyncio.timeout(5):
            await a.opened
        to_b.refuse = True
        assert a.send_nowait(Ack(seq=1)) is False  # refused: the link is finished, not raised
        assert isinstance(a.close_reason, TransportError) and closes_a == [a.close_reason]
        with pytest.raises(TransportError):
            await a.send(Ack(seq=2))
        b.force_close()
    assert loop_errors == []


# ---- 6. a closed link is freed without the cyclic GC --------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_closed_links_are_freed_without_a_collection(loop_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[weakref.ref[Link]] = []

    class Tracked(Link):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            made.append(weakref.ref(self))

    monkeypatch.setattr(node.pool, "Link", Tracked)

    async def churn() -> None:
        async with loopback_pools(3, secrets=[b"k" * 32, b"k" * 32, b"x" * 32], handshake_timeout=0.2,
                                  first_flight_timeout=0.1) as (a, b, stranger):
            got: list[int] = []

            async def on_ack(link: Link, message: Message) -> None:
                assert isinstance(message, Ack)
                got.append(message.seq)

            b.dispatch[Channel.CONTROL][MsgType.ACK] = on_ack
            host, port = b.address.rsplit(":", 1)
            for i in range(8):
                link = await a.pool.connect(b.address, Channel.CONTROL)  # a goodbye
                await link.send(Ack(seq=i))
                await until(lambda i=i: len(got) == i + 1)
                link.close()
                link = await a.pool.connect(b.address, Channel.BULK)  # a bare close
                link.force_close()
                del link
                for dead in (f"127.0.0.1:{closed_port()}", b.address):  # refused; wrong mesh key
                    with contextlib.suppress(TransportError, RemoteProtocolError):
                        await stranger.pool.connect(dead, Channel.CONTROL)
                with socket.create_connection((host, int(port))) as junk:  # garbage: rejected
                    junk.sendall(b"\x00\x00\x00\x05hello")
                    await asyncio.to_thread(junk.recv, 4096)
                silent = socket.create_connection((host, int(port)))  # first flight timeout
                await asyncio.to_thread(silent.recv, 4096)
                silent.close()
            rejected = b.pool.settings.traffic.rejected
            assert rejected == {"AUTH_FAILED": 8, "BAD_MSGPACK": 8, "HANDSHAKE_TIMEOUT": 8}
            for peer in (a, b, stranger):
                await until(lambda peer=peer: peer.pool.links() == [])
                peer.lost.clear()  # the record of lost links holds them
            assert len(made) >= 8 * 7
            await until(lambda: all(ref() is None for ref in made))

    gc.collect()
    gc.disable()
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(churn())
    finally:
        gc.enable()


async def test_a_finished_link_drops_what_it_had_received() -> None:
    async with loopback_pools(1, handshake_timeout=60.0, first_flight_timeout=60.0) as (b,):
        host, port = b.address.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as partial:
            partial.sendall((3000).to_bytes(4, "big") + bytes(2000))  # most of a handshake frame
            await until(lambda: any(x.core.buffered_bytes == 2004 for x in b.pool.links()))
            (link,) = b.pool.links()
            link.force_close()  # finished by us, not by the core (as a reset from the peer is)
            assert link.core.buffered_bytes == 0


def test_stored_errors_keep_no_traceback() -> None:
    def fail() -> None:
        try:
            raise ValueError("inner")
        except ValueError as inner:
            raise RemoteProtocolError("outer", code=ErrorCode.BAD_MSGPACK) from inner

    try:
        fail()
    except RemoteProtocolError as caught:
        error = caught
    assert error.__traceback__ is not None and error.__cause__ is not None
    assert detached(error) is error
    assert error.__traceback__ is None and error.__cause__ is None
    copy = fresh_error(error)
    assert copy is not error and type(copy) is RemoteProtocolError
    assert str(copy) == "outer" and copy.code is ErrorCode.BAD_MSGPACK and copy.__cause__ is None


# ---- 4. the log limiter ----------------------------------------------------------------------


def test_log_limiter_logs_once_per_reason_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    logger = logging.getLogger("starmesh.test")
    limiter = LogLimiter(interval=10.0)

    def warn(key: str, now: float) -> bool:
        return limiter.log(logger, logging.WARNING, key, "rejected %s", key, now=now)

    assert warn("AUTH_FAILED", 100.0)
    assert [warn("AUTH_FAILED", 100.0 + i / 10) for i in range(1, 50)] == [False] * 49
    assert warn("BAD_MSGPACK", 101.0)  # another reason has its own budget
    assert not warn("AUTH_FAILED", 109.9)
    assert warn("AUTH_FAILED", 110.0)
    assert not warn("AUTH_FAILED", 111.0)
    assert warn("AUTH_FAILED", 500.0)
    assert [r.getMessage() for r in caplog.records] == [
        "rejected AUTH_FAILED",
        "rejected BAD_MSGPACK",
        "rejected AUTH_FAILED (50 more like this in the last 10 s not logged)",
        "rejected AUTH_FAILED (1 more like this in the last 390 s not logged)",
    ]
