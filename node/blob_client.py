"""Move bytes from a script: the Python API behind ``python -m node blob``.

::

    from node.blob_client import BlobClient

    with BlobClient.connect("127.0.0.1:7400", mesh_key_file="data/mesh.key") as blobs:
        blob_id = blobs.put("model.safetensors")            # or bytes: a BlobId (64 hex digits)
        holders = blobs.replicate(blob_id, copies=2)        # node ids of 2 members keeping a copy
        path = blobs.get(blob_id, out="copy.safetensors")   # the node fetches it from whoever holds it
        blobs.ls(); blobs.pin(blob_id); blobs.unpin(blob_id); blobs.gc()

``AsyncBlobClient`` is the same on asyncio; ``MeshClient.blobs()`` / ``AsyncMeshClient.blobs()``
open one to the node a task client talks to. A put streams the bytes to the node in 1 MiB pieces
(no shared disk assumed) and the node stores them verified and pinned; a get has the node fetch
the blob (verified chunk by chunk) and streams it back, written whole or not at all;
``replicate`` has the node keep ``copies`` leased copies on other members, renewed by the node
until the blob is unpinned there or ``release``d (PROTOCOL.md §14.6), and waits until they are
confirmed (``ReplicationTimeout``, with the holders so far, after ``timeout``).
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

from node.client_link import ClientLink, LinkTasks
from node.config import DEFAULT_PORT, Address, parse_address
from protocol.errors import StarmeshError, TimeoutError, TransportError
from protocol.messages.blobs import (
    MAX_COPIES,
    BlobData,
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
    from node.task_client import _LoopThread

#: The replies a blob client matches by ``req``.
REPLIES = (MsgType.BLOB_REPLY, MsgType.BLOB_DATA, MsgType.BLOB_LIST_REPLY, MsgType.BLOB_REPLICAS)
PIECE_BYTES = 1024 * 1024
Progress = Callable[[int, int, str], None]
"""``(done, total, what)``: bytes held/received of a get, copies confirmed of a replicate."""


class BlobId(str):
    """A blob's id: its 64 lowercase hex digits (``.raw``: the 32 bytes)."""

    __slots__ = ()

    def __new__(cls, value: str | bytes) -> BlobId:
        if isinstance(value, bytes | bytearray) and len(value) == 32:
            return super().__new__(cls, bytes(value).hex())
        text = value.decode("ascii", "replace") if isinstance(value, bytes | bytearray) else str(value)
        try:
            raw = bytes.fromhex(text.strip())
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise ValueError(f"{text!r} is not a blob id (64 hex digits, as blob put prints)")
        return super().__new__(cls, raw.hex())

    @property
    def raw(self) -> bytes:
        return bytes.fromhex(self)


