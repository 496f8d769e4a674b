"""SWIM membership messages (memberlist's ping/indirect-ping/ack/nack/alive/suspect/dead/push-pull).

Semantics live in ``discovery/``; this module only fixes their shape on the wire
(PROTOCOL.md §Gossip). Piggybacking is done the memberlist way: gossip messages
(``Alive``/``Suspect``/``Dead``) are sent in the same write as a ``Ping``/``Ack``, as
separate frames, so no union-typed field is needed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

import msgpack

from protocol.errors import ErrorCode, LocalProtocolError
from protocol.limits import MAX_ADDRESS_LEN, MAX_MEMBERS_PER_SYNC, MAX_META_BYTES, NODE_ID_BYTES
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

    def __post_init__(self) -> None:
        Struct.__post_init__(self)
        if meta_size_bound(self) > MAX_META_BYTES:  # rare: encode to know for sure
            size = encoded_meta_size(self)
            if size > MAX_META_BYTES:
                raise LocalProtocolError(
                    f"NodeMeta encodes to {size} bytes, over the {MAX_META_BYTES}-byte cap",
                    code=ErrorCode.SCHEMA_VIOLATION,
                )


#: Bytes of an encoded ``NodeMeta`` besides its strings' UTF-8 and its GPUs: the map header,
#: the eight keys, the largest encodings of its integers, str16 and array16 headers (114).
_META_FIXED_BYTES = 114
#: The same for one ``GpuInfo`` besides its name's UTF-8 (31).
_GPU_FIXED_BYTES = 31


def encoded_meta_size(meta: NodeMeta) -> int:
    """Bytes of ``meta`` encoded with every field present (what ``MAX_META_BYTES`` caps)."""
    return len(msgpack.packb(meta.to_wire(), use_bin_type=True))


def meta_size_bound(meta: NodeMeta) -> int:
    """An upper bound of ``encoded_meta_size(meta)`` that encodes nothing (a character is at
    most 4 bytes of UTF-8), so validating a typical meta costs no extra encode."""
    chars = len(meta.hostname) + len(meta.torch_version) + len(meta.cuda_version)
    gpus = sum(_GPU_FIXED_BYTES + 4 * len(g.name) for g in meta.gpus)
    return _META_FIXED_BYTES + 4 * chars + gpus


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
