"""Blob messages: manifests, chunks, the provider directory, and clients (PROTOCOL.md §14).

Who sends what:

* Member to member on **CONTROL**: ``BlobWant`` asks a holder for a blob's manifest and which
  chunks it has (``BlobManifest``); ``BlobHave`` tells a peer that asked that more chunks
  arrived; ``BlobProvide`` registers a holder with the members ranked first for each blob id
  (rendezvous hashing); ``BlobFind`` asks such a member who holds a blob (``BlobProviders``).
* Member to member on **BULK**: ``BlobChunkGet`` asks for one chunk, ``BlobChunk`` answers
  with its bytes (zstd-compressed when that shrank it) or says why not.
* Client to node on **CLIENT** (every request has a ``req``, its reply carries it): ``BlobPut``
  streams a blob to the node in pieces; ``BlobGet`` has the node fetch a blob and returns
  it piece by piece (``BlobData``); ``BlobList`` (``BlobListReply``); ``BlobPin`` and ``BlobGc``
  (``BlobReply``, also the answer to the last piece of a put and to every refusal).
* Copies on purpose (tags 128-132): a member asks another on **CONTROL** to fetch a blob and
  hold it under a lease it renews (``BlobLease`` -> ``BlobLeaseReply``; ``BlobRelease`` ends
  it at once); a client asks its node for k such copies (``BlobReplicate`` ->
  ``BlobReplicas``, the members that confirmed one).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from protocol.messages.gossip import NODE_ID
from protocol.schema import (
    Bool,
    Bytes,
    EnumOf,
    Float,
    ListOf,
    Message,
    Optional,
    Str,
    Struct,
    StructOf,
    UInt,
    register,
    spec,
)
from protocol.tags import MsgType

BLOB_ID = Bytes(32, min_len=32)
REQ = UInt(32)
#: Bytes of one chunk (as ``node.bundles.manifest.CHUNK_BYTES``) and of one client piece.
CHUNK_BYTES = 1024 * 1024
#: Most chunks of a blob (64 GiB) and the largest encoded manifest / chunk bitmap.
MAX_CHUNKS = 65_536
MAX_MANIFEST_BYTES = MAX_CHUNKS * 34 + 64
MAX_BITMAP_BYTES = MAX_CHUNKS // 8
#: Most blob ids in one ``BlobProvide``; most providers in one answer; entries in a list page.
MAX_PROVIDE = 256
MAX_PROVIDERS = 32
MAX_LIST = 1024
#: Most leased copies one ``BlobReplicate`` may ask for; most hints in one ``BlobLease``.
MAX_COPIES = 16
MAX_HINTS = 16
#: Longest lease one ``BlobLease`` may ask for (seconds).
MAX_LEASE_S = 3600.0
BITMAP = Bytes(MAX_BITMAP_BYTES)


class ChunkStatus(enum.IntEnum):
    OK = 0
    """``data`` is the chunk (compressed if ``compressed``)."""
    MISSING = 1
    """The sender does not hold this chunk (or the blob)."""
    BUSY = 2
    """The sender holds it but is serving too many uploads: ask again later or elsewhere."""


class LeaseStatus(enum.IntEnum):
    """How a member answered ``BlobLease`` (``BlobLeaseReply.status``)."""

    HELD = 0
    """It holds the whole blob, kept from eviction until ``lease_s`` from now."""
    FETCHING = 1
    """Leased and being fetched: ask again to confirm (the lease runs from each ask)."""
    REFUSED = 2
    """No lease: it grants too many already, or the blob cannot fit."""
    FAILED = 3
    """Leased, but no member could serve the blob to it."""


class BlobErrorCode(enum.IntEnum):
    """Why a client request failed (``BlobReply.code``)."""

    OK = 0
    INTERNAL = 1
    NOT_FOUND = 2
    """No live member holds the blob (or its manifest)."""
    BAD_REQUEST = 3
    """Out of order, unknown upload, offset past the end, too many uploads."""
    NO_SPACE = 4
    """The cache is full of pinned blobs, or the disk is."""
    TOO_LARGE = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobEntry(Struct):
    blob_id: bytes = spec(BLOB_ID)
    size: int = spec(UInt(64))
    pinned: bool = spec(Bool())
    last_used: float = spec(Float(0.0))
    """Unix time of the last read or write."""
    held: bool = spec(Bool(), default=False)
    """Kept from eviction for another member's lease (``BlobLease``)."""


