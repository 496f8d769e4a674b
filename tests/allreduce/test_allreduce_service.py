"""``AllReduceService`` on in-memory links: what it asks of a ``NodeContext`` (``node_id``,
``now``, ``spawn``, ``link_to``, ``send``, ``executors.codec``) is faked, every message goes
through the real codec and schema, and its ``stats()`` are checked."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from node.allreduce import AllReduceError, AllReduceSettings
from node.allreduce.service import AllReduceService
from node.allreduce.testing import exact_mean, node_ids
from node.core import Histogram
from protocol.connection import Channel
from protocol.errors import ConfigError, TimeoutError, TransportError
from protocol.messages.tensor import ArReport
from protocol.schema import Message, decode_body, encode_body
from protocol.tags import MsgType

pytestmark = pytest.mark.timeout(60)


class FakeLink:
    """``src``'s link to ``dest``: ``send`` hands the message (encoded and decoded) to the
    handler ``dest`` registered, with the reverse link, as a link's reader would."""

    def __init__(self, net: FakeNet, src: bytes, dest: bytes, channel: Channel) -> None:
        self.net, self.src, self.channel = net, src, channel
        self.peer = SimpleNamespace(node_id=dest)
        self.closed = asyncio.Event()
        self.close_reason: BaseException | None = None

    async def send(self, msg: Message) -> None:
        dest = self.peer.node_id
        if dest not in self.net.services:
            raise TransportError("gone")
        handler = self.net.services[dest].handlers()[(self.channel, msg.TAG)]
        await handler(self.net.link(dest, self.src, self.channel), decode_body(encode_body(msg)))  # type: ignore[arg-type]

    def abort(self, code: object, reason: str) -> None:
        self.close_reason = TransportError(reason)
        self.closed.set()


class FakeCtx:
    def __init__(self, net: FakeNet, node_id: bytes) -> None:
        self.net, self.node_id = net, node_id
        self.executors = SimpleNamespace(codec=net.pool)

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.net.tasks.add(task)
        task.add_done_callback(self.net.tasks.discard)

    async def link_to(self, node_id: bytes, *, channel: Channel = Channel.BULK) -> FakeLink:
        if node_id not in self.net.services:
            raise TransportError("not a live member")
        return self.net.link(self.node_id, node_id, channel)

    async def send(self, node_id: bytes, message: Message, *, channel: Channel = Channel.BULK) -> None:
        await (await self.link_to(node_id, channel=channel)).send(message)


class FakeNet:
    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.pool = pool
        self.services: dict[bytes, AllReduceService] = {}
        self.links: dict[tuple[bytes, bytes, Channel], FakeLink] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def link(self, src: bytes, dest: bytes, channel: Channel) -> FakeLink:
        key = (src, dest, channel)
        if key not in self.links:
            self.links[key] = FakeLink(self, src, dest, channel)
        return self.links[key]

    def add(self, node_id: bytes, settings: AllReduceSettings | None = None) -> AllReduceService:
        service = AllReduceService(FakeCtx(self, node_id), settings=settings or AllReduceSettings())  # type: ignore[arg-type]
        self.services[node_id] = service
        return service


@asynccontextmanager
async def mesh(n: int) -> AsyncIterator[tuple[list[bytes], list[AllReduceService]]]:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        net = FakeNet(pool)
        ids = node_ids(n)
        services = [net.add(i) for i in ids]
        for s in services:
            await s.start()
        try:
            yield ids, services
        finally:
            for s in services:
                await s.close()
            for task in list(net.tasks):
                task.cancel()
            await asyncio.gather(*net.tasks, return_exceptions=True)


def inputs(n: int, numel: int) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.standard_normal(numel).astype(np.float32) for _ in range(n)]


async def test_handlers_cover_every_all_reduce_tag() -> None:
    async with mesh(1) as (_ids, (service,)):
        assert service.name == "allreduce"
        assert sorted((c.name, t.name) for c, t in service.handlers()) == sorted(
            [("BULK", "AR_PART"), ("BULK", "AR_AVERAGE")]
            + [("CONTROL", t.name) for t in MsgType if t.name in (
                "AR_BEGIN", "AR_REPORT", "AR_COMMIT", "AR_FINISH", "AR_CANCEL", "AR_TAKEOVER")])


