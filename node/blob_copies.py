"""Leased copies of blobs on other members (PROTOCOL.md §14.6), for ``node.blobs.service``.

The requester side runs ``node.blobs.replicas.Replicator`` with a ``Driver``: each
``BlobLease`` it emits is asked (``BlobService.ask``, one in flight per copy) and its answer,
or its absence, fed back; ``BlobRelease`` goes without an answer. ``ensure(id, k, wait_s)``
starts (or changes) a target and waits until k copies are confirmed or ``wait_s`` passed;
``replicate`` is the same but raises ``ReplicationTimeout`` (with the copies confirmed so far)
when fewer than k were; the copies are still sought and renewed until ``release``.

The holder side runs ``node.blobs.replicas.Leases`` with a ``Driver`` whose timer sweeps
expired leases: a granted lease holds the blob in the store (``BlobStore.hold``) and starts a
fetch if it is not here; the answer is ``HELD`` once the whole blob is, ``FETCHING`` before,
``FAILED`` (once) when the fetch failed, ``REFUSED`` past the bounds. When the last lease on a
blob ends it is an ordinary cache entry again. A lease is granted for at most
``max_grant_s`` (``--blob-max-lease-s``, ``MAX_GRANT_S`` by default), so a requester that
died pins nothing for longer than that.
"""

from __future__ import annotations

import asyncio
import builtins
from typing import TYPE_CHECKING

from node.blobs.replicas import (
    Leases,
    ReplicaSettings,
    ReplicationTimeout,
    Replicator,
)
from node.core import Stats
from node.driver import Driver
from node.transport import Link
from protocol.connection import Channel
from protocol.errors import StarmeshError
from protocol.messages.blobs import BlobLease, BlobLeaseReply, BlobRelease, LeaseStatus
from protocol.schema import Message
from protocol.tags import MsgType

if TYPE_CHECKING:
    from node.blobs.service import BlobService

#: Longest lease granted to anyone (seconds), whatever was asked.
MAX_GRANT_S = 600.0
#: Leases granted at most, in all and to one requester.
MAX_LEASES = 4096
MAX_LEASES_PER_REQUESTER = 1024
#: The CONTROL messages ``BlobCopies.dispatch`` takes (``BLOB_LEASE_REPLY`` is the service's: a reply).
TAGS = (MsgType.BLOB_LEASE, MsgType.BLOB_RELEASE)


