"""Links and the pool over real loopback sockets, in one process (integration)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable

import numpy as np
import pytest

from node.testing import loopback_pools, until
from node.transport import Handler, Link
from protocol import crypto
from protocol.connection import Channel
from protocol.errors import ErrorCode, RemoteProtocolError, TransportError
from protocol.messages.gossip import Ack
from protocol.messages.tensor import ArPart
from protocol.schema import Message
from protocol.tags import MsgType
from protocol.tensor import CodecSpec, encode_chunk

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def collector(into: list[tuple[bytes, Message]]) -> Handler:
    async def handle(link: Link, message: Message) -> None:
        assert link.peer is not None
        into.append((link.peer.node_id, message))

    return handle


async def test_send_and_reply_on_the_same_link() -> None:
    async with loopback_pools(2) as (a, b):
        got_b: list[tuple[bytes, Message]] = []
        got_a: list[tuple[bytes, Message]] = []

        async def echo(link: Link, message: Message) -> None:
            got_b.append((link.peer.node_id if link.peer else b"", message))
            assert isinstance(message, Ack)
            await link.send(Ack(seq=message.seq + 1))

        b.dispatch[Channel.BULK][MsgType.ACK] = echo
        a.dispatch[Channel.BULK][MsgType.ACK] = collector(got_a)
        link = await a.pool.connect(b.address, Channel.BULK)
        assert link.peer is not None and link.peer.node_id == b.node_id
        assert await a.pool.connect(b.address, Channel.BULK) is link  # pooled
        await link.send(Ack(seq=1))
        await until(lambda: len(got_a) == 1)
        assert got_b == [(a.node_id, Ack(seq=1))]
        assert got_a == [(b.node_id, Ack(seq=2))]


async def test_concurrent_dials_share_one_connection_and_inbound_is_reused() -> None:
    async with loopback_pools(2) as (a, b):
        links = await asyncio.gather(*(a.pool.connect(b.address, Channel.CONTROL) for _ in range(5)))
        assert len({id(link) for link in links}) == 1
        await until(lambda: b.pool.get_open(a.address, Channel.CONTROL) is not None)
        back = b.pool.get_open(a.address, Channel.CONTROL)
        assert back is not None and back.peer is not None and back.peer.node_id == a.node_id
        assert b.pool.get_open(a.address, Channel.BULK) is None


async def test_wrong_mesh_key_is_refused_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with loopback_pools(2, secrets=[crypto.new_mesh_secret(), crypto.new_mesh_secret()]) as (a, b):
        with pytest.raises(RemoteProtocolError) as info:
            await a.pool.connect(b.address, Channel.CONTROL)
        assert info.value.code is ErrorCode.AUTH_FAILED
        await until(lambda: "rejected" in caplog.text)
        assert "AUTH_FAILED" in caplog.text
        assert b.pool.get_open(a.address, Channel.CONTROL) is None


async def test_dial_to_closed_port_is_transport_error() -> None:
    async with loopback_pools(1) as (a,):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(TransportError):
            await a.pool.connect(f"127.0.0.1:{port}", Channel.CONTROL)


async def _raw(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def test_garbage_and_silent_clients_are_closed_others_served(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with loopback_pools(2, handshake_timeout=0.5) as (a, b):
        got: list[tuple[bytes, Message]] = []
        b.dispatch[Channel.BULK][MsgType.ACK] = collector(got)
        silent_r, silent_w = await _raw(b.address)
        junk_r, junk_w = await _raw(b.address)
        junk_w.write(os.urandom(1 << 20))
        with contextlib.suppress(ConnectionError):  # b closes it: EOF, or a reset while we write
            async with asyncio.timeout(5):
                await junk_w.drain()
                while await junk_r.read(65536):
                    pass
        link = await a.pool.connect(b.address, Channel.BULK)  # a member is still served
        await link.send(Ack(seq=7))
        await until(lambda: got == [(a.node_id, Ack(seq=7))])
        async with asyncio.timeout(5):  # the silent one is dropped at its handshake deadline
            await silent_r.read()  # an ERROR frame, then EOF
        await until(lambda: "HANDSHAKE_TIMEOUT" in caplog.text)
        silent_w.close()
        junk_w.close()
        assert link.is_open


def _acks() -> list[Message]:
    return [Ack(seq=i) for i in range(2000)]


def _parts() -> list[Message]:  # 64 KiB frames
    chunk = encode_chunk(np.arange(16384, dtype=np.float32), CodecSpec.parse("none"))
    return [ArPart(round_id=bytes(16), slice=0, chunk=i, data=chunk) for i in range(100)]


@pytest.mark.parametrize(
    ("settings", "make", "most"),
    [
        # bounded by count: the rest waits in the socket and the core
        ({"inbox_messages": 8}, _acks, 8),
        # large frames: the byte bound pauses reading long before the message count would
        # (256 KiB of 64 KiB frames; one more may be parsed)
        ({"inbox_messages": 1000, "inbox_bytes": 256 * 1024}, _parts, 5),
    ],
    ids=["messages", "bytes"],
)
async def test_backpressure_pauses_reading_and_delivers_in_order(
        settings: dict[str, int], make: Callable[[], list[Message]], most: int) -> None:
    messages = make()
    async with loopback_pools(2, **settings) as (a, b):
        release = asyncio.Event()
        got: list[int] = []

        async def slow(link: Link, message: Message) -> None:
            await release.wait()
            got.append(message.seq if isinstance(message, Ack) else message.chunk)  # type: ignore[attr-defined]

        b.dispatch[Channel.BULK][messages[0].TAG] = slow
        link = await a.pool.connect(b.address, Channel.BULK)

        async def send_all() -> None:  # blocks once b's socket buffers are full: b reads no more
            for m in messages:
                await link.send(m)

        sender = asyncio.create_task(send_all())
        await until(lambda: b.pool.get_open(a.address, Channel.BULK) is not None)
        inbound = b.pool.get_open(a.address, Channel.BULK)
        assert inbound is not None
        await until(lambda: inbound.reading_paused)
        assert inbound.inbox_size <= most
        release.set()
        await sender
        await until(lambda: len(got) == len(messages))
        assert got == list(range(len(messages)))


async def test_lost_connection_is_reported_not_graceful() -> None:
    async with loopback_pools(2) as (a, b):
        link = await a.pool.connect(b.address, Channel.CONTROL)
        await until(lambda: b.pool.get_open(a.address, Channel.CONTROL) is not None)
        inbound = b.pool.get_open(a.address, Channel.CONTROL)
        assert inbound is not None
        inbound.force_close()
        await until(lambda: bool(a.lost))
        assert a.lost[0][0] is link and a.lost[0][1] is not None
        graceful = await b.pool.connect(a.address, Channel.BULK)
        await until(lambda: a.pool.get_open(b.address, Channel.BULK) is not None)
        graceful.close()
        await until(lambda: len(a.lost) == 2)
        assert a.lost[1][1] is None


@pytest.mark.parametrize("goodbye", [True, False])
async def test_messages_before_close_are_delivered(goodbye: bool) -> None:
    async with loopback_pools(2, inbox_messages=4) as (a, b):
        release = asyncio.Event()
        got: list[int] = []

        async def slow(link: Link, message: Message) -> None:
            await release.wait()
            assert isinstance(message, Ack)
            got.append(message.seq)

        b.dispatch[Channel.BULK][MsgType.ACK] = slow
        link = await a.pool.connect(b.address, Channel.BULK)
        for i in range(500):
            await link.send(Ack(seq=i))
        if goodbye:
            link.close()  # GOODBYE after the messages
        else:
            link.force_close()  # bare close: FIN after the messages, no goodbye
        await until(lambda: bool(b.lost) or b.pool.get_open(a.address, Channel.BULK) is not None)
        release.set()
        await until(lambda: len(got) == 500)
        assert got == list(range(500))
        await until(lambda: bool(b.lost))
        assert (b.lost[0][1] is None) is goodbye


async def test_message_not_accepted_on_channel_is_rejected_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with loopback_pools(2) as (a, b):
        link = await a.pool.connect(b.address, Channel.CLIENT)
        await link.send(Ack(seq=1))  # CLIENT links carry STATUS_REQUEST only
        await until(lambda: not link.is_open)
        assert isinstance(link.close_reason, RemoteProtocolError)
        assert link.close_reason.code is ErrorCode.UNEXPECTED_MESSAGE
        await until(lambda: bool(b.lost))
        assert caplog.text.count("rejected") == 1 and "ACK not accepted on CLIENT" in caplog.text