# ---- member <-> member --------------------------------------------------------------


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobWant(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_WANT
    req: int = spec(REQ)
    blob_id: bytes = spec(BLOB_ID)


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobManifest(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_MANIFEST
    req: int = spec(REQ)
    blob_id: bytes = spec(BLOB_ID)
    found: bool = spec(Bool())
    complete: bool = spec(Bool(), default=False)
    have: bytes = spec(BITMAP, default=b"")
    """Not complete: the chunks held, one bit each (chunk i: byte i // 8, bit i % 8, LSB first)."""
    manifest: bytes = spec(Bytes(MAX_MANIFEST_BYTES), default=b"")
    """The canonical manifest (found)."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobHave(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_HAVE
    blob_id: bytes = spec(BLOB_ID)
    complete: bool = spec(Bool())
    have: bytes = spec(BITMAP, default=b"")


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobChunkGet(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_CHUNK_GET
    req: int = spec(REQ)
    blob_id: bytes = spec(BLOB_ID)
    index: int = spec(UInt(32))


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobChunk(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_CHUNK
    BLOB: ClassVar[tuple[str, ...]] = ("data",)
    req: int = spec(REQ)
    blob_id: bytes = spec(BLOB_ID)
    index: int = spec(UInt(32))
    status: ChunkStatus = spec(EnumOf(ChunkStatus))
    compressed: bool = spec(Bool(), default=False)
    data: bytes | memoryview = spec(Bytes(CHUNK_BYTES, views=True), default=b"")


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobProvide(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_PROVIDE
    blobs: tuple[bytes, ...] = spec(ListOf(BLOB_ID, max_len=MAX_PROVIDE))
    ttl_s: float = spec(Float(1.0, 3600.0))
    """Forget the sender as a holder of these after this long unless it provides again."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobFind(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_FIND
    req: int = spec(REQ)
    blob_id: bytes = spec(BLOB_ID)


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobProviders(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_PROVIDERS
    req: int = spec(REQ)
    blob_id: bytes = spec(BLOB_ID)
    providers: tuple[bytes, ...] = spec(ListOf(NODE_ID, max_len=MAX_PROVIDERS))


# ---- client <-> node ----------------------------------------------------------------


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobPut(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_PUT
    BLOB: ClassVar[tuple[str, ...]] = ("data",)
    req: int = spec(REQ)
    upload: int = spec(UInt(64))
    """Chosen by the client, one per blob it puts on this link."""
    offset: int = spec(UInt(64))
    """Where ``data`` goes: pieces are sent in order (offset = the bytes sent before)."""
    last: bool = spec(Bool(), default=False)
    pin: bool = spec(Bool(), default=True)
    """Last piece: pin the blob on this node."""
    data: bytes | memoryview = spec(Bytes(CHUNK_BYTES, views=True), default=b"")


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobGet(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_GET
    req: int = spec(REQ)
    blob_id: bytes = spec(BLOB_ID)
    offset: int = spec(UInt(64), default=0)
    wait_s: float = spec(Float(0.0, 30.0), default=10.0)
    """Not held yet: fetch it, and answer once it is complete or after this long."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobData(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_DATA
    BLOB: ClassVar[tuple[str, ...]] = ("data",)
    req: int = spec(REQ)
    blob_id: bytes = spec(BLOB_ID)
    size: int = spec(UInt(64))
    ready: bool = spec(Bool())
    """The node holds the whole blob; ``data`` is from ``offset``. False: still fetching."""
    held: int = spec(UInt(64), default=0)
    """Bytes the node holds so far (progress)."""
    data: bytes | memoryview = spec(Bytes(CHUNK_BYTES, views=True), default=b"")


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobList(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_LIST
    req: int = spec(REQ)
    after: bytes | None = spec(Optional(BLOB_ID), default=None)


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobListReply(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_LIST_REPLY
    req: int = spec(REQ)
    blobs: tuple[BlobEntry, ...] = spec(ListOf(StructOf(BlobEntry), max_len=MAX_LIST), default=())
    next_after: bytes | None = spec(Optional(BLOB_ID), default=None)


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobPin(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_PIN
    req: int = spec(REQ)
    blob_id: bytes = spec(BLOB_ID)
    pin: bool = spec(Bool())
    """True: pin (fetching it first if needed); false: unpin."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobGc(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_GC
    req: int = spec(REQ)


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobReply(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_REPLY
    req: int = spec(REQ)
    code: BlobErrorCode = spec(EnumOf(BlobErrorCode))
    message: str = spec(Str(1000), default="")
    blob_id: bytes | None = spec(Optional(BLOB_ID), default=None)
    """A put's last piece: the blob's id."""
    freed: int = spec(UInt(64), default=0)
    """GC: bytes freed."""


# ---- leased copies (128-132) --------------------------------------------------------


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobLease(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_LEASE
    req: int = spec(REQ)
    blob_id: bytes = spec(BLOB_ID)
    lease_s: float = spec(Float(1.0, MAX_LEASE_S))
    """Keep the blob (fetching it first) and never evict it for this long from now."""
    hints: tuple[bytes, ...] = spec(ListOf(NODE_ID, max_len=MAX_HINTS), default=())
    """Members known to hold it (the sender, usually)."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobLeaseReply(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_LEASE_REPLY
    req: int = spec(REQ)
    blob_id: bytes = spec(BLOB_ID)
    status: LeaseStatus = spec(EnumOf(LeaseStatus))
    lease_s: float = spec(Float(0.0, MAX_LEASE_S), default=0.0)
    """The lease granted (HELD, FETCHING): at most what was asked."""
    message: str = spec(Str(1000), default="")


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobRelease(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_RELEASE
    blob_id: bytes = spec(BLOB_ID)


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobReplicate(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_REPLICATE
    req: int = spec(REQ)
    blob_id: bytes = spec(BLOB_ID)
    copies: int = spec(UInt(8))
    """Leased copies wanted on other members (at most ``MAX_COPIES``); 0: release them all."""
    wait_s: float = spec(Float(0.0, 30.0), default=10.0)
    """Answer once ``copies`` are confirmed or after this long."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobReplicas(Message):
    TAG: ClassVar[MsgType] = MsgType.BLOB_REPLICAS
    req: int = spec(REQ)
    blob_id: bytes = spec(BLOB_ID)
    copies: int = spec(UInt(8))
    """The copies wanted."""
    holders: tuple[bytes, ...] = spec(ListOf(NODE_ID, max_len=MAX_COPIES), default=())
    """The members that confirmed a copy so far."""
