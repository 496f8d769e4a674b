"""The node's blob service: the asyncio adapter of the ``node.blobs`` cores over the store.

It serves members (CONTROL: ``BlobWant`` -> ``BlobManifest``, ``BlobHave``, the provider
directory ``BlobProvide`` / ``BlobFind`` -> ``BlobProviders``; BULK: ``BlobChunkGet`` ->
``BlobChunk``: ``node.blob_serving.BlobServer``; leased copies: ``node.blob_copies.BlobCopies``)
and clients (CLIENT: ``node.blob_clients.BlobClients``; PROTOCOL.md §14), and gives other
services ``await put(data_or_path) -> id``, ``await get(id) -> Path``, ``await replicate(id,
copies=k) -> [node ids]`` and ``release(id)``.

A fetch: ask the directory members of the id (the first ``DIRECTORY_SIZE`` live members in
rendezvous order) who holds it, ask those holders (and any hints) for the manifest, then run
one ``BlobFetch`` core with a ``Driver``; every verified chunk goes to the store at once and is
served to others from then on (swarming). The fetch records itself with the directory as a
(partial) holder as soon as it has the manifest; holders that are partial are asked again for
what they have every ``POLL_S``; and the directory is asked again while the fetch runs, so
fetches that started together find each other (``node.blobs.lookups.HolderLookups``: every
``POLL_S``, backing off to ``MAX_LOOKUP_EVERY_S`` while nobody new turns up, at once when the
core runs out of holders (``NeedHolders``), at most one lookup in flight per fetch; random
members are asked only when the directory knows nobody, ``MAX_FALLBACK`` at most once per
``FALLBACK_EVERY_S``). Disk work runs in the io executor, zstd in the codec executor.
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
from pathlib import Path
from typing import Any

import zstandard

from discovery.events import MemberEvent
from node import blob_clients, blob_copies, blob_serving
from node.blob_clients import BlobClients
from node.blob_copies import BlobCopies
from node.blob_serving import BlobServer, inflate
from node.blobs.config import BlobConfig
from node.blobs.directory import DIRECTORY_SIZE
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
from node.blobs.lookups import HolderLookups
from node.blobs.manifest import BlobError, decode_manifest, from_bitmap
from node.blobs.replicas import ReplicaSettings
from node.blobs.store import BlobStore
from node.bundles.manifest import Manifest
from node.context import Handlers, NodeContext
from node.core import Stats
from node.driver import Driver
from node.membership import LIVE
from node.placement import rank
from node.transport import Handler, Link
from protocol.connection import Channel
from protocol.crypto import short_id
from protocol.errors import StarmeshError
from protocol.messages.blobs import (
    BlobChunk,
    BlobChunkGet,
    BlobFind,
    BlobHave,
    BlobManifest,
    BlobProviders,
    BlobWant,
    ChunkStatus,
)
from protocol.schema import Message
from protocol.tags import MsgType

log = logging.getLogger("starmesh.blobs")

POLL_S = 1.0
MAX_LOOKUP_EVERY_S = 8.0
REQUEST_TIMEOUT_S = 10.0
MAX_FALLBACK = 8
FALLBACK_EVERY_S = 10.0


class BlobUnavailable(BlobError):
    """No live member holds the blob, or none could serve it."""


def lookups(*, now: float) -> HolderLookups:
    """The holder lookups of one fetch, as this service paces them."""
    return HolderLookups(now=now, every_s=POLL_S, max_every_s=MAX_LOOKUP_EVERY_S,
                         fallback_every_s=FALLBACK_EVERY_S, fallback_members=MAX_FALLBACK)


class _Fetch:
    def __init__(self, core: BlobFetch, driver: Driver | None, done: asyncio.Future[Path],
                 lookups: HolderLookups) -> None:
        self.core = core
        self.driver = driver
        self.done = done
        self.lookups = lookups
        """When the directory is asked again for holders (at most one lookup in flight)."""
        self.writes: set[asyncio.Future[None]] = set()
        self.partial: set[bytes] = set()

    def known(self) -> set[bytes]:
        """Members this fetch need not ask for the manifest again."""
        return {*self.core.holders, *self.core.avoided, *self.core.dropped, *self.partial}


class BlobService:
    """Serves blobs (module docstring)."""

    name = "blobs"

    def __init__(self, ctx: NodeContext, *, store: BlobStore, config: BlobConfig | None = None,
                 fetch: FetchSettings | None = None, replicas: ReplicaSettings | None = None,
                 rng: random.Random | None = None) -> None:
        self.ctx = ctx
        self.store = store
        self.config = config or BlobConfig()
        self._fetch_settings = fetch or FetchSettings()
        self._rng = rng or random.Random()
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._reqs = itertools.count(1)
        self._fetches: dict[bytes, _Fetch] = {}
        self._results: dict[bytes, asyncio.Future[Path]] = {}
        self.counters = collections.Counter[str]()
        self.server = BlobServer(self)
        self.clients = BlobClients(self)
        self.copies = BlobCopies(self, settings=replicas or ReplicaSettings(lease_s=self.config.lease_s),
                                 max_grant_s=self.config.max_lease_s)

    # ---- Service --------------------------------------------------------------------

    def handlers(self) -> Handlers:
        handlers: dict[tuple[Channel, MsgType], Handler] = {
            (Channel.CONTROL, MsgType.BLOB_HAVE): self._on_have,
            (Channel.CONTROL, MsgType.BLOB_MANIFEST): self.on_reply,
            (Channel.CONTROL, MsgType.BLOB_PROVIDERS): self.on_reply,
            (Channel.CONTROL, MsgType.BLOB_LEASE_REPLY): self.on_reply,
            (Channel.BULK, MsgType.BLOB_CHUNK): self.on_reply,
            **{route: self._serve for route in blob_serving.ROUTES},
            **{(Channel.CONTROL, tag): self._lease for tag in blob_copies.TAGS},
            **{(Channel.CLIENT, tag): self._client for tag in blob_clients.TAGS},
        }
        return handlers

    async def _serve(self, link: Link, message: Message) -> None:
        await self.server.dispatch(link, message)

    async def _lease(self, link: Link, message: Message) -> None:
        await self.copies.dispatch(link, message)

    async def _client(self, link: Link, message: Message) -> None:
        await self.clients.dispatch(link, message)

    def on_member_event(self, event: MemberEvent) -> None:
        live = {m.node_id for m in self.ctx.members() if m.status in LIVE}
        self.server.keep_only(live)
        for fetch in self._fetches.values():
            fetch.partial &= live
            for node in fetch.core.holders:
                if node not in live:
                    fetch.core.remove_holder(node, now=self.ctx.now())
            if fetch.driver is not None:
                fetch.driver.step()
        self.copies.on_members()
        self.server.provide_now.set()

    async def start(self) -> None:
        self.server.start()
        self.copies.start()

    async def close(self) -> None:
        for fetch in self._fetches.values():
            if fetch.driver is not None:
                fetch.driver.stop()
        self.server.close()
        self.copies.close()
        futures: list[asyncio.Future[Any]] = [*self._pending.values(), *self._results.values()]
        for fut in futures:
            if not fut.done():
                fut.cancel()
        self.clients.close()

    def stats(self) -> Stats:
        out: dict[str, Any] = dict(self.store.stats())
        out.update({f"blob_{k}_total": float(v) for k, v in self.counters.items()})
        out["blob_fetches_active"] = float(len(self._fetches))
        out.update(self.server.directory.stats())
        out.update(self.server.interest.stats())
        out.update(self.copies.stats())
        return out

    # ---- Python API -----------------------------------------------------------------

    async def put(self, data: bytes | Path | str, *, pin: bool = True) -> bytes:
        """Store ``data`` (bytes, or the path of a file); its blob id. Served from now on."""
        loop, io = asyncio.get_running_loop(), self.ctx.executors.io
        if isinstance(data, bytes | bytearray | memoryview):
            blob_id = await loop.run_in_executor(io, self.store.put_bytes, data)
        else:
            blob_id = await loop.run_in_executor(io, self.store.put_file, Path(data))
        if pin:
            await loop.run_in_executor(io, self.store.pin, blob_id)
        self.server.provide_now.set()
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
            self.ctx.spawn(self._run_fetch(blob_id, holders, result))
        return await asyncio.shield(result)

    async def replicate(self, blob_id: bytes, *, copies: int = 2, timeout: float = 60.0) -> list[bytes]:
        """Keep ``copies`` copies of ``blob_id`` on other members, each under a lease this node
        renews, until ``release(blob_id)``: the node ids holding one, once ``copies`` are
        confirmed. ``ReplicationTimeout`` (``.holders``: those confirmed) after ``timeout``
        (the copies are still sought), ``ReplicaLimit``, ``BlobUnavailable``."""
        return await self.copies.replicate(blob_id, copies, timeout=timeout)

    def unpin(self, blob_id: bytes) -> None:
        """Let ``blob_id`` be evicted again (leases it is held under still keep it)."""
        self.store.unpin(blob_id)

    def release(self, blob_id: bytes) -> None:
        """Stop keeping copies of ``blob_id`` elsewhere (their leases end now)."""
        self.copies.release(blob_id)

    def replicas(self, blob_id: bytes) -> list[bytes]:
        """The members holding a confirmed copy of ``blob_id`` for this node."""
        return list(self.copies.replicator.confirmed(blob_id))

    def progress(self, blob_id: bytes) -> tuple[int, int] | None:
        """``(bytes held, size)`` of a fetch in progress, None if none."""
        fetch = self._fetches.get(blob_id)
        if fetch is None:
            return None
        m = fetch.core.manifest
        return min(m.size, fetch.core.verified_count * m.chunk), m.size

    # ---- for the helpers (node.blob_clients, node.blob_copies) ------------------------

    def fetch_running(self, blob_id: bytes) -> bool:
        result = self._results.get(blob_id)
        return result is not None and not result.done()

    def fetching(self) -> list[bytes]:
        return list(self._fetches)

    def provide_soon(self) -> None:
        self.server.provide_now.set()

    def unavailable(self, blob_id: bytes) -> BlobUnavailable:
        return BlobUnavailable(f"no live member holds blob {blob_id.hex()[:16]}...")

    # ---- fetching -------------------------------------------------------------------

    def live(self) -> list[bytes]:
        """The live members other than this node."""
        return [m.node_id for m in self.ctx.members() if m.status in LIVE and m.node_id != self.ctx.node_id]

    async def directory_holders(self, blob_id: bytes) -> list[bytes]:
        """Live members other than this one that hold ``blob_id`` (in whole or in part), as
        this node's records and the blob's directory members say."""
        found = self.server.directory.find(blob_id, now=self.ctx.now())
        directory = [n for n in rank(blob_id, [*self.live(), self.ctx.node_id])[:DIRECTORY_SIZE]
                     if n != self.ctx.node_id]
        answers = await asyncio.gather(*(self.ask(n, BlobFind(req=0, blob_id=blob_id), channel=Channel.CONTROL)
                                         for n in directory), return_exceptions=True)
        for answer in answers:
            if isinstance(answer, BlobProviders):
                found.extend(answer.providers)
        return [n for n in dict.fromkeys(found) if n != self.ctx.node_id and self.ctx.is_live(n)]

    async def _find(self, blob_id: bytes, hints: tuple[bytes, ...], lookups: HolderLookups) -> list[bytes]:
        """Members that may hold ``blob_id``: hints, then the directory; else a few at random,
        as often as ``lookups`` allows."""
        found = [n for n in dict.fromkeys([*hints, *await self.directory_holders(blob_id)])
                 if n != self.ctx.node_id and self.ctx.is_live(n)]
        if not found:
            others = self.live()
            self._rng.shuffle(others)
            found = others[:lookups.fallback(now=self.ctx.now())]
        return found

    async def _manifests(self, blob_id: bytes, nodes: list[bytes]) -> list[tuple[bytes, BlobManifest]]:
        answers = await asyncio.gather(*(self.ask(n, BlobWant(req=0, blob_id=blob_id), channel=Channel.CONTROL)
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

    async def _first_lookup(self, blob_id: bytes, hints: tuple[bytes, ...],
                            pacing: HolderLookups) -> tuple[Manifest, list[tuple[bytes, BlobManifest]]]:
        """The blob's manifest and the holders' answers (``BlobUnavailable``: nobody has it)."""
        pacing.begin(now=self.ctx.now())
        try:
            answers = await self._manifests(blob_id, await self._find(blob_id, hints, pacing))
        finally:
            pacing.end(found_new=True)
        for _, answer in answers:
            try:
                return decode_manifest(blob_id, answer.manifest), answers
            except BlobError:
                self.counters["bad_manifests"] += 1
        raise self.unavailable(blob_id)

    async def _fetch(self, blob_id: bytes, hints: tuple[bytes, ...]) -> Path:
        self.counters["fetches"] += 1
        loop, io = asyncio.get_running_loop(), self.ctx.executors.io
        pacing = lookups(now=self.ctx.now())
        manifest, answers = await self._first_lookup(blob_id, hints, pacing)
        have = await loop.run_in_executor(io, self.store.begin, blob_id, manifest)
        self.server.provide_now.set()
        done: asyncio.Future[Path] = loop.create_future()
        core = BlobFetch(blob_id=blob_id, manifest=manifest, have=have, now=self.ctx.now(),
                         rng=random.Random(self._rng.getrandbits(64)), settings=self._fetch_settings,
                         me=self.ctx.node_id)
        fetch = _Fetch(core, None, done, pacing)
        self._fetches[blob_id] = fetch
        fetch.driver = Driver(core, drain=lambda: self._drain(fetch))
        try:
            self._add_holders(fetch, answers)
            fetch.driver.step()
            while not done.done():
                with contextlib.suppress(builtins.TimeoutError):
                    async with asyncio.timeout(POLL_S):
                        await asyncio.shield(done)
                self._look_up(fetch)
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
                fetch.core.add_holder(node, now=self.ctx.now())
            else:
                fetch.partial.add(node)
                fetch.core.add_holder(node, now=self.ctx.now(), have=from_bitmap(answer.have, count))

    def _drain(self, fetch: _Fetch) -> None:
        core = fetch.core
        for send in core.messages_to_send():
            self.ctx.spawn(self._request_chunk(fetch, send.dest, send.message.index))
        while (event := core.next_event()) is not None:
            if isinstance(event, ChunkVerified):
                write = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(
                    self.ctx.executors.io, self.store.write_chunk, core.blob_id, event.index, event.data))
                fetch.writes.add(write)
                write.add_done_callback(fetch.writes.discard)
                self.counters["fetched_bytes"] += len(event.data)
                self.server.announce(core.blob_id)
            elif isinstance(event, HolderBlamed):
                self.counters["blamed"] += 1
                log.warning("blobs: %s sent a bad chunk %d of %s: avoided", short_id(event.holder), event.index,
                            core.blob_id.hex()[:16])
            elif isinstance(event, NeedHolders):
                fetch.lookups.urgent()  # one lookup at a time, however often the core asks
                self._look_up(fetch)
            elif isinstance(event, FetchDone):
                self.ctx.spawn(self._complete(fetch))
            elif isinstance(event, FetchFailed) and not fetch.done.done():
                fetch.done.set_exception(BlobUnavailable(f"blob {core.blob_id.hex()[:16]}...: {event.reason}"))

    def _look_up(self, fetch: _Fetch) -> None:
        """Ask the directory for more holders if one lookup is due and none is in flight."""
        if fetch.core.state is FetchState.RUNNING and fetch.lookups.due(now=self.ctx.now()):
            fetch.lookups.begin(now=self.ctx.now())
            self.counters["lookups"] += 1
            self.ctx.spawn(self._rediscover(fetch))

    async def _rediscover(self, fetch: _Fetch) -> None:
        blob_id = fetch.core.blob_id
        answers: list[tuple[bytes, BlobManifest]] = []
        try:
            found = await self._find(blob_id, (), fetch.lookups)
            known = fetch.known()
            answers = await self._manifests(blob_id, [n for n in found if n not in known])
        finally:
            fetch.lookups.end(found_new=bool(answers))
        if answers and fetch.core.state is FetchState.RUNNING:
            self.counters["holders_found"] += len(answers)
            self._add_holders(fetch, answers)
        if fetch.driver is not None:
            fetch.driver.step()

    async def _complete(self, fetch: _Fetch) -> None:
        try:
            while fetch.writes:
                await asyncio.gather(*fetch.writes)
            path = await asyncio.get_running_loop().run_in_executor(
                self.ctx.executors.io, self.store.finish, fetch.core.blob_id)
        except (StarmeshError, OSError) as exc:
            if not fetch.done.done():
                fetch.done.set_exception(exc if isinstance(exc, StarmeshError) else BlobError(str(exc)))
            return
        self.server.announce(fetch.core.blob_id, force=True)
        if not fetch.done.done():
            fetch.done.set_result(path)

    async def _request_chunk(self, fetch: _Fetch, dest: bytes, index: int) -> None:
        core = fetch.core
        try:
            reply = await self.ask(dest, BlobChunkGet(req=0, blob_id=core.blob_id, index=index),
                                    channel=Channel.BULK, timeout=self._fetch_settings.request_timeout_s * 1.5)
        except (StarmeshError, builtins.TimeoutError):
            if not self.ctx.is_live(dest):
                core.remove_holder(dest, now=self.ctx.now())
            return  # a timeout is the core's to handle
        if core.state is not FetchState.RUNNING:
            return
        if not isinstance(reply, BlobChunk) or reply.index != index:
            core.on_missing(dest, index, now=self.ctx.now())
        elif reply.status is ChunkStatus.OK:
            data = bytes(reply.data)
            if reply.compressed:
                try:
                    data = await asyncio.get_running_loop().run_in_executor(self.ctx.executors.codec, inflate, data)
                except zstandard.ZstdError:
                    data = b""  # fails the digest: the sender is blamed
            core.on_chunk(dest, index, data, now=self.ctx.now())
        else:
            core.on_missing(dest, index, now=self.ctx.now(), busy=reply.status is ChunkStatus.BUSY)
        if fetch.driver is not None:
            fetch.driver.step()

    async def send_quietly(self, node: bytes, message: Message, channel: Channel = Channel.CONTROL) -> None:
        with contextlib.suppress(StarmeshError, builtins.TimeoutError):
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await self.ctx.send(node, message, channel=channel)

    # ---- requests to members ------------------------------------------------------

    async def ask(self, node: bytes, message: Message, *, channel: Channel,
                   timeout: float = REQUEST_TIMEOUT_S) -> Message:
        req = next(self._reqs) & 0xFFFF_FFFF
        waiter: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[req] = waiter
        try:
            async with asyncio.timeout(timeout):
                await self.ctx.send(node, dataclasses.replace(message, req=req),  # type: ignore[type-var]
                                     channel=channel)
                return await waiter
        finally:
            self._pending.pop(req, None)

    async def on_reply(self, link: Link, message: Message) -> None:
        waiter = self._pending.pop(getattr(message, "req", -1), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message)

    # ---- fetch inputs from members ---------------------------------------------------

    async def _on_have(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobHave) and link.peer is not None
        fetch = self._fetches.get(message.blob_id)
        if fetch is None:
            return
        count = len(fetch.core.manifest.chunks)
        have = None if message.complete else from_bitmap(message.have, count)
        if message.complete:
            fetch.partial.discard(link.peer.node_id)
        fetch.core.add_holder(link.peer.node_id, now=self.ctx.now(), have=have)
        if fetch.driver is not None:
            fetch.driver.step()