async def test_average_and_stats() -> None:
    async with mesh(3) as (ids, services):
        xs = inputs(3, 5000)
        outs = await asyncio.gather(*(s.all_reduce(x, group=ids, timeout=20) for s, x in zip(services, xs, strict=True)))
        want = exact_mean(xs, [0, 1, 2])
        for out in outs:
            assert np.array_equal(out.tensor, want) and out.contributors == tuple(ids) and out.dropped == {}
        stats = [s.stats() for s in services]
        for st in stats:
            assert st["allreduce_rounds_total"] == {"finished": 1, "failed": 0, "timeout": 0, "cancelled": 0}
            hist = st["allreduce_round_seconds"]
            assert isinstance(hist, Histogram) and hist.count == 1
            assert (st["allreduce_rounds_active"], st["allreduce_pending_rounds"], st["allreduce_pending_bytes"]) == (0, 0, 0)
        sent = sum(st["allreduce_tensor_bytes_total"]["sent"] for st in stats)  # type: ignore[index]
        received = sum(st["allreduce_tensor_bytes_total"]["received"] for st in stats)  # type: ignore[index]
        # every member sends 2/3 of its tensor as parts and its slice's average to 2 others
        assert sent == received == 3 * 4 * 5000 * 2 * 2 // 3
        # a member asking late (it missed the AR_FINISH) is answered by the ended round
        late = ArReport(round_id=outs[0].round_id, epoch=1, leader=0, holdings=(), averages=(), exclusions=())
        ended = stats[0]["allreduce_dropped_messages_total"]["ended"]  # type: ignore[index]
        await services[1].handlers()[(Channel.CONTROL, MsgType.AR_REPORT)](
            services[0]._ctx.net.link(ids[1], ids[0], Channel.CONTROL), late)  # type: ignore[attr-defined]
        for _ in range(100):
            await asyncio.sleep(0.001)
            if services[0].stats()["allreduce_dropped_messages_total"]["ended"] > ended:  # type: ignore[index]
                break
        assert services[0].stats()["allreduce_dropped_messages_total"]["ended"] == ended + 1  # type: ignore[index]
        # default keys: the next call on the same group is another round
        outs2 = await asyncio.gather(*(s.all_reduce(x, group=ids) for s, x in zip(services, xs, strict=True)))
        assert outs2[0].round_id != outs[0].round_id


async def test_lossy_codec_gives_every_member_the_same_bits() -> None:
    async with mesh(3) as (ids, services):
        xs = inputs(3, 20_000)
        outs = await asyncio.gather(*(s.all_reduce(x, group=ids, codec="int8", key="lossy")
                                      for s, x in zip(services, xs, strict=True)))
        assert np.array_equal(outs[0].tensor, outs[1].tensor) and np.array_equal(outs[0].tensor, outs[2].tensor)
        assert 0 < np.abs(outs[0].tensor - exact_mean(xs, [0, 1, 2])).max() < 0.05


async def test_a_late_member_finds_the_messages_held_for_it() -> None:
    async with mesh(2) as (ids, (a, b)):
        xs = inputs(2, 100)
        first = asyncio.create_task(a.all_reduce(xs[0], group=ids, key="late"))
        for _ in range(100):
            await asyncio.sleep(0.001)
            if b.pending_rounds:
                break
        assert b.pending_rounds == 1 and b.stats()["allreduce_pending_bytes"] > 0
        out_b = await b.all_reduce(xs[1], group=ids, key="late")
        out_a = await first
        assert np.array_equal(out_a.tensor, out_b.tensor) and b.pending_rounds == 0
        with pytest.raises(ConfigError):  # a key runs once
            await a.all_reduce(xs[0], group=ids, key="late")


async def test_timeout_cancel_and_close_are_counted() -> None:
    async with mesh(2) as (ids, (a, b)):
        x = np.ones(10, np.float32)
        with pytest.raises(TimeoutError):
            await a.all_reduce(x, group=ids, timeout=0.2, key="b is silent")
        assert a.stats()["allreduce_rounds_total"]["timeout"] == 1  # type: ignore[index]
        call = asyncio.create_task(a.all_reduce(x, group=ids, key="closing"))
        await asyncio.sleep(0.01)
        assert a.stats()["allreduce_rounds_active"] == 1
        await a.close()
        with pytest.raises(AllReduceError):
            await call
        assert a.stats()["allreduce_rounds_total"] == {"finished": 0, "failed": 0, "timeout": 1, "cancelled": 1}
        with pytest.raises(AllReduceError):
            await a.all_reduce(x, group=ids)
        assert b.stats()["allreduce_pending_rounds"] == 2  # b never started either round


async def test_a_member_that_is_gone_is_dropped() -> None:
    async with mesh(1) as ([me], (a,)):
        x = np.arange(4, dtype=np.float32)
        ghost = bytes(32)
        out = await a.all_reduce(x, group=[me, ghost], timeout=10, min_contributors=1)
        assert out.contributors == (me,) and np.array_equal(out.tensor, x)
        assert a.stats()["allreduce_rounds_total"]["finished"] == 1  # type: ignore[index]
