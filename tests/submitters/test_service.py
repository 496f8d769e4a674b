"""``SubmitterService`` in one process over fake links: paced paging, persistence, updates."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from node.context import NodeContext
from node.submitters.log import make_entry
from node.submitters.service import SubmitterService
from node.submitters.store import load_log_entries, log_path
from node.transport import Link
from protocol import crypto
from protocol.connection import Channel
from protocol.messages.submitters import (
    NO_PREV,
    SignedEntry,
    SubmitterAction,
    SubmittersEntries,
    SubmittersList,
    SubmittersReply,
    SubmittersSync,
    SubmittersUpdate,
    entry_digest,
)
from protocol.schema import Message
from protocol.tags import MsgType

OWNER = crypto.identity_from_bytes(bytes([1]) * 32)
OWNER_PUB = crypto.node_id_of(OWNER)


def _entries(n: int) -> list[SignedEntry]:
    out, prev = [], NO_PREV
    for seq in range(1, n + 1):
        e = make_entry(OWNER, seq=seq, prev=prev, action=SubmitterAction.GRANT,
                       key=seq.to_bytes(32, "big"), name=f"k{seq}", now=float(seq))
        out.append(e)
        prev = entry_digest(e.body)
    return out


class Net:
    """Services by node id; a link delivers to the other end's handler table."""

    def __init__(self) -> None:
        self.services: dict[bytes, SubmitterService] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.sent: list[tuple[bytes, bytes, Message]] = []
        self.io = concurrent.futures.ThreadPoolExecutor(1)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def link(self, src: bytes, dst: bytes) -> Link:
        net = self

        class FakeLink:
            peer = SimpleNamespace(node_id=src)  # as the receiving end sees it

            async def send(self, message: Message) -> None:
                net.deliver(dst, src, message)

            def send_nowait(self, message: Message) -> bool:
                net.sent.append((dst, src, message))
                return True

            def describe(self) -> str:
                return f"fake {src.hex()[:4]}"

        return cast(Link, FakeLink())

    def deliver(self, src: bytes, dst: bytes, message: Message) -> None:
        self.sent.append((src, dst, message))
        handler = self.services[dst].handlers()[(Channel.CONTROL, message.TAG)]
        self.spawn(cast(Coroutine[Any, Any, None], handler(self.link(src, dst), message)))

    def add(self, node_id: bytes, data_dir: Path) -> SubmitterService:
        net = self

        class Ctx:
            def __init__(self) -> None:
                self.node_id, self.data_dir, self.spawn = node_id, data_dir, net.spawn
                self.executors = SimpleNamespace(io=net.io)

            def members(self) -> list[Any]:
                return [SimpleNamespace(node_id=n) for n in sorted(net.services)]

            def is_live(self, other: bytes) -> bool:
                return other in net.services

            async def send(self, other: bytes, message: Message, *, channel: Channel) -> None:
                assert channel is Channel.CONTROL
                net.deliver(node_id, other, message)

        data_dir.mkdir(parents=True, exist_ok=True)
        service = SubmitterService(cast(NodeContext, Ctx()), owner=OWNER_PUB)
        self.services[node_id] = service
        return service

    async def settle(self) -> None:
        for _ in range(200):
            await asyncio.sleep(0.001)
            if not self.tasks:
                return
        raise AssertionError("the services kept talking")


async def test_a_long_log_is_sent_one_page_per_round_trip(tmp_path: Path) -> None:
    net = Net()
    a, b = net.add(b"a" * 32, tmp_path / "a"), net.add(b"b" * 32, tmp_path / "b")
    for e in _entries(600):
        assert a._apply(e, source="test")
    await net.settle()
    await a._send_sync(b"b" * 32)  # "I have 600": b answers "I have 0", a pages to it
    await net.settle()
    assert b.version == 600 and b.log_view().head == a.log_view().head
    pages = [m for _, _, m in net.sent if isinstance(m, SubmittersEntries)]
    assert [len(p.entries) for p in pages] == [256, 256, 88]
    assert [m.version for s, _, m in net.sent if isinstance(m, SubmittersSync) and s == b"b" * 32] == [0, 256, 512, 600]
    assert len(load_log_entries(log_path(tmp_path / "b"))[0]) == 600
    reloaded = net.add(b"c" * 32, tmp_path / "b")  # a restart reads the persisted log
    assert reloaded.version == 600 and reloaded.authorized((600).to_bytes(32, "big"))
    net.io.shutdown()


async def test_a_client_update_is_applied_persisted_and_spread(tmp_path: Path) -> None:
    net = Net()
    a, b = net.add(b"a" * 32, tmp_path / "a"), net.add(b"b" * 32, tmp_path / "b")
    (e1, e2) = _entries(2)
    client = net.link(b"z" * 32, b"a" * 32)
    update = a.handlers()[(Channel.CLIENT, MsgType.SUBMITTERS_UPDATE)]
    await update(client, SubmittersUpdate(req=7, entry=e2))  # not the next one
    await update(client, SubmittersUpdate(req=8, entry=e1))
    await update(client, SubmittersUpdate(req=9, entry=e1))  # again: fine, no change
    await net.settle()
    replies = [m for _, _, m in net.sent if isinstance(m, SubmittersReply)]
    assert [(r.req, r.ok, r.version) for r in replies] == [(7, False, 0), (8, True, 1), (9, True, 1)]
    assert "does not follow" in replies[0].message and "already" in replies[2].message
    assert b.authorized((1).to_bytes(32, "big")) and not b.authorized((2).to_bytes(32, "big"))
    assert a.authorized(OWNER_PUB) and a.owner == OWNER_PUB and a.describe(OWNER_PUB).startswith("ed25519:")
    listing = a.handlers()[(Channel.CLIENT, MsgType.SUBMITTERS_LIST)]
    await listing(client, SubmittersList(req=10))
    reply = net.sent[-1][2]
    assert isinstance(reply, SubmittersReply) and reply.entries == (e1,) and reply.owner == OWNER_PUB
    assert a.stats()["submitters_updates_total"] == 3.0
    net.io.shutdown()
