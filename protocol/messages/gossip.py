"""SWIM membership messages (memberlist's ping/indirect-ping/ack/nack/alive/suspect/dead/push-pull).

Semantics live in ``discovery/``; this module only fixes their shape on the wire
(PROTOCOL.md §Gossip). Piggybacking is done the memberlist way: gossip messages
(``Alive``/``Suspect``/``Dead``) are sent in the same write as a ``Ping``/``Ack``, as
separate frames, so no union-typed field is needed.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from protocol.errors import ErrorCode, LocalProtocolError
from protocol.limits import (
    MAX_ADDRESS_LEN,
    MAX_FRAME_BYTES,
    MAX_MEMBERS_PER_SYNC,
    MAX_META_BYTES,
    NODE_ID_BYTES,
)
from protocol.schema import (
    Bool,
    Bytes,
    EnumOf,
    ListOf,
    Message,
    Str,
    Struct,
    StructOf,
    UInt,
    register,
    spec,
)
from protocol.tags import MsgType

#: "host:port", "[v6]:port". Hostnames are letters, digits, '.', '-', '_'.
ADDRESS_PATTERN = r"(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9._-]{1,253}):[0-9]{1,5}"

NODE_ID = Bytes(NODE_ID_BYTES, min_len=NODE_ID_BYTES)
ADDRESS = Str(MAX_ADDRESS_LEN, pattern=ADDRESS_PATTERN)
INCARNATION = UInt(64)
SEQ = UInt(32)


class MemberStatus(enum.IntEnum):
    """A member's state in the SWIM state machine (discovery/swim.py)."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuInfo(Struct):
    name: str = spec(Str(128))
    memory_bytes: int = spec(UInt(64))


#: Tags in one ``NodeMeta``, and characters in one tag.
MAX_TAGS = 16
MAX_TAG_LEN = 64
#: A member tag, ``key=value``: ASCII letters, digits and ``_.-`` in the key, also ``:/@+``
#: in the value, neither empty (no ``,``: the CLI takes comma-separated lists of tags).
TAG_PATTERN = r"[A-Za-z0-9_.-]+=[A-Za-z0-9_.:/@+-]+"
TAG = Str(MAX_TAG_LEN, pattern=TAG_PATTERN)


def is_tag(text: object) -> bool:
    """Whether ``text`` is a valid member tag (``TAG_PATTERN``, at most ``MAX_TAG_LEN`` chars)."""
    return (type(text) is str and len(text) <= MAX_TAG_LEN
            and re.fullmatch(TAG_PATTERN, text) is not None)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeMeta(Struct):
    """What a member advertises about itself. Changing it bumps the incarnation."""

    protocol_version: int = spec(UInt(16), default=1)
    hostname: str = spec(Str(128), default="")
    cpus: int = spec(UInt(16), default=0)
    memory_bytes: int = spec(UInt(64), default=0)
    gpus: tuple[GpuInfo, ...] = spec(ListOf(StructOf(GpuInfo), max_len=16), default=())
    torch_version: str = spec(Str(64), default="")
    cuda_version: str = spec(Str(64), default="")
    load: int = spec(UInt(32), default=0)
    """Tasks this node is running now."""
    tags: tuple[str, ...] = spec(ListOf(TAG, max_len=MAX_TAGS), default=())
    """``key=value`` labels the member chose (``--tag job=resnet``), e.g. to scope groups.
    Omitted on the wire when empty: a tagless meta encodes as before the field existed."""

    def to_wire(self) -> dict[str, Any]:
        wire = Struct.to_wire(self)
        if not self.tags:
            del wire["tags"]
        return wire

    def __post_init__(self) -> None:
        Struct.__post_init__(self)
        if meta_size_bound(self) > MAX_META_BYTES:  # rare: encode to know for sure
            size = encoded_meta_size(self)
            if size > MAX_META_BYTES:
                raise LocalProtocolError(
                    f"NodeMeta encodes to {size} bytes, over the {MAX_META_BYTES}-byte cap",
                    code=ErrorCode.SCHEMA_VIOLATION,
                )


#: Bytes of an encoded ``NodeMeta`` besides its strings' UTF-8, its GPUs and its tags: the
#: map header, the eight keys, the largest encodings of its integers, str16 and array16
#: headers (114).
_META_FIXED_BYTES = 114
#: The same for one ``GpuInfo`` besides its name's UTF-8 (31).
_GPU_FIXED_BYTES = 31
#: The ``tags`` key and its array16 header (8), when tags are present; then a str8 header
#: per tag (2) before its ASCII.
_TAGS_FIXED_BYTES = 8
_TAG_FIXED_BYTES = 2


def encoded_meta_size(meta: NodeMeta) -> int:
    """Bytes of ``meta`` encoded with every field present (what ``MAX_META_BYTES`` caps)."""
    return len(msgpack.packb(meta.to_wire(), use_bin_type=True))


