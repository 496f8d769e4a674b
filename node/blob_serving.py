"""Serving members, for ``node.blobs.service.BlobService``: manifests (``BLOB_WANT``), the
chunks that arrive to the members that asked (``BLOB_HAVE``; who asked is an ``Interest``
core: records expire unless the asker asks again, bounded, swept), the provider directory this node
keeps for others (``BLOB_PROVIDE`` / ``BLOB_FIND``: a ``ProviderDirectory`` core whose timer
sweeps expired records) and the one it feeds (every blob held is provided to its directory
members on a change and every ``PROVIDE_EVERY_S``), and chunks (``BLOB_CHUNK_GET`` on BULK).

Chunks: at most ``MAX_UPLOADS_PER_PEER`` chunks are read and sent at once per peer; up to
``MAX_WAITING_PER_PEER`` more wait, further requests are answered ``BUSY``. Every chunk sent
passes a node-wide token bucket of ``upload_rate`` bytes/s (``--blob-upload-rate``). A chunk
goes zstd-compressed when that saves at least 1/16 of it (a 16 KiB sample decides first, so
incompressible data costs one small compression). Disk reads run in the io executor, zstd in
the codec executor (one compressor per codec thread: they are not thread-safe).
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import threading
from collections.abc import Callable, Container
from typing import TYPE_CHECKING

import zstandard

from node.blobs.directory import DIRECTORY_SIZE, ProviderDirectory
from node.blobs.interest import Interest
from node.blobs.manifest import bitmap
from node.bundles.manifest import CHUNK_BYTES
from node.driver import Driver
from node.placement import rank
from node.transport import Handler, Link
from protocol.connection import Channel
from protocol.errors import TransportError
from protocol.messages.blobs import (
    MAX_PROVIDE,
    MAX_PROVIDERS,
    BlobChunk,
    BlobChunkGet,
    BlobFind,
    BlobHave,
    BlobManifest,
    BlobProvide,
    BlobProviders,
    BlobWant,
    ChunkStatus,
)
from protocol.schema import Message
from protocol.tags import MsgType

if TYPE_CHECKING:
    from node.blobs.service import BlobService

MAX_UPLOADS_PER_PEER = 4
MAX_WAITING_PER_PEER = 64
MAX_INTERESTED = 64
MAX_INTERESTED_BLOBS = 1024
INTEREST_TTL_S = 30.0
PROVIDE_TTL_S = 60.0
PROVIDE_EVERY_S = 20.0
#: What ``BlobServer.dispatch`` takes, on which channel.
ROUTES = ((Channel.CONTROL, MsgType.BLOB_WANT), (Channel.CONTROL, MsgType.BLOB_PROVIDE),
          (Channel.CONTROL, MsgType.BLOB_FIND), (Channel.BULK, MsgType.BLOB_CHUNK_GET))


class Bucket:
    """A token bucket: ``await take(n, now)`` waits until ``n`` bytes may go (``rate`` <= 0: no limit)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = rate
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def take(self, n: int, now: Callable[[], float]) -> None:
        if self.rate <= 0:
            return
        async with self._lock:
            t = now()
            self._tokens = min(self.rate, self._tokens + (t - self._at) * self.rate)
            self._at = t
            self._tokens -= n
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)


