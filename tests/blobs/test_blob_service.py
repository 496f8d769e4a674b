"""The blob service's adapter logic with a stand-in node context (no sockets): at most one
directory lookup in flight per fetch however often the core asks for holders, and the holder
side of leased copies (held, refused past the bound, released back to an ordinary entry)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from node.blob_copies import BlobCopies
from node.blobs.fetch import NeedHolders
from node.blobs.service import BlobService, _Fetch
from node.blobs.store import BlobStore
from protocol.messages.blobs import BlobLease, BlobLeaseReply, BlobRelease, LeaseStatus
from protocol.schema import Message

SELF = b"\x00" * 32


class _Ctx:
    """What the service uses of a ``NodeContext``: spawned coroutines are kept, not run."""

    def __init__(self) -> None:
        self.node_id = SELF
        self.t = 0.0
        self.spawned: list[Coroutine[Any, Any, None]] = []

    def now(self) -> float:
        return self.t

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.spawned.append(coro)

    def members(self) -> list[Any]:
        return []

    def is_live(self, node: bytes) -> bool:
        return True


class _FakeCore:
    """A fetch core that asks for holders each time it is drained."""

    blob_id = b"\x01" * 32
    state = None

    def messages_to_send(self) -> list[Any]:
        return []

    def __init__(self) -> None:
        self._events: list[Any] = []

    def need(self, n: int) -> None:
        self._events.extend(NeedHolders() for _ in range(n))

    def next_event(self) -> Any:
        return self._events.pop(0) if self._events else None


class _Peer:
    def __init__(self, node_id: bytes) -> None:
        self.node_id = node_id


class _Link:
    def __init__(self, node_id: bytes) -> None:
        self.peer = _Peer(node_id)
        self.sent: list[Message] = []

    async def send(self, message: Message) -> None:
        self.sent.append(message)


def _service(tmp_path: Path) -> tuple[BlobService, _Ctx]:
    ctx = _Ctx()
    return BlobService(ctx, store=BlobStore(tmp_path / "blobs", max_bytes=1 << 20)), ctx  # type: ignore[arg-type]


async def test_at_most_one_rediscovery_in_flight_per_fetch(tmp_path: Path) -> None:
    blobs, ctx = _service(tmp_path)
    core = _FakeCore()
    fetch = _Fetch(core, None, asyncio.get_running_loop().create_future())  # type: ignore[arg-type]
    core.need(3)
    blobs._drain(fetch)
    core.need(2)
    blobs._drain(fetch)
    assert len(ctx.spawned) == 1 and fetch.rediscovering
    lookups = 0

    async def find(blob_id: bytes, hints: tuple[bytes, ...]) -> list[bytes]:
        nonlocal lookups
        lookups += 1
        return []

    async def manifests(blob_id: bytes, nodes: list[bytes]) -> list[Any]:
        return []

    blobs._find = find  # type: ignore[method-assign]
    blobs._manifests = manifests  # type: ignore[method-assign]
    await ctx.spawned.pop()
    assert lookups == 1 and not fetch.rediscovering
    core.need(1)
    blobs._drain(fetch)  # the next stall may ask again
    assert len(ctx.spawned) == 1
    ctx.spawned.pop().close()


async def test_a_lease_holds_the_blob_until_released_and_is_refused_past_the_bound(tmp_path: Path) -> None:
    blobs, ctx = _service(tmp_path)
    blob_id = blobs.store.put_bytes(b"x" * 1000)
    copies = blobs.copies = BlobCopies(blobs, max_leases=1)
    copies.start()
    a, b = _Link(b"\x0a" * 32), _Link(b"\x0b" * 32)
    await copies.dispatch(a, BlobLease(req=5, blob_id=blob_id, lease_s=7200.0 / 2))  # type: ignore[arg-type]
    assert a.sent == [BlobLeaseReply(req=5, blob_id=blob_id, status=LeaseStatus.HELD, lease_s=600.0)]
    assert blobs.store.held(blob_id) and blobs.store.gc() == 0  # gc keeps a held blob
    await copies.dispatch(b, BlobLease(req=6, blob_id=blob_id, lease_s=60.0))  # type: ignore[arg-type]
    (refused,) = b.sent
    assert isinstance(refused, BlobLeaseReply) and refused.status is LeaseStatus.REFUSED
    await copies.dispatch(a, BlobRelease(blob_id=blob_id))  # type: ignore[arg-type]
    assert not blobs.store.held(blob_id) and blobs.store.gc() == 1000  # an ordinary entry again
    assert ctx.spawned == []
    copies.close()
