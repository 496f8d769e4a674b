"""The blob service's CLIENT-channel handlers (PROTOCOL.md §14.4): put, get, list, pin, gc,
replicate; part of ``node.blobs.service.BlobService``, which registers them.

A put streams pieces into a temporary file of the store (one piece in memory per upload, at
most ``MAX_CLIENT_UPLOADS`` at once per link) and installs it verified; a get answers from the
store, fetching the blob first (``BlobService.get``) for up to ``wait_s``; a pin fetches first
too; an unpin also releases the leased copies kept elsewhere (``BlobService.release``);
replicate asks for k leased copies and answers with the members that confirmed one once k
have, or after ``wait_s``. Replies are written without waiting: a client that does not read
them is disconnected (``LIMIT_EXCEEDED``).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from node.blobs.manifest import BlobError, ManifestBuilder
from node.blobs.replicas import ReplicaLimit
from node.blobs.store import StoreFull
from node.bundles.manifest import CHUNK_BYTES
from node.transport import Handler, Link
from protocol.errors import ErrorCode, StarmeshError
from protocol.messages.blobs import (
    MAX_LIST,
    BlobData,
    BlobEntry,
    BlobErrorCode,
    BlobGc,
    BlobGet,
    BlobList,
    BlobListReply,
    BlobPin,
    BlobPut,
    BlobReplicas,
    BlobReplicate,
    BlobReply,
)
from protocol.schema import Message
from protocol.tags import MsgType

if TYPE_CHECKING:
    from node.blobs.service import BlobService

MAX_CLIENT_UPLOADS = 4
#: The CLIENT requests ``BlobClients.dispatch`` answers.
TAGS = (MsgType.BLOB_PUT, MsgType.BLOB_GET, MsgType.BLOB_LIST, MsgType.BLOB_PIN, MsgType.BLOB_GC,
        MsgType.BLOB_REPLICATE)
T = TypeVar("T")


class BlobClients:
    """Answers blob clients for ``blobs`` (module docstring)."""

    def __init__(self, blobs: BlobService) -> None:
        self._blobs = blobs
        self._uploads: dict[tuple[int, int], tuple[Path, IO[bytes], ManifestBuilder]] = {}

        self._table: dict[MsgType, Handler] = {
            MsgType.BLOB_PUT: self._on_put, MsgType.BLOB_GET: self._on_get, MsgType.BLOB_LIST: self._on_list,
            MsgType.BLOB_PIN: self._on_pin, MsgType.BLOB_GC: self._on_gc, MsgType.BLOB_REPLICATE: self._on_replicate,
        }
        assert set(self._table) == set(TAGS)

    async def dispatch(self, link: Link, message: Message) -> None:
        await self._table[message.TAG](link, message)

    def close(self) -> None:
        for key in list(self._uploads):
            self._drop_upload(key)

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._blobs.ctx.executors.io, fn, *args)

    async def _reply(self, link: Link, message: Message) -> None:
        if not link.send_nowait(message):
            link.abort(ErrorCode.LIMIT_EXCEEDED, "blob client is not reading its replies")

    async def _refuse(self, link: Link, req: int, code: BlobErrorCode, exc: BaseException | str) -> None:
        await self._reply(link, BlobReply(req=req, code=code, message=str(exc)[:1000]))

    # ---- put ------------------------------------------------------------------------

    async def _on_put(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobPut)
        key = (id(link), message.upload)
        store = self._blobs.store
        upload = self._uploads.get(key)
        if upload is None:
            if message.offset != 0 or sum(1 for k in self._uploads if k[0] == id(link)) >= MAX_CLIENT_UPLOADS:
                await self._refuse(link, message.req, BlobErrorCode.BAD_REQUEST, "unknown upload, or too many at once")
                return
            tmp = await self._io(store.new_tmp)
            upload = self._uploads[key] = (tmp, open(tmp, "wb"), ManifestBuilder())  # noqa: SIM115
        tmp, f, builder = upload
        if message.offset != builder.size:
            self._drop_upload(key)
            await self._refuse(link, message.req, BlobErrorCode.BAD_REQUEST,
                               f"piece at {message.offset}, expected {builder.size}")
            return
        try:
            data = bytes(message.data)
            builder.feed(data)
            await self._io(f.write, data)
            if not message.last:
                await self._reply(link, BlobReply(req=message.req, code=BlobErrorCode.OK))
                return
            await self._io(_close_synced, f)
            del self._uploads[key]
            blob_id = await self._io(store.put_verified_file, tmp, builder.manifest())
            if message.pin:
                await self._io(store.pin, blob_id)
        except StoreFull as exc:
            self._drop_upload(key)
            await self._refuse(link, message.req, BlobErrorCode.NO_SPACE, exc)
            return
        except (BlobError, OSError) as exc:
            self._drop_upload(key)
            await self._refuse(link, message.req, BlobErrorCode.NO_SPACE if isinstance(exc, OSError)
                               else BlobErrorCode.TOO_LARGE, exc)
            return
        self._blobs.provide_soon()
        await self._reply(link, BlobReply(req=message.req, code=BlobErrorCode.OK, blob_id=blob_id))

    def _drop_upload(self, key: tuple[int, int]) -> None:
        upload = self._uploads.pop(key, None)
        if upload is not None:
            upload[1].close()
            with contextlib.suppress(OSError):
                upload[0].unlink()

    # ---- get, list ------------------------------------------------------------------

    async def _on_get(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobGet)
        self._blobs.ctx.spawn(self._answer_get(link, message))

    async def _answer_get(self, link: Link, message: BlobGet) -> None:
        blobs, blob_id = self._blobs, message.blob_id
        if not blobs.store.has(blob_id):
            fut = asyncio.ensure_future(blobs.get(blob_id))
            try:
                async with asyncio.timeout(message.wait_s):
                    await asyncio.shield(fut)
            except builtins.TimeoutError:
                held, size = blobs.progress(blob_id) or (0, 0)
                await self._reply(link, BlobData(req=message.req, blob_id=blob_id, size=size, ready=False, held=held))
                return
            except (StarmeshError, OSError) as exc:
                code = BlobErrorCode.NO_SPACE if isinstance(exc, StoreFull) else BlobErrorCode.NOT_FOUND
                await self._refuse(link, message.req, code, exc)
                return
        info = blobs.store.info(blob_id)
        path = blobs.store.path(blob_id)
        if info is None or path is None or message.offset > info.size:
            await self._refuse(link, message.req, BlobErrorCode.BAD_REQUEST,
                               "offset past the end, or the blob was evicted")
            return
        data = await self._io(_read_at, path, message.offset, CHUNK_BYTES)
        await self._reply(link, BlobData(req=message.req, blob_id=blob_id, size=info.size, ready=True,
                                         held=info.size, data=data))

    async def _on_list(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobList)
        infos = [i for i in self._blobs.store.list() if message.after is None or i.blob_id > message.after]
        page = infos[:MAX_LIST]
        await self._reply(link, BlobListReply(
            req=message.req, blobs=tuple(BlobEntry(blob_id=i.blob_id, size=i.size, pinned=i.pinned,
                                                   last_used=max(0.0, i.last_used), held=i.held) for i in page),
            next_after=page[-1].blob_id if len(infos) > len(page) else None))

    # ---- pin, gc, replicate ---------------------------------------------------------

    async def _on_pin(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobPin)
        self._blobs.ctx.spawn(self._answer_pin(link, message))

    async def _answer_pin(self, link: Link, message: BlobPin) -> None:
        store = self._blobs.store
        try:
            if message.pin:
                await self._blobs.get(message.blob_id)
                await self._io(store.pin, message.blob_id)
            else:
                self._blobs.release(message.blob_id)
                await self._io(store.unpin, message.blob_id)
        except (StarmeshError, OSError) as exc:
            await self._refuse(link, message.req, BlobErrorCode.NOT_FOUND, exc)
            return
        await self._reply(link, BlobReply(req=message.req, code=BlobErrorCode.OK, blob_id=message.blob_id))

    async def _on_gc(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobGc)
        freed = await self._io(lambda: self._blobs.store.gc(keep=self._blobs.fetching()))
        await self._reply(link, BlobReply(req=message.req, code=BlobErrorCode.OK, freed=freed))

    async def _on_replicate(self, link: Link, message: Message) -> None:
        assert isinstance(message, BlobReplicate)
        self._blobs.ctx.spawn(self._answer_replicate(link, message))

    async def _answer_replicate(self, link: Link, message: BlobReplicate) -> None:
        blobs = self._blobs
        try:
            if message.copies == 0:
                blobs.release(message.blob_id)
                holders: tuple[bytes, ...] = ()
            else:
                holders = tuple(await blobs.copies.ensure(message.blob_id, message.copies, wait_s=message.wait_s))
        except StarmeshError as exc:
            code = BlobErrorCode.BAD_REQUEST if isinstance(exc, ReplicaLimit) else BlobErrorCode.NOT_FOUND
            await self._refuse(link, message.req, code, exc)
            return
        await self._reply(link, BlobReplicas(req=message.req, blob_id=message.blob_id, copies=message.copies,
                                             holders=holders[:message.copies]))


def _close_synced(f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)