def meta_size_bound(meta: NodeMeta) -> int:
    """An upper bound of ``encoded_meta_size(meta)`` that encodes nothing (a character is at
    most 4 bytes of UTF-8), so validating a typical meta costs no extra encode."""
    chars = len(meta.hostname) + len(meta.torch_version) + len(meta.cuda_version)
    gpus = sum(_GPU_FIXED_BYTES + 4 * len(g.name) for g in meta.gpus)
    tags = _TAGS_FIXED_BYTES + sum(_TAG_FIXED_BYTES + len(t) for t in meta.tags) if meta.tags else 0
    return _META_FIXED_BYTES + 4 * chars + gpus + tags


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Ping(Message):
    """Direct probe. ``target`` lets a node that took over an address ignore stale probes."""

    TAG: ClassVar[MsgType] = MsgType.PING
    seq: int = spec(SEQ)
    target: bytes = spec(NODE_ID)


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class PingReq(Message):
    """Indirect probe request: 'please ping ``target`` at ``address`` for me and ack ``seq``'."""

    TAG: ClassVar[MsgType] = MsgType.PING_REQ
    seq: int = spec(SEQ)
    target: bytes = spec(NODE_ID)
    address: str = spec(ADDRESS)
    nack: bool = spec(Bool(), default=True)
    """Lifeguard: send a Nack if the target does not answer, so the requester learns we are alive."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Ack(Message):
    TAG: ClassVar[MsgType] = MsgType.ACK
    seq: int = spec(SEQ)


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Nack(Message):
    TAG: ClassVar[MsgType] = MsgType.NACK
    seq: int = spec(SEQ)


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Alive(Message):
    TAG: ClassVar[MsgType] = MsgType.ALIVE
    incarnation: int = spec(INCARNATION)
    node: bytes = spec(NODE_ID)
    address: str = spec(ADDRESS)
    meta: NodeMeta = spec(StructOf(NodeMeta))


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Suspect(Message):
    TAG: ClassVar[MsgType] = MsgType.SUSPECT
    incarnation: int = spec(INCARNATION)
    node: bytes = spec(NODE_ID)
    sender: bytes = spec(NODE_ID)
    """Who suspects (memberlist's ``From``): independent suspectors shorten the suspicion timeout."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Dead(Message):
    """``node`` is dead. When ``sender == node`` the member left gracefully (memberlist's rule)."""

    TAG: ClassVar[MsgType] = MsgType.DEAD
    incarnation: int = spec(INCARNATION)
    node: bytes = spec(NODE_ID)
    sender: bytes = spec(NODE_ID)


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberState(Struct):
    """One member as carried in a push/pull state sync."""

    node: bytes = spec(NODE_ID)
    address: str = spec(ADDRESS)
    incarnation: int = spec(INCARNATION)
    status: MemberStatus = spec(EnumOf(MemberStatus))
    meta: NodeMeta = spec(StructOf(NodeMeta))


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class PushPull(Message):
    """Anti-entropy full state exchange. ``join`` is set on a joiner's first sync with a seed;
    ``reply`` is set on the answer, which must not be answered again."""

    TAG: ClassVar[MsgType] = MsgType.PUSH_PULL
    join: bool = spec(Bool(), default=False)
    reply: bool = spec(Bool(), default=False)
    members: tuple[MemberState, ...] = spec(ListOf(StructOf(MemberState), max_len=MAX_MEMBERS_PER_SYNC))


GOSSIP_TYPES = (Alive, Suspect, Dead)

#: Largest encoded body of one ``PushPull`` (or status page) a node sends. A larger table goes
#: in several messages; 1 MiB is an eighth of the frame cap, so a sync never nears it and a
#: part never holds a CONTROL link for long (a member with maximal metadata is ~4.5 KiB: about
#: 230 members per part; with small metadata the 4 096-entry cap cuts first).
MAX_SYNC_BYTES = 1 << 20
assert MAX_SYNC_BYTES < MAX_FRAME_BYTES // 2

#: Bytes of an encoded ``PushPull`` besides its entries (an upper bound): the map header, the
#: keys ``t``/``join``/``reply``/``members``, the tag, two bools and an array32 header (30).
PUSH_PULL_FIXED_BYTES = 32


def encoded_size(value: Struct) -> int:
    """Bytes of ``value`` (a message or a nested struct) encoded as msgpack."""
    return len(msgpack.packb(value.to_wire(), use_bin_type=True))


def split_by_size(sizes: Sequence[int], *, budget: int, max_items: int) -> list[range]:
    """Cut a list of items with encoded ``sizes`` into consecutive runs of at most ``max_items``
    items whose sizes sum to at most ``budget`` (an item over ``budget`` alone is a run of its
    own: never the case here, entries are a few KiB). An empty list gives no run."""
    runs: list[range] = []
    start, used = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (used + size > budget or i - start >= max_items):
            runs.append(range(start, i))
            start, used = i, 0
        used += size
    if start < len(sizes):
        runs.append(range(start, len(sizes)))
    return runs
