"""The node's blob service: the asyncio adapter of ``node.blobs.fetch`` over ``node.blobs.store``.

It serves members (CONTROL: ``BlobWant`` -> ``BlobManifest``, ``BlobHave``, the provider
directory ``BlobProvide`` / ``BlobFind`` -> ``BlobProviders``; BULK: ``BlobChunkGet`` ->
``BlobChunk``, zstd when it shrinks the chunk) and clients (CLIENT: put, get, list, pin, gc;
PROTOCOL.md §14), and gives other services ``await put(data_or_path) -> id`` and
``await get(id) -> Path``.

A fetch: ask the directory members of the id (the first ``DIRECTORY_SIZE`` live members in
rendezvous order) who holds it, ask those holders (and any hints) for the manifest, then run
one ``BlobFetch`` core with a ``Driver``; every verified chunk goes to the store at once and is
served to others from then on (swarming); holders that are partial are asked again for what
they have every ``POLL_S``. Uploads are bounded: ``MAX_UPLOADS_PER_PEER`` at once per peer, a
node-wide token bucket of ``config.upload_rate`` bytes/s. Disk work runs in the io executor,
zstd in the codec executor.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import dataclasses
import itertools
import logging
import random
import threading
from pathlib import Path
from typing import Any

import zstandard

from discovery.events import MemberEvent
from node.blobs.config import BlobConfig
from node.blobs.fetch import (
    BlobFetch,
    ChunkVerified,
    FetchDone,
    FetchFailed,
    FetchSettings,
    FetchState,
    HolderBlamed,
    NeedHolders,
)
from node.blobs.manifest import BlobError, ManifestBuilder, bitmap, decode_manifest, from_bitmap
from node.blobs.store import BlobStore, StoreFull
from node.bundles.manifest import CHUNK_BYTES
from node.context import Handlers, NodeContext
from node.core import Stats
from node.driver import Driver
from node.membership import LIVE
from node.placement import rank
from node.transport import Handler, Link
from protocol.connection import Channel
from protocol.crypto import short_id
from protocol.errors import ErrorCode, StarmeshError, TransportError
from protocol.messages.blobs import (
    MAX_PROVIDE,
    MAX_PROVIDERS,
    BlobChunk,
    BlobChunkGet,
    BlobData,
    BlobEntry,
    BlobErrorCode,
    BlobFind,
    BlobGc,
    BlobGet,
    BlobHave,
    BlobList,
    BlobListReply,
    BlobManifest,
    BlobPin,
    BlobProvide,
    BlobProviders,
    BlobPut,
    BlobReply,
    BlobWant,
    ChunkStatus,
)
from protocol.schema import Message
from protocol.tags import MsgType

log = logging.getLogger("starmesh.blobs")

DIRECTORY_SIZE = 3
PROVIDE_TTL_S = 60.0
PROVIDE_EVERY_S = 20.0
POLL_S = 1.0
REQUEST_TIMEOUT_S = 10.0
MAX_UPLOADS_PER_PEER = 4
MAX_WAITING_PER_PEER = 64
MAX_RECORDS = 100_000
MAX_CLIENT_UPLOADS = 4
MAX_FALLBACK = 8


class BlobUnavailable(BlobError):
    """No live member holds the blob, or none could serve it."""


class _Bucket:
    """A token bucket: ``await take(n)`` waits until ``n`` bytes may go."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = rate
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def take(self, n: int, now: Any) -> None:
        if self.rate <= 0:
            return
        async with self._lock:
            t = now()
            self._tokens = min(self.rate, self._tokens + (t - self._at) * self.rate)
            self._at = t
            self._tokens -= n
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)


class _Fetch:
    def __init__(self, core: BlobFetch, driver: Driver | None, done: asyncio.Future[Path]) -> None:
        self.core = core
        self.driver = driver
        self.done = done
        self.writes: set[asyncio.Future[None]] = set()
        self.partial: set[bytes] = set()