class BlobServer:
    """Serves members for ``blobs`` (module docstring)."""

    def __init__(self, blobs: BlobService) -> None:
        self._blobs = blobs
        self._ctx = blobs.ctx
        self._store = blobs.store
        self._counters = blobs.counters
        self._bucket = Bucket(blobs.config.upload_rate)
        self._serving: collections.Counter[bytes] = collections.Counter()
        self._slots: dict[bytes, asyncio.Semaphore] = {}
        self._zstd = threading.local()
        self.interest = Interest(now=blobs.ctx.now(), ttl_s=INTEREST_TTL_S, max_blobs=MAX_INTERESTED_BLOBS,
                                 max_peers=MAX_INTERESTED)
        self.provide_now = asyncio.Event()
        self.directory = ProviderDirectory(now=blobs.ctx.now())
        self._sweeper: Driver | None = None
        self._interest_sweeper: Driver | None = None
        self._table: dict[MsgType, Handler] = {
            MsgType.BLOB_WANT: self._on_want, MsgType.BLOB_PROVIDE: self._on_provide,
            MsgType.BLOB_FIND: self._on_find, MsgType.BLOB_CHUNK_GET: self.on_chunk_get,
        }
        assert set(self._table) == {tag for _, tag in ROUTES}

    async def dispatch(self, link: Link, message: Message) -> None:
        await self._table[message.TAG](link, message)

    def start(self) -> None:
        self._sweeper = Driver(self.directory, drain=lambda: None)
        self._interest_sweeper = Driver(self.interest, drain=lambda: None)
        self._ctx.spawn(self._provide_loop())

    def close(self) -> None:
        for driver in (self._sweeper, self._interest_sweeper):
            if driver is not None:
                driver.stop()

    def keep_only(self, live: Container[bytes]) -> None:
        """Forget the records (directory, interest) of members not in ``live``."""
        self.directory.keep_only(live)
        self.interest.keep_only(live)

    # ---- manifests, announcements, the directory --------------------------------------

    async def _on_want(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobWant) and link.peer is not None
        manifest = self._store.manifest(message.blob_id)
        if manifest is None:
            await link.send(BlobManifest(req=message.req, blob_id=message.blob_id, found=False))
            return
        self.interest.add(message.blob_id, link.peer.node_id, now=self._ctx.now())
        if self._interest_sweeper is not None:
            self._interest_sweeper.step()  # the sweep timer, armed while there are records
        held = self._store.chunks_held(message.blob_id)
        await link.send(BlobManifest(req=message.req, blob_id=message.blob_id, found=True, complete=held is None,
                                     have=b"" if held is None else bitmap(held, len(manifest.chunks)),
                                     manifest=manifest.encode()))

    def announce(self, blob_id: bytes, *, force: bool = False) -> None:
        """``BLOB_HAVE`` to the members that asked us for this blob lately (at most twice a
        second; ``force``: the blob is complete, after which they are forgotten)."""
        peers = self.interest.to_announce(blob_id, now=self._ctx.now(), force=force)
        if force:
            self.interest.forget(blob_id)
        if not peers:
            return
        held = self._store.chunks_held(blob_id)
        manifest = self._store.manifest(blob_id)
        if manifest is None:
            return
        msg = BlobHave(blob_id=blob_id, complete=held is None,
                       have=b"" if held is None else bitmap(held, len(manifest.chunks)))
        for peer in peers:
            self._ctx.spawn(self._blobs.send_quietly(peer, msg))

    async def _on_provide(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobProvide) and link.peer is not None
        self.directory.provide(link.peer.node_id, message.blobs, ttl_s=message.ttl_s, now=self._ctx.now())
        if self._sweeper is not None:
            self._sweeper.step()  # the sweep timer, armed while there are records

    async def _on_find(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobFind)
        found = [n for n in self.directory.find(message.blob_id, now=self._ctx.now()) if self._ctx.is_live(n)]
        if self._store.manifest(message.blob_id) is not None:
            found.insert(0, self._ctx.node_id)
        await link.send(BlobProviders(req=message.req, blob_id=message.blob_id,
                                      providers=tuple(found[:MAX_PROVIDERS])))

    async def _provide_loop(self) -> None:
        while True:
            with contextlib.suppress(builtins.TimeoutError):
                async with asyncio.timeout(PROVIDE_EVERY_S):
                    await self.provide_now.wait()
            self.provide_now.clear()
            await asyncio.sleep(0.05)  # gather a burst of changes
            self._provide()

    def _provide(self) -> None:
        held = [i.blob_id for i in self._store.list()] + self._blobs.fetching()
        live = [*self._blobs.live(), self._ctx.node_id]
        by_member: dict[bytes, list[bytes]] = {}
        for blob_id in held:
            for member in rank(blob_id, live)[:DIRECTORY_SIZE]:
                if member != self._ctx.node_id:
                    by_member.setdefault(member, []).append(blob_id)
        for member, blob_ids in by_member.items():
            for i in range(0, len(blob_ids), MAX_PROVIDE):
                msg = BlobProvide(blobs=tuple(blob_ids[i:i + MAX_PROVIDE]), ttl_s=PROVIDE_TTL_S)
                self._ctx.spawn(self._blobs.send_quietly(member, msg))

    # ---- chunks -------------------------------------------------------------------------

    async def on_chunk_get(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobChunkGet) and link.peer is not None
        peer = link.peer.node_id
        if self._serving[peer] >= MAX_WAITING_PER_PEER:
            self._counters["busy"] += 1
            await link.send(BlobChunk(req=message.req, blob_id=message.blob_id, index=message.index,
                                      status=ChunkStatus.BUSY))
            return
        self._serving[peer] += 1
        self._ctx.spawn(self._serve(link, message))

    async def _serve(self, link: Link, message: BlobChunkGet) -> None:
        assert link.peer is not None
        peer = link.peer.node_id
        slot = self._slots.setdefault(peer, asyncio.Semaphore(MAX_UPLOADS_PER_PEER))
        try:
            async with slot:
                loop = asyncio.get_running_loop()
                data = await loop.run_in_executor(self._ctx.executors.io, self._store.read_chunk,
                                                  message.blob_id, message.index)
                if data is None:
                    reply = BlobChunk(req=message.req, blob_id=message.blob_id, index=message.index,
                                      status=ChunkStatus.MISSING)
                else:
                    packed = await loop.run_in_executor(self._ctx.executors.codec, self._deflate, data)
                    await self._bucket.take(len(packed or data), self._ctx.now)
                    reply = BlobChunk(req=message.req, blob_id=message.blob_id, index=message.index,
                                      status=ChunkStatus.OK, compressed=packed is not None, data=packed or data)
                    self._counters["uploaded_bytes"] += len(packed or data)
                    self._counters["uploaded_raw_bytes"] += len(data)
                with contextlib.suppress(TransportError):
                    await link.send(reply)
        finally:
            self._serving[peer] -= 1
            if not self._serving[peer]:
                del self._serving[peer]
                self._slots.pop(peer, None)

    def _deflate(self, data: bytes) -> bytes | None:
        """zstd of ``data`` if that saves at least 1/16 of it. Runs on the codec threads."""
        zstd = getattr(self._zstd, "compressor", None)
        if zstd is None:
            zstd = self._zstd.compressor = zstandard.ZstdCompressor(level=1)
        if len(data) >= 64 * 1024 and len(zstd.compress(data[:16384])) > 15360:
            return None
        packed = zstd.compress(data)
        return packed if len(packed) < len(data) - len(data) // 16 else None


def inflate(data: bytes) -> bytes:
    """One chunk's zstd frame, at most ``CHUNK_BYTES`` decompressed (``zstandard.ZstdError``)."""
    return zstandard.ZstdDecompressor().decompress(data, max_output_size=CHUNK_BYTES)
