"""Submitter authorization: the owner-signed log of who may submit work (PROTOCOL.md §13).

The mesh key file names the mesh **owner** (an Ed25519 public key). The owner signs
``SubmitterEntry`` records (grant or revoke one submitter key), numbered 1, 2, 3... with no
gap, each naming the digest of the one before (``prev``: a hash chain); an entry travels as a ``SignedEntry``: its bytes (``encode_struct(SubmitterEntry)``) and
the owner's signature over ``SIGN_CONTEXT + body``, so every node checks exactly the bytes the
owner signed, whoever relayed them.

Who sends what:

* Members keep their logs equal by anti-entropy on CONTROL links: ``SubmittersSync`` says "I
  have this version"; the member that has more answers ``SubmittersEntries`` (the entries the
  other lacks, in order, at most ``MAX_ENTRIES_PER_MESSAGE`` per message); the one that has
  less answers with its own ``SubmittersSync`` so the other pushes.
* A client (``python -m node submitters``) sends ``SubmittersUpdate`` (one signed entry) or
  ``SubmittersList`` on a CLIENT link and gets one ``SubmittersReply`` carrying its ``req``.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocol.schema import (
    Bool,
    Bytes,
    EnumOf,
    Float,
    ListOf,
    Message,
    Optional,
    SchemaViolation,
    Str,
    Struct,
    StructOf,
    UInt,
    register,
    spec,
    unpack_body,
)
from protocol.tags import MsgType

PUBLIC_KEY = Bytes(32, min_len=32)
SIGNATURE = Bytes(64, min_len=64)
DIGEST = Bytes(32, min_len=32)
REQ = UInt(32)

#: What the owner's signature covers: this label, then the entry's body bytes.
SIGN_CONTEXT = b"starmesh submitters v1"
#: ``SubmitterEntry.prev`` of entry 1.
NO_PREV = bytes(32)
#: Most signed entries in one ``SubmittersEntries`` or ``SubmittersReply``.
MAX_ENTRIES_PER_MESSAGE = 256
#: Longest submitter name (characters).
MAX_NAME_CHARS = 100
#: Largest encoded ``SubmitterEntry`` (a 100-character name is at most 400 bytes of UTF-8).
MAX_ENTRY_BODY_BYTES = 640
#: Longest ``SubmittersReply.message``.
MAX_REPLY_MESSAGE_CHARS = 1000


class SubmitterAction(enum.IntEnum):
    GRANT = 1
    """The key may submit from now on."""
    REVOKE = 2
    """The key may no longer submit (until a later GRANT)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SubmitterEntry(Struct):
    """One change to who may submit, as the owner signs it."""

    seq: int = spec(UInt(64))
    """1 for the first entry of a mesh, then each entry the one before plus one."""
    prev: bytes = spec(DIGEST)
    """``entry_digest`` of entry ``seq - 1``'s body (32 zero bytes for entry 1): two logs of one
    version hold the same entries, and an entry signed on top of another head is refused."""
    action: SubmitterAction = spec(EnumOf(SubmitterAction))
    key: bytes = spec(PUBLIC_KEY)
    """The submitter's Ed25519 public key."""
    name: str = spec(Str(MAX_NAME_CHARS), default="")
    """Who it is, for people reading ``submitters`` (not checked)."""
    signed_at: float = spec(Float(0.0))
    """Unix time the owner signed it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedEntry(Struct):
    body: bytes = spec(Bytes(MAX_ENTRY_BODY_BYTES, min_len=1))
    """``encode_struct(SubmitterEntry)``: the signed bytes."""
    signature: bytes = spec(SIGNATURE)
    """Ed25519 by the mesh owner over ``SIGN_CONTEXT + body``."""


def encode_entry(entry: SubmitterEntry) -> bytes:
    """The signed bytes of ``entry``: its msgpack map on its own (``encode_struct`` of the
    task messages: the same bytes)."""
    data: bytes = msgpack.packb(entry.to_wire(), use_bin_type=True)
    return data


def entry_digest(body: bytes) -> bytes:
    """SHA-256("starmesh submitter entry" || body): what the next entry's ``prev`` names."""
    return hashlib.sha256(b"starmesh submitter entry" + body).digest()


def decode_entry(body: bytes) -> SubmitterEntry:
    """``encode_entry``'s inverse, as bounded as every decode; ``RemoteProtocolError``."""
    raw = unpack_body(body, what="submitter entry")
    try:
        entry = SubmitterEntry.from_wire(raw, "SubmitterEntry")
    except SchemaViolation as exc:
        raise RemoteProtocolError(str(exc), code=ErrorCode.SCHEMA_VIOLATION) from None
    except LocalProtocolError as exc:
        raise RemoteProtocolError(str(exc), code=exc.code) from None
    assert isinstance(entry, SubmitterEntry)
    return entry


ENTRIES = ListOf(StructOf(SignedEntry), max_len=MAX_ENTRIES_PER_MESSAGE)


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class SubmittersSync(Message):
    """Member to member: "my log has ``version`` entries"."""

    TAG: ClassVar[MsgType] = MsgType.SUBMITTERS_SYNC
    version: int = spec(UInt(64))


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class SubmittersEntries(Message):
    """Member to member: entries the receiver lacks, consecutive, in ``seq`` order."""

    TAG: ClassVar[MsgType] = MsgType.SUBMITTERS_ENTRIES
    entries: tuple[SignedEntry, ...] = spec(ENTRIES)


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class SubmittersUpdate(Message):
    """Client to node: apply this owner-signed entry (its ``seq`` must be the node's version + 1)."""

    TAG: ClassVar[MsgType] = MsgType.SUBMITTERS_UPDATE
    req: int = spec(REQ)
    entry: SignedEntry = spec(StructOf(SignedEntry))


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class SubmittersList(Message):
    """Client to node: the owner, the log's version and its entries after ``after``."""

    TAG: ClassVar[MsgType] = MsgType.SUBMITTERS_LIST
    req: int = spec(REQ)
    after: int = spec(UInt(64), default=0)
    """Entries with ``seq > after`` (0: from the first); a reply carries at most
    ``MAX_ENTRIES_PER_MESSAGE``, so a client pages until it has ``version``."""

    def to_wire(self) -> dict[str, Any]:
        wire = Message.to_wire(self)
        if not self.after:
            wire.pop("after")
        return wire


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class SubmittersReply(Message):
    """Node to client: the answer to an update or a list."""

    TAG: ClassVar[MsgType] = MsgType.SUBMITTERS_REPLY
    req: int = spec(REQ)
    ok: bool = spec(Bool())
    message: str = spec(Str(MAX_REPLY_MESSAGE_CHARS), default="")
    """Why it failed (``ok`` false), or what was done."""
    owner: bytes | None = spec(Optional(PUBLIC_KEY), default=None)
    """The mesh owner in the node's key file; None: the mesh has no owner (nobody may submit)."""
    version: int = spec(UInt(64), default=0)
    """Entries in the node's log (after the update, for an update)."""
    entries: tuple[SignedEntry, ...] = spec(ENTRIES, default=())
    """For a list: the entries after its ``after``, in order (at most 256)."""


SUBMITTER_TYPES = frozenset({
    MsgType.SUBMITTERS_SYNC, MsgType.SUBMITTERS_ENTRIES, MsgType.SUBMITTERS_UPDATE,
    MsgType.SUBMITTERS_LIST, MsgType.SUBMITTERS_REPLY,
})