class BlobCopies:
    """Both ends of leased copies for ``blobs`` (module docstring)."""

    def __init__(self, blobs: BlobService, *, settings: ReplicaSettings | None = None,
                 max_leases: int = MAX_LEASES, max_leases_per_requester: int = MAX_LEASES_PER_REQUESTER,
                 max_grant_s: float = MAX_GRANT_S) -> None:
        self._blobs = blobs
        self._max_grant_s = max_grant_s
        self.replicator = Replicator(node_id=blobs.ctx.node_id, settings=settings)
        self.leases = Leases(max_total=max_leases, max_per_requester=max_leases_per_requester)
        self._waiters: dict[bytes, list[tuple[int, asyncio.Future[None]]]] = {}
        self._failed: dict[bytes, str] = {}
        self._asking: Driver | None = None
        self._sweeping: Driver | None = None

    async def dispatch(self, link: Link, message: Message) -> None:
        if isinstance(message, BlobLease):
            await self._on_lease(link, message)
        elif isinstance(message, BlobRelease):
            await self._on_release(link, message)

    def start(self) -> None:
        self._asking = Driver(self.replicator, drain=self._drain_replicator)
        self._sweeping = Driver(self.leases, drain=self._drain_leases)

    def close(self) -> None:
        for driver in (self._asking, self._sweeping):
            if driver is not None:
                driver.stop()
        for waiters in self._waiters.values():
            for _, fut in waiters:
                fut.cancel()

    def on_members(self) -> None:
        self.replicator.set_members(self._blobs.live(), now=self._blobs.ctx.now())
        self._step()

    def stats(self) -> Stats:
        return {**self.replicator.stats(), **self.leases.stats()}

    # ---- requester ------------------------------------------------------------------

    async def ensure(self, blob_id: bytes, copies: int, *, wait_s: float) -> list[bytes]:
        """Keep ``copies`` leased copies of ``blob_id`` on other members; the members holding
        one once ``copies`` are confirmed or ``wait_s`` passed (maybe fewer). ``ReplicaLimit``,
        ``BlobUnavailable`` (nobody holds the blob)."""
        blobs = self._blobs
        here = blobs.store.has(blob_id)
        known = await blobs.directory_holders(blob_id)
        if not here and not known:
            raise blobs.unavailable(blob_id)
        now = blobs.ctx.now()
        self.replicator.set_members(blobs.live(), now=now)
        self.replicator.replicate(blob_id, copies, now=now, known=known,
                                  hints=[blobs.ctx.node_id, *known] if here else known)
        self._step()
        if len(self.replicator.confirmed(blob_id)) < copies and wait_s > 0:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiters = self._waiters.setdefault(blob_id, [])
            waiters.append((copies, fut))
            try:
                async with asyncio.timeout(wait_s):
                    await fut
            except builtins.TimeoutError:
                pass
            finally:
                waiters.remove((copies, fut))
                if not waiters:
                    self._waiters.pop(blob_id, None)
        return list(self.replicator.confirmed(blob_id))

    async def replicate(self, blob_id: bytes, copies: int, *, timeout: float) -> list[bytes]:
        """``ensure``, but ``ReplicationTimeout`` when fewer than ``copies`` were confirmed."""
        holders = await self.ensure(blob_id, copies, wait_s=timeout)
        if len(holders) < copies:
            raise ReplicationTimeout(f"{len(holders)} of {copies} copies of {blob_id.hex()[:16]}... confirmed "
                                     f"within {timeout}s (still trying)", holders=tuple(holders))
        return holders

    def release(self, blob_id: bytes) -> None:
        self.replicator.release(blob_id)
        self._step()
        for _, fut in self._waiters.get(blob_id, ()):
            if not fut.done():
                fut.set_result(None)

    def _step(self) -> None:
        if self._asking is not None:
            self._asking.step()

    def _drain_replicator(self) -> None:
        blobs = self._blobs
        for send in self.replicator.messages_to_send():
            if isinstance(send.message, BlobLease):
                blobs.ctx.spawn(self._ask(send.dest, send.message))
            else:
                blobs.ctx.spawn(blobs.send_quietly(send.dest, send.message))
        while (event := self.replicator.next_event()) is not None:
            for copies, fut in self._waiters.get(event.blob_id, ()):
                if len(event.holders) >= copies and not fut.done():
                    fut.set_result(None)

    async def _ask(self, node: bytes, message: BlobLease) -> None:
        blobs = self._blobs
        try:
            reply = await blobs.ask(node, message, channel=Channel.CONTROL)
        except (StarmeshError, builtins.TimeoutError):
            reply = None
        if isinstance(reply, BlobLeaseReply):
            self.replicator.on_reply(node, message.blob_id, reply.status, lease_s=reply.lease_s, now=blobs.ctx.now())
        else:
            self.replicator.on_no_reply(node, message.blob_id, now=blobs.ctx.now())
        self._step()

    # ---- holder ---------------------------------------------------------------------

    async def _on_lease(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobLease) and link.peer is not None
        blobs, requester, blob_id = self._blobs, link.peer.node_id, message.blob_id
        lease_s = min(message.lease_s, self._max_grant_s)

        def answer(status: LeaseStatus, text: str = "", granted: float = 0.0) -> BlobLeaseReply:
            return BlobLeaseReply(req=message.req, blob_id=blob_id, status=status, lease_s=granted, message=text)

        failed = self._failed.pop(blob_id, None)
        if failed is not None and not blobs.store.has(blob_id):
            self.leases.release(requester, blob_id)
            self._sweep()
            await link.send(answer(LeaseStatus.FAILED, failed[:1000]))
            return
        if not self.leases.grant(requester, blob_id, lease_s, now=blobs.ctx.now()):
            await link.send(answer(LeaseStatus.REFUSED, f"{len(self.leases)} leases granted already"))
            return
        blobs.store.hold(blob_id)
        self._sweep()
        if blobs.store.has(blob_id):
            await link.send(answer(LeaseStatus.HELD, granted=lease_s))
            return
        if not blobs.fetch_running(blob_id):
            blobs.ctx.spawn(self._fetch_for_lease(blob_id, message.hints))
        await link.send(answer(LeaseStatus.FETCHING, granted=lease_s))

    async def _fetch_for_lease(self, blob_id: bytes, hints: tuple[bytes, ...]) -> None:
        try:
            await self._blobs.get(blob_id, holders=hints)
        except (StarmeshError, OSError) as exc:
            if self.leases.leased(blob_id):
                self._failed[blob_id] = str(exc) or type(exc).__name__

    async def _on_release(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobRelease) and link.peer is not None
        self.leases.release(link.peer.node_id, message.blob_id)
        self._sweep()

    def _sweep(self) -> None:
        if self._sweeping is not None:
            self._sweeping.step()

    def _drain_leases(self) -> None:
        while (event := self.leases.next_event()) is not None:
            self._blobs.store.release(event.blob_id)
            self._failed.pop(event.blob_id, None)
