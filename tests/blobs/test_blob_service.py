"""The blob service's adapter logic with a stand-in node context (no sockets): at most one
directory lookup in flight per fetch however often the core asks for holders; the periodic
lookups of a running fetch ask only members it does not know yet, and random members at most
once per ``FALLBACK_EVERY_S``; and the holder side of leased copies (held, refused past the
bound, released back to an ordinary entry)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from node.blob_copies import BlobCopies
from node.blobs import service as blob_service
from node.blobs.fetch import BlobFetch, FetchState, NeedHolders
from node.blobs.service import BlobService, _Fetch, lookups
from node.blobs.store import BlobStore
from protocol.messages.blobs import (
    BlobLease,
    BlobLeaseReply,
    BlobManifest,
    BlobRelease,
    LeaseStatus,
)
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
    state = FetchState.RUNNING
    holders: list[bytes] = []
    avoided: frozenset[bytes] = frozenset()
    dropped: frozenset[bytes] = frozenset()

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
    fetch = _Fetch(core, None, asyncio.get_running_loop().create_future(), lookups(now=0.0))  # type: ignore[arg-type]
    fetch.lookups.begin(now=0.0)  # the fetch's first lookup
    fetch.lookups.end(found_new=True)
    core.need(3)
    blobs._drain(fetch)
    core.need(2)
    blobs._drain(fetch)
    assert len(ctx.spawned) == 1 and fetch.lookups.in_flight
    asked = 0

    async def find(blob_id: bytes, hints: tuple[bytes, ...], pacing: Any) -> list[bytes]:
        nonlocal asked
        asked += 1
        return []

    async def manifests(blob_id: bytes, nodes: list[bytes]) -> list[Any]:
        return []

    blobs._find = find  # type: ignore[method-assign]
    blobs._manifests = manifests  # type: ignore[method-assign]
    await ctx.spawned.pop()
    assert asked == 1 and not fetch.lookups.in_flight
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


async def test_a_running_fetch_looks_up_again_asks_only_new_members_and_falls_back_rarely(tmp_path: Path) -> None:
    blobs, ctx = _service(tmp_path)
    blob_id = blobs.store.put_bytes(b"y" * 3000)
    manifest = blobs.store.manifest(blob_id)
    assert manifest is not None
    seeder, peer = b"\x0a" * 32, b"\x0b" * 32
    others = [bytes([0x20 + i]) * 32 for i in range(20)]
    core = BlobFetch(blob_id=blob_id, manifest=manifest, holders=[seeder], now=0.0, rng=random.Random(1))
    fetch = _Fetch(core, None, asyncio.get_running_loop().create_future(), lookups(now=0.0))
    fetch.lookups.begin(now=0.0)
    fetch.lookups.end(found_new=True)
    directory: list[bytes] = []
    asked: list[list[bytes]] = []

    async def directory_holders(blob_id: bytes) -> list[bytes]:
        return list(directory)

    async def manifests(blob_id: bytes, nodes: list[bytes]) -> list[tuple[bytes, BlobManifest]]:
        asked.append(nodes)
        return [(n, BlobManifest(req=0, blob_id=blob_id, found=True, complete=False, have=b"\x00",
                                 manifest=manifest.encode())) for n in nodes if n == peer]

    blobs.directory_holders = directory_holders  # type: ignore[method-assign]
    blobs._manifests = manifests  # type: ignore[method-assign]
    blobs.live = lambda: list(others)  # type: ignore[method-assign]

    async def tick(t: float) -> None:
        ctx.t = t
        blobs._look_up(fetch)
        while ctx.spawned:
            await ctx.spawned.pop()

    await tick(0.5)
    assert asked == []  # not due yet
    directory[:] = [seeder, peer]
    await tick(1.0)  # the seeder is known: only the newcomer is asked
    assert asked == [[peer]] and peer in fetch.partial and blobs.counters["holders_found"] == 1
    await tick(2.0)
    assert asked[-1] == []  # nobody new: the next one is 2 s later
    await tick(3.0)
    assert len(asked) == 2
    directory[:] = []
    await tick(4.0)  # the directory knows nobody: 8 random members, once
    assert len(asked[-1]) == blob_service.MAX_FALLBACK and set(asked[-1]) <= set(others)
    await tick(8.0)
    assert len(asked) == 4 and asked[-1] == []  # no second fallback within 10 s
    await tick(12.0)
    assert len(asked) == 4  # backed off: the next lookup is 8 s after the last
    await tick(20.0)
    assert len(asked[-1]) == blob_service.MAX_FALLBACK
    assert blobs.counters["lookups"] == len(asked) == 5  # at 1, 2, 4, 8 and 20 s