class BlobService:
    """Serves blobs (module docstring)."""

    name = "blobs"

    def __init__(self, ctx: NodeContext, *, store: BlobStore, config: BlobConfig | None = None,
                 fetch: FetchSettings | None = None, rng: random.Random | None = None) -> None:
        self._ctx = ctx
        self.store = store
        self.config = config or BlobConfig()
        self._fetch_settings = fetch or FetchSettings()
        self._rng = rng or random.Random()
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._reqs = itertools.count(1)
        self._records: dict[bytes, dict[bytes, float]] = {}
        self._fetches: dict[bytes, _Fetch] = {}
        self._results: dict[bytes, asyncio.Future[Path]] = {}
        self._serving: collections.Counter[bytes] = collections.Counter()
        self._slots: dict[bytes, asyncio.Semaphore] = {}
        self._bucket = _Bucket(self.config.upload_rate)
        self._uploads: dict[tuple[int, int], tuple[Path, Any, ManifestBuilder]] = {}
        self._interested: dict[bytes, set[bytes]] = {}
        self._have_sent: dict[bytes, float] = {}
        self._provide_now = asyncio.Event()
        self._zstd = threading.local()  # a ZstdCompressor is not thread-safe: one per codec thread
        self.counters = collections.Counter[str]()

    # ---- Service --------------------------------------------------------------------

    def handlers(self) -> Handlers:
        handlers: dict[tuple[Channel, MsgType], Handler] = {
            (Channel.CONTROL, MsgType.BLOB_WANT): self._on_want,
            (Channel.CONTROL, MsgType.BLOB_HAVE): self._on_have,
            (Channel.CONTROL, MsgType.BLOB_PROVIDE): self._on_provide,
            (Channel.CONTROL, MsgType.BLOB_FIND): self._on_find,
            (Channel.CONTROL, MsgType.BLOB_MANIFEST): self._on_reply,
            (Channel.CONTROL, MsgType.BLOB_PROVIDERS): self._on_reply,
            (Channel.BULK, MsgType.BLOB_CHUNK_GET): self._on_chunk_get,
            (Channel.BULK, MsgType.BLOB_CHUNK): self._on_reply,
            (Channel.CLIENT, MsgType.BLOB_PUT): self._on_put,
            (Channel.CLIENT, MsgType.BLOB_GET): self._on_get,
            (Channel.CLIENT, MsgType.BLOB_LIST): self._on_list,
            (Channel.CLIENT, MsgType.BLOB_PIN): self._on_pin,
            (Channel.CLIENT, MsgType.BLOB_GC): self._on_gc,
        }
        return handlers

    def on_member_event(self, event: MemberEvent) -> None:
        live = {m.node_id for m in self._ctx.members() if m.status in LIVE}
        for holders in self._records.values():
            for node in [n for n in holders if n not in live]:
                del holders[node]
        for fetch in self._fetches.values():
            for node in fetch.core.holders:
                if node not in live:
                    fetch.core.remove_holder(node, now=self._ctx.now())
            if fetch.driver is not None:
                fetch.driver.step()
        self._provide_now.set()

    async def start(self) -> None:
        self._ctx.spawn(self._provide_loop())

    async def close(self) -> None:
        for fetch in self._fetches.values():
            if fetch.driver is not None:
                fetch.driver.stop()
        futures: list[asyncio.Future[Any]] = [*self._pending.values(), *self._results.values()]
        for fut in futures:
            if not fut.done():
                fut.cancel()
        for tmp, f, _ in self._uploads.values():
            f.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._uploads.clear()

    def stats(self) -> Stats:
        out: dict[str, Any] = dict(self.store.stats())
        out.update({f"blob_{k}_total": float(v) for k, v in self.counters.items()})
        out["blob_fetches_active"] = float(len(self._fetches))
        out["blob_directory_records"] = float(sum(map(len, self._records.values())))
        return out

    # ---- Python API -----------------------------------------------------------------

    async def put(self, data: bytes | Path | str, *, pin: bool = True) -> bytes:
        """Store ``data`` (bytes, or the path of a file); its blob id. Served from now on."""
        loop, io = asyncio.get_running_loop(), self._ctx.executors.io
        if isinstance(data, bytes | bytearray | memoryview):
            blob_id = await loop.run_in_executor(io, self.store.put_bytes, data)
        else:
            blob_id = await loop.run_in_executor(io, self.store.put_file, Path(data))
        if pin:
            await loop.run_in_executor(io, self.store.pin, blob_id)
        self._provide_now.set()
        return blob_id

    async def get(self, blob_id: bytes, *, holders: tuple[bytes, ...] = ()) -> Path:
        """The path of blob ``blob_id``, fetched from whoever holds it first if needed
        (``holders``: members known to hold it). ``BlobUnavailable``, ``StoreFull``."""
        path = self.store.path(blob_id)
        if path is not None:
            return path
        result = self._results.get(blob_id)
        if result is None or result.done():
            result = self._results[blob_id] = asyncio.get_running_loop().create_future()
            self._ctx.spawn(self._run_fetch(blob_id, holders, result))
        return await asyncio.shield(result)

    def progress(self, blob_id: bytes) -> tuple[int, int] | None:
        """``(bytes held, size)`` of a fetch in progress, None if none."""
        fetch = self._fetches.get(blob_id)
        if fetch is None:
            return None
        m = fetch.core.manifest
        return min(m.size, fetch.core.verified_count * m.chunk), m.size

    # ---- fetching -------------------------------------------------------------------

    def _live(self) -> list[bytes]:
        return [m.node_id for m in self._ctx.members() if m.status in LIVE and m.node_id != self._ctx.node_id]

    async def _find(self, blob_id: bytes, hints: tuple[bytes, ...]) -> list[bytes]:
        """Members that may hold ``blob_id``: hints, our records, what the directory says."""
        found = list(hints) + list(self._records.get(blob_id, {}))
        directory = [n for n in rank(blob_id, [*self._live(), self._ctx.node_id])[:DIRECTORY_SIZE]
                     if n != self._ctx.node_id]
        answers = await asyncio.gather(*(self._ask(n, BlobFind(req=0, blob_id=blob_id), channel=Channel.CONTROL)
                                         for n in directory), return_exceptions=True)
        for answer in answers:
            if isinstance(answer, BlobProviders):
                found.extend(answer.providers)
        found = [n for n in dict.fromkeys(found) if n != self._ctx.node_id and self._ctx.is_live(n)]
        if not found:
            others = self._live()
            self._rng.shuffle(others)
            found = others[:MAX_FALLBACK]
        return found

    async def _manifests(self, blob_id: bytes, nodes: list[bytes]) -> list[tuple[bytes, BlobManifest]]:
        answers = await asyncio.gather(*(self._ask(n, BlobWant(req=0, blob_id=blob_id), channel=Channel.CONTROL)
                                         for n in nodes), return_exceptions=True)
        return [(n, a) for n, a in zip(nodes, answers, strict=True) if isinstance(a, BlobManifest) and a.found]

    async def _run_fetch(self, blob_id: bytes, hints: tuple[bytes, ...], result: asyncio.Future[Path]) -> None:
        try:
            path = await self._fetch(blob_id, hints)
        except (StarmeshError, OSError) as exc:
            if not result.done():
                result.set_exception(exc if isinstance(exc, StarmeshError) else BlobError(str(exc)))
                result.exception()
        else:
            if not result.done():
                result.set_result(path)
        finally:
            if self._results.get(blob_id) is result:  # the next get starts afresh
                del self._results[blob_id]

    async def _fetch(self, blob_id: bytes, hints: tuple[bytes, ...]) -> Path:
        self.counters["fetches"] += 1
        loop, io = asyncio.get_running_loop(), self._ctx.executors.io
        answers = await self._manifests(blob_id, await self._find(blob_id, hints))
        manifest = None
        for _, answer in answers:
            try:
                manifest = decode_manifest(blob_id, answer.manifest)
                break
            except BlobError:
                self.counters["bad_manifests"] += 1
        if manifest is None:
            raise BlobUnavailable(f"no live member holds blob {blob_id.hex()[:16]}...")
        have = await loop.run_in_executor(io, self.store.begin, blob_id, manifest)
        self._provide_now.set()
        done: asyncio.Future[Path] = loop.create_future()
        core = BlobFetch(blob_id=blob_id, manifest=manifest, have=have, now=self._ctx.now(),
                         rng=random.Random(self._rng.getrandbits(64)), settings=self._fetch_settings)
        fetch = _Fetch(core, None, done)
        self._fetches[blob_id] = fetch
        fetch.driver = Driver(core, drain=lambda: self._drain(fetch))
        try:
            self._add_holders(fetch, answers)
            fetch.driver.step()
            while not done.done():
                with contextlib.suppress(builtins.TimeoutError):
                    async with asyncio.timeout(POLL_S):
                        await asyncio.shield(done)
                if fetch.partial and not done.done():
                    self._add_holders(fetch, await self._manifests(blob_id, sorted(fetch.partial)))
                    fetch.driver.step()
            return await done
        finally:
            fetch.driver.stop()
            del self._fetches[blob_id]
            if not done.done():
                done.cancel()

    def _add_holders(self, fetch: _Fetch, answers: list[tuple[bytes, BlobManifest]]) -> None:
        count = len(fetch.core.manifest.chunks)
        for node, answer in answers:
            if answer.complete:
                fetch.partial.discard(node)
                fetch.core.add_holder(node, now=self._ctx.now())
            else:
                fetch.partial.add(node)
                fetch.core.add_holder(node, now=self._ctx.now(), have=from_bitmap(answer.have, count))

    def _drain(self, fetch: _Fetch) -> None:
        core = fetch.core
        for send in core.messages_to_send():
            self._ctx.spawn(self._request_chunk(fetch, send.dest, send.message.index))
        while (event := core.next_event()) is not None:
            if isinstance(event, ChunkVerified):
                write = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(
                    self._ctx.executors.io, self.store.write_chunk, core.blob_id, event.index, event.data))
                fetch.writes.add(write)
                write.add_done_callback(fetch.writes.discard)
                self.counters["fetched_bytes"] += len(event.data)
                self._announce(core.blob_id)
            elif isinstance(event, HolderBlamed):
                self.counters["blamed"] += 1
                log.warning("blobs: %s sent a bad chunk %d of %s: avoided", short_id(event.holder), event.index,
                            core.blob_id.hex()[:16])
            elif isinstance(event, NeedHolders):
                self._ctx.spawn(self._rediscover(fetch))
            elif isinstance(event, FetchDone):
                self._ctx.spawn(self._complete(fetch))
            elif isinstance(event, FetchFailed) and not fetch.done.done():
                fetch.done.set_exception(BlobUnavailable(f"blob {core.blob_id.hex()[:16]}...: {event.reason}"))

    async def _rediscover(self, fetch: _Fetch) -> None:
        blob_id = fetch.core.blob_id
        answers = await self._manifests(blob_id, await self._find(blob_id, ()))
        self._add_holders(fetch, answers)
        if fetch.driver is not None:
            fetch.driver.step()

    async def _complete(self, fetch: _Fetch) -> None:
        try:
            while fetch.writes:
                await asyncio.gather(*fetch.writes)
            path = await asyncio.get_running_loop().run_in_executor(
                self._ctx.executors.io, self.store.finish, fetch.core.blob_id)
        except (StarmeshError, OSError) as exc:
            if not fetch.done.done():
                fetch.done.set_exception(exc if isinstance(exc, StarmeshError) else BlobError(str(exc)))
            return
        self._announce(fetch.core.blob_id, force=True)
        if not fetch.done.done():
            fetch.done.set_result(path)

    async def _request_chunk(self, fetch: _Fetch, dest: bytes, index: int) -> None:
        core = fetch.core
        try:
            reply = await self._ask(dest, BlobChunkGet(req=0, blob_id=core.blob_id, index=index),
                                    channel=Channel.BULK, timeout=self._fetch_settings.request_timeout_s * 1.5)
        except (StarmeshError, builtins.TimeoutError):
            if not self._ctx.is_live(dest):
                core.remove_holder(dest, now=self._ctx.now())
            return  # a timeout is the core's to handle
        if core.state is not FetchState.RUNNING:
            return
        if not isinstance(reply, BlobChunk) or reply.index != index:
            core.on_missing(dest, index, now=self._ctx.now())
        elif reply.status is ChunkStatus.OK:
            data = bytes(reply.data)
            if reply.compressed:
                try:
                    data = await asyncio.get_running_loop().run_in_executor(self._ctx.executors.codec, _inflate, data)
                except zstandard.ZstdError:
                    data = b""  # fails the digest: the sender is blamed
            core.on_chunk(dest, index, data, now=self._ctx.now())
        else:
            core.on_missing(dest, index, now=self._ctx.now(), busy=reply.status is ChunkStatus.BUSY)
        if fetch.driver is not None:
            fetch.driver.step()

    def _announce(self, blob_id: bytes, *, force: bool = False) -> None:
        """``BLOB_HAVE`` to the members that asked us for this blob (at most twice a second)."""
        peers = self._interested.get(blob_id)
        now = self._ctx.now()
        if not peers or (not force and now - self._have_sent.get(blob_id, 0.0) < 0.5):
            return
        self._have_sent[blob_id] = now
        held = self.store.chunks_held(blob_id)
        manifest = self.store.manifest(blob_id)
        if manifest is None:
            return
        msg = BlobHave(blob_id=blob_id, complete=held is None,
                       have=b"" if held is None else bitmap(held, len(manifest.chunks)))
        for peer in list(peers):
            self._ctx.spawn(self._send_quietly(peer, msg))

    async def _send_quietly(self, node: bytes, message: Message, channel: Channel = Channel.CONTROL) -> None:
        with contextlib.suppress(StarmeshError, builtins.TimeoutError):
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await self._ctx.send(node, message, channel=channel)

    # ---- requests to members ------------------------------------------------------

    async def _ask(self, node: bytes, message: Message, *, channel: Channel,
                   timeout: float = REQUEST_TIMEOUT_S) -> Message:
        req = next(self._reqs) & 0xFFFF_FFFF
        waiter: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[req] = waiter
        try:
            async with asyncio.timeout(timeout):
                await self._ctx.send(node, dataclasses.replace(message, req=req),  # type: ignore[type-var]
                                     channel=channel)
                return await waiter
        finally:
            self._pending.pop(req, None)

    async def _on_reply(self, link: Link, message: Message) -> None:
        waiter = self._pending.pop(getattr(message, "req", -1), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message)

    # ---- serving members ------------------------------------------------------------

    async def _on_want(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobWant) and link.peer is not None
        manifest = self.store.manifest(message.blob_id)
        if manifest is None:
            await link.send(BlobManifest(req=message.req, blob_id=message.blob_id, found=False))
            return
        peers = self._interested.setdefault(message.blob_id, set())
        if len(peers) < 64:
            peers.add(link.peer.node_id)
        held = self.store.chunks_held(message.blob_id)
        await link.send(BlobManifest(req=message.req, blob_id=message.blob_id, found=True, complete=held is None,
                                     have=b"" if held is None else bitmap(held, len(manifest.chunks)),
                                     manifest=manifest.encode()))

    async def _on_have(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobHave) and link.peer is not None
        fetch = self._fetches.get(message.blob_id)
        if fetch is None:
            return
        count = len(fetch.core.manifest.chunks)
        have = None if message.complete else from_bitmap(message.have, count)
        if message.complete:
            fetch.partial.discard(link.peer.node_id)
        fetch.core.add_holder(link.peer.node_id, now=self._ctx.now(), have=have)
        if fetch.driver is not None:
            fetch.driver.step()

    async def _on_provide(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobProvide) and link.peer is not None
        expires = self._ctx.now() + message.ttl_s
        for blob_id in message.blobs:
            holders = self._records.get(blob_id)
            if holders is None:
                if len(self._records) >= MAX_RECORDS:
                    continue
                holders = self._records[blob_id] = {}
            holders.pop(link.peer.node_id, None)
            holders[link.peer.node_id] = expires  # most recent last

    async def _on_find(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobFind)
        now = self._ctx.now()
        holders = self._records.get(message.blob_id, {})
        for node in [n for n, at in holders.items() if at <= now]:
            del holders[node]
        found = [n for n in reversed(holders) if self._ctx.is_live(n)]
        if self.store.manifest(message.blob_id) is not None:
            found.insert(0, self._ctx.node_id)
        await link.send(BlobProviders(req=message.req, blob_id=message.blob_id,
                                      providers=tuple(found[:MAX_PROVIDERS])))

    async def _on_chunk_get(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobChunkGet) and link.peer is not None
        peer = link.peer.node_id
        if self._serving[peer] >= MAX_WAITING_PER_PEER:
            self.counters["busy"] += 1
            await link.send(BlobChunk(req=message.req, blob_id=message.blob_id, index=message.index,
                                      status=ChunkStatus.BUSY))
            return
        self._serving[peer] += 1
        self._ctx.spawn(self._serve_chunk(link, message))

    async def _serve_chunk(self, link: Link, message: BlobChunkGet) -> None:
        assert link.peer is not None
        peer = link.peer.node_id
        slot = self._slots.setdefault(peer, asyncio.Semaphore(MAX_UPLOADS_PER_PEER))
        try:
            async with slot:
                loop = asyncio.get_running_loop()
                data = await loop.run_in_executor(self._ctx.executors.io, self.store.read_chunk,
                                                  message.blob_id, message.index)
                if data is None:
                    reply = BlobChunk(req=message.req, blob_id=message.blob_id, index=message.index,
                                      status=ChunkStatus.MISSING)
                else:
                    packed = await loop.run_in_executor(self._ctx.executors.codec, self._deflate, data)
                    await self._bucket.take(len(packed or data), self._ctx.now)
                    reply = BlobChunk(req=message.req, blob_id=message.blob_id, index=message.index,
                                      status=ChunkStatus.OK, compressed=packed is not None, data=packed or data)
                    self.counters["uploaded_bytes"] += len(packed or data)
                    self.counters["uploaded_raw_bytes"] += len(data)
                with contextlib.suppress(TransportError):
                    await link.send(reply)
        finally:
            self._serving[peer] -= 1
            if not self._serving[peer]:
                del self._serving[peer]
                self._slots.pop(peer, None)

    def _deflate(self, data: bytes) -> bytes | None:
        """zstd of ``data`` if that saves at least 1/16 of it (a 16 KiB sample decides first).
        Runs on the codec threads, each with its own compressor."""
        zstd = getattr(self._zstd, "compressor", None)
        if zstd is None:
            zstd = self._zstd.compressor = zstandard.ZstdCompressor(level=1)
        if len(data) >= 64 * 1024 and len(zstd.compress(data[:16384])) > 15360:
            return None
        packed = zstd.compress(data)
        return packed if len(packed) < len(data) - len(data) // 16 else None

    # ---- the provider directory -----------------------------------------------------

    async def _provide_loop(self) -> None:
        while True:
            with contextlib.suppress(builtins.TimeoutError):
                async with asyncio.timeout(PROVIDE_EVERY_S):
                    await self._provide_now.wait()
            self._provide_now.clear()
            await asyncio.sleep(0.05)  # gather a burst of changes
            self._provide()

    def _provide(self) -> None:
        held = [i.blob_id for i in self.store.list()] + list(self._fetches)
        live = [*self._live(), self._ctx.node_id]
        by_member: dict[bytes, list[bytes]] = {}
        for blob_id in held:
            for member in rank(blob_id, live)[:DIRECTORY_SIZE]:
                if member != self._ctx.node_id:
                    by_member.setdefault(member, []).append(blob_id)
        for member, blob_ids in by_member.items():
            for i in range(0, len(blob_ids), MAX_PROVIDE):
                msg = BlobProvide(blobs=tuple(blob_ids[i:i + MAX_PROVIDE]), ttl_s=PROVIDE_TTL_S)
                self._ctx.spawn(self._send_quietly(member, msg))

    # ---- clients --------------------------------------------------------------------

    async def _reply(self, link: Link, message: Message) -> None:
        if not link.send_nowait(message):
            link.abort(ErrorCode.LIMIT_EXCEEDED, "blob client is not reading its replies")

    async def _on_put(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobPut)
        key = (id(link), message.upload)
        loop, io = asyncio.get_running_loop(), self._ctx.executors.io
        upload = self._uploads.get(key)
        if upload is None:
            if message.offset != 0 or sum(1 for k in self._uploads if k[0] == id(link)) >= MAX_CLIENT_UPLOADS:
                await self._reply(link, BlobReply(req=message.req, code=BlobErrorCode.BAD_REQUEST,
                                                  message="unknown upload, or too many at once"))
                return
            tmp = await loop.run_in_executor(io, self.store.new_tmp)
            upload = self._uploads[key] = (tmp, open(tmp, "wb"), ManifestBuilder())  # noqa: SIM115
        tmp, f, builder = upload
        if message.offset != builder.size:
            self._drop_upload(key)
            await self._reply(link, BlobReply(req=message.req, code=BlobErrorCode.BAD_REQUEST,
                                              message=f"piece at {message.offset}, expected {builder.size}"))
            return
        try:
            data = bytes(message.data)
            builder.feed(data)
            await loop.run_in_executor(io, f.write, data)
            if not message.last:
                await self._reply(link, BlobReply(req=message.req, code=BlobErrorCode.OK))
                return
            await loop.run_in_executor(io, _close_synced, f)
            del self._uploads[key]
            blob_id = await loop.run_in_executor(io, self.store.put_verified_file, tmp, builder.manifest())
            if message.pin:
                await loop.run_in_executor(io, self.store.pin, blob_id)
        except StoreFull as exc:
            self._drop_upload(key)
            await self._reply(link, BlobReply(req=message.req, code=BlobErrorCode.NO_SPACE, message=str(exc)[:1000]))
            return
        except (BlobError, OSError) as exc:
            self._drop_upload(key)
            await self._reply(link, BlobReply(req=message.req, code=BlobErrorCode.NO_SPACE
                                              if isinstance(exc, OSError) else BlobErrorCode.TOO_LARGE,
                                              message=str(exc)[:1000]))
            return
        self._provide_now.set()
        await self._reply(link, BlobReply(req=message.req, code=BlobErrorCode.OK, blob_id=blob_id))

    def _drop_upload(self, key: tuple[int, int]) -> None:
        upload = self._uploads.pop(key, None)
        if upload is not None:
            upload[1].close()
            with contextlib.suppress(OSError):
                upload[0].unlink()

    async def _on_get(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobGet)
        self._ctx.spawn(self._answer_get(link, message))

    async def _answer_get(self, link: Link, message: BlobGet) -> None:
        blob_id = message.blob_id
        if not self.store.has(blob_id):
            fut = asyncio.ensure_future(self.get(blob_id))
            try:
                async with asyncio.timeout(message.wait_s):
                    await asyncio.shield(fut)
            except builtins.TimeoutError:
                held, size = self.progress(blob_id) or (0, 0)
                await self._reply(link, BlobData(req=message.req, blob_id=blob_id, size=size, ready=False, held=held))
                return
            except (StarmeshError, OSError) as exc:
                code = BlobErrorCode.NO_SPACE if isinstance(exc, StoreFull) else BlobErrorCode.NOT_FOUND
                await self._reply(link, BlobReply(req=message.req, code=code, message=str(exc)[:1000]))
                return
        info = self.store.info(blob_id)
        path = self.store.path(blob_id)
        if info is None or path is None or message.offset > info.size:
            await self._reply(link, BlobReply(req=message.req, code=BlobErrorCode.BAD_REQUEST,
                                              message="offset past the end, or the blob was evicted"))
            return
        data = await asyncio.get_running_loop().run_in_executor(self._ctx.executors.io, _read_at, path,
                                                                message.offset, CHUNK_BYTES)
        await self._reply(link, BlobData(req=message.req, blob_id=blob_id, size=info.size, ready=True,
                                         held=info.size, data=data))

    async def _on_list(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobList)
        infos = [i for i in self.store.list() if message.after is None or i.blob_id > message.after]
        page = infos[:1024]
        await self._reply(link, BlobListReply(
            req=message.req, blobs=tuple(BlobEntry(blob_id=i.blob_id, size=i.size, pinned=i.pinned,
                                                   last_used=max(0.0, i.last_used)) for i in page),
            next_after=page[-1].blob_id if len(infos) > len(page) else None))

    async def _on_pin(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobPin)
        self._ctx.spawn(self._answer_pin(link, message))

    async def _answer_pin(self, link: Link, message: BlobPin) -> None:
        io = self._ctx.executors.io
        try:
            if message.pin:
                await self.get(message.blob_id)
                await asyncio.get_running_loop().run_in_executor(io, self.store.pin, message.blob_id)
            else:
                await asyncio.get_running_loop().run_in_executor(io, self.store.unpin, message.blob_id)
        except (StarmeshError, OSError) as exc:
            await self._reply(link, BlobReply(req=message.req, code=BlobErrorCode.NOT_FOUND, message=str(exc)[:1000]))
            return
        await self._reply(link, BlobReply(req=message.req, code=BlobErrorCode.OK, blob_id=message.blob_id))

    async def _on_gc(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobGc)
        freed = await asyncio.get_running_loop().run_in_executor(
            self._ctx.executors.io, lambda: self.store.gc(keep=list(self._fetches)))
        await self._reply(link, BlobReply(req=message.req, code=BlobErrorCode.OK, freed=freed))


def _inflate(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(data, max_output_size=CHUNK_BYTES)


def _close_synced(f: Any) -> None:
    import os

    f.flush()
    os.fsync(f.fileno())
    f.close()


def _read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)