class BlobRefused(StarmeshError):
    """The node refused a blob request: ``code`` (``BlobErrorCode``) says why."""

    def __init__(self, code: BlobErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


class ReplicationTimeout(TimeoutError):
    """Fewer copies than asked were confirmed in time; ``holders``: the node ids (hex) that
    were. The node keeps seeking the rest."""

    def __init__(self, message: str, *, holders: list[str]) -> None:
        super().__init__(message)
        self.holders = holders


@dataclass(frozen=True, slots=True)
class BlobListing:
    """One blob a node holds (``ls``)."""

    id: BlobId
    size: int
    pinned: bool
    held: bool
    """Kept there for another member's lease."""
    last_used: float


class AsyncBlobClient:
    """A node's blob cache over one CLIENT link (module docstring)."""

    def __init__(self, link: ClientLink, *, timeout: float = 30.0, tasks: LinkTasks | None = None) -> None:
        self.link = link
        self.timeout = timeout
        self._tasks = tasks

    @classmethod
    async def connect(cls, address: Address | str, *, mesh_secret: bytes, timeout: float = 30.0) -> AsyncBlobClient:
        """Connect to the node at ``address``. ``TransportError`` / ``TimeoutError`` /
        ``RemoteProtocolError`` (refused)."""
        where = parse_address(address, what="address", default_port=DEFAULT_PORT) if isinstance(address, str) \
            else address
        tasks = LinkTasks()
        try:
            link = await ClientLink.connect(where, mesh_secret=mesh_secret, spawn=tasks.spawn, replies=REPLIES,
                                            timeout=timeout)
        except BaseException:
            await tasks.aclose()
            raise
        return cls(link, timeout=timeout, tasks=tasks)

    async def _request(self, message: Message, *, timeout: float | None = None) -> Message:
        reply = await self.link.request(lambda req: dataclasses.replace(message, req=req),  # type: ignore[type-var]
                                        timeout=timeout or self.timeout)
        if isinstance(reply, BlobReply) and reply.code is not BlobErrorCode.OK:
            raise BlobRefused(reply.code, reply.message)
        return reply

    async def put(self, data: bytes | bytearray | memoryview | str | Path, *, pin: bool = True) -> BlobId:
        """Store ``data`` (bytes, or the path of a file) on the node, pinned unless ``pin`` is
        false; its id. ``BlobRefused`` (``NO_SPACE``, ``TOO_LARGE``)."""
        if isinstance(data, bytes | bytearray | memoryview):
            return await self._put(io.BytesIO(bytes(data)), pin=pin)
        with open(Path(data).expanduser(), "rb") as f:
            return await self._put(f, pin=pin)

    async def _put(self, f: IO[bytes], *, pin: bool) -> BlobId:
        upload = int.from_bytes(os.urandom(8), "big")
        offset = 0
        piece = f.read(PIECE_BYTES)
        while True:
            following = f.read(PIECE_BYTES) if piece else b""
            last = not following
            reply = await self._request(BlobPut(req=0, upload=upload, offset=offset, last=last, pin=pin, data=piece))
            offset += len(piece)
            if last:
                if not isinstance(reply, BlobReply) or reply.blob_id is None:
                    raise TransportError("the node did not say the blob's id")
                return BlobId(reply.blob_id)
            piece = following

    async def get(self, blob_id: str | bytes, out: str | Path | None = None, *,
                  on_progress: Progress | None = None) -> Path:
        """Have the node fetch the blob (from whoever holds it) and write it to ``out``
        (default: ``./<id>``), whole or not at all; the path. ``BlobRefused`` (``NOT_FOUND``)."""
        bid = BlobId(blob_id)
        path = Path(out).expanduser() if out is not None else Path.cwd() / str(bid)
        tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
        offset = 0
        try:
            with open(tmp, "wb") as f:
                while True:
                    wait_s = min(10.0, self.timeout / 2)
                    reply = await self._request(BlobGet(req=0, blob_id=bid.raw, offset=offset, wait_s=wait_s))
                    if not isinstance(reply, BlobData):
                        raise TransportError(f"unexpected reply {type(reply).__name__}")
                    if not reply.ready:
                        if on_progress is not None:
                            on_progress(reply.held, reply.size, "fetching")
                        continue
                    f.write(reply.data)
                    offset += len(reply.data)
                    if on_progress is not None:
                        on_progress(offset, reply.size, "receiving")
                    if offset >= reply.size or not reply.data:
                        break
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    async def ls(self) -> list[BlobListing]:
        """Every complete blob the node holds, in id order."""
        out: list[BlobListing] = []
        after: bytes | None = None
        while True:
            reply = await self._request(BlobList(req=0, after=after))
            assert isinstance(reply, BlobListReply)
            out.extend(BlobListing(id=BlobId(b.blob_id), size=b.size, pinned=b.pinned, held=b.held,
                                   last_used=b.last_used) for b in reply.blobs)
            if reply.next_after is None:
                return out
            after = reply.next_after

    async def pin(self, blob_id: str | bytes) -> None:
        """Keep the blob on the node (fetched there first if needed)."""
        await self._request(BlobPin(req=0, blob_id=BlobId(blob_id).raw, pin=True))

    async def unpin(self, blob_id: str | bytes) -> None:
        """Let the node evict the blob; also ends the copies it keeps of it elsewhere."""
        await self._request(BlobPin(req=0, blob_id=BlobId(blob_id).raw, pin=False))

    async def gc(self) -> int:
        """Drop every unpinned blob on the node now; the bytes freed."""
        reply = await self._request(BlobGc(req=0))
        assert isinstance(reply, BlobReply)
        return reply.freed

    async def replicate(self, blob_id: str | bytes, copies: int = 2, *, timeout: float = 60.0,
                        on_progress: Progress | None = None) -> list[str]:
        """Have the node keep ``copies`` leased copies of the blob on other members (renewed by
        the node until ``unpin`` or ``release``); the node ids (hex) holding one, once all are
        confirmed. ``ReplicationTimeout`` (``.holders``) after ``timeout``; ``BlobRefused``
        (``NOT_FOUND``: nobody holds it; ``BAD_REQUEST``: more than 16 copies)."""
        if not 1 <= copies <= MAX_COPIES:
            raise ValueError(f"copies={copies}: expected 1..{MAX_COPIES}")
        bid = BlobId(blob_id)
        deadline = time.monotonic() + timeout
        while True:
            wait_s = max(0.0, min(10.0, deadline - time.monotonic()))
            reply = await self._request(BlobReplicate(req=0, blob_id=bid.raw, copies=copies, wait_s=wait_s),
                                        timeout=wait_s + self.timeout)
            if not isinstance(reply, BlobReplicas):
                raise TransportError(f"unexpected reply {type(reply).__name__}")
            holders = [h.hex() for h in reply.holders]
            if on_progress is not None:
                on_progress(len(holders), copies, "copies")
            if len(holders) >= copies:
                return holders
            if time.monotonic() >= deadline:
                raise ReplicationTimeout(f"{len(holders)} of {copies} copies confirmed within {timeout}s "
                                         "(the node keeps trying)", holders=holders)

    async def release(self, blob_id: str | bytes) -> None:
        """End the copies the node keeps of the blob elsewhere (the blob stays on the node)."""
        await self._request(BlobReplicate(req=0, blob_id=BlobId(blob_id).raw, copies=0, wait_s=0.0))

    async def close(self) -> None:
        self.link.close()
        if self._tasks is not None:
            await self._tasks.aclose()

    async def __aenter__(self) -> AsyncBlobClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class BlobClient:
    """``AsyncBlobClient`` for plain scripts: the same methods, blocking."""

    def __init__(self, runner: _LoopThread, inner: AsyncBlobClient, *, owns_runner: bool) -> None:
        self._runner = runner
        self.inner = inner
        self._owns_runner = owns_runner

    @classmethod
    def connect(cls, address: Address | str = f"127.0.0.1:{DEFAULT_PORT}", *, mesh_secret: bytes | None = None,
                mesh_key_file: str | Path | None = None, timeout: float = 30.0) -> BlobClient:
        """Connect to a node; the mesh secret from ``mesh_secret``, else ``mesh_key_file``
        (default ``./data/mesh.key``)."""
        from node.identity import load_mesh_key
        from node.task_client import _LoopThread

        secret = mesh_secret if mesh_secret is not None else load_mesh_key(
            Path(mesh_key_file) if mesh_key_file is not None else Path("data") / "mesh.key")
        runner = _LoopThread()
        try:
            inner = runner.run(AsyncBlobClient.connect(address, mesh_secret=secret, timeout=timeout))
        except BaseException:
            runner.close()
            raise
        return cls(runner, inner, owns_runner=True)

    def put(self, data: bytes | bytearray | memoryview | str | Path, *, pin: bool = True) -> BlobId:
        return self._runner.run(self.inner.put(data, pin=pin))

    def get(self, blob_id: str | bytes, out: str | Path | None = None) -> Path:
        return self._runner.run(self.inner.get(blob_id, out))

    def ls(self) -> list[BlobListing]:
        return self._runner.run(self.inner.ls())

    def pin(self, blob_id: str | bytes) -> None:
        self._runner.run(self.inner.pin(blob_id))

    def unpin(self, blob_id: str | bytes) -> None:
        self._runner.run(self.inner.unpin(blob_id))

    def gc(self) -> int:
        return self._runner.run(self.inner.gc())

    def replicate(self, blob_id: str | bytes, copies: int = 2, *, timeout: float = 60.0) -> list[str]:
        return self._runner.run(self.inner.replicate(blob_id, copies, timeout=timeout))

    def release(self, blob_id: str | bytes) -> None:
        self._runner.run(self.inner.release(blob_id))

    def close(self) -> None:
        try:
            self._runner.run(self.inner.close())
        finally:
            if self._owns_runner:
                self._runner.close()

    def __enter__(self) -> BlobClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
