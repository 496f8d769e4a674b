"""Node control messages: what ``python -m node status`` asks a node and what it answers.

A node's view can be larger than one message: the answer is paged. Members are listed in
node-id order; a ``StatusRequest`` names the last member the client already has (``after``,
absent for the first page) and each ``StatusReply`` names the last member it carries
(``next_after``, absent on the last page), so a member that joins or leaves between two pages
never shifts the others. Pages are cut by encoded size (``MAX_SYNC_BYTES``), the metrics go on
the first page only. Every new field is optional: a node that predates paging ignores
``after`` and answers everything at once without ``next_after``, which a client reads as the
last page; a client that predates it gets the first page.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from protocol.limits import MAX_MEMBERS_PER_SYNC
from protocol.messages.gossip import ADDRESS, INCARNATION, NODE_ID, MemberStatus, NodeMeta
from protocol.schema import (
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


def _omit_defaults(wire: dict[str, Any], *names: str) -> dict[str, Any]:
    """Leave the paging fields out while they are None or 0: an unpaged request or reply
    encodes exactly as before the fields existed."""
    for name in names:
        if wire.get(name) in (None, 0):
            wire.pop(name, None)
    return wire


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class StatusRequest(Message):
    TAG: ClassVar[MsgType] = MsgType.STATUS_REQUEST
    after: bytes | None = spec(Optional(NODE_ID), default=None)
    """List the members whose node id sorts after this one (the previous page's
    ``next_after``); None (or absent): from the first member, with the metrics."""

    def to_wire(self) -> dict[str, Any]:
        return _omit_defaults(Message.to_wire(self), "after")


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberReport(Struct):
    node: bytes = spec(NODE_ID)
    address: str = spec(ADDRESS)
    status: MemberStatus = spec(EnumOf(MemberStatus))
    incarnation: int = spec(INCARNATION)
    meta: NodeMeta = spec(StructOf(NodeMeta))
    last_heard_s: float = spec(Float(0.0))
    """Seconds since this node last heard from the member (0 for itself)."""


#: Most metric samples in one ``StatusReply``.
MAX_STATUS_METRICS = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricSample(Struct):
    """One metric sample as Prometheus names it, e.g. ``members{state="alive"}``."""

    name: str = spec(Str(max_len=200, pattern=r'[a-z_][a-z0-9_]*(\{[a-z_]+="[^"]{0,100}"\})?'))
    value: float = spec(Float())


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class StatusReply(Message):
    TAG: ClassVar[MsgType] = MsgType.STATUS_REPLY
    self_report: MemberReport = spec(StructOf(MemberReport))
    uptime_s: float = spec(Float(0.0))
    members: tuple[MemberReport, ...] = spec(ListOf(StructOf(MemberReport), max_len=MAX_MEMBERS_PER_SYNC))
    metrics: tuple[MetricSample, ...] = spec(ListOf(StructOf(MetricSample), max_len=MAX_STATUS_METRICS),
                                            default=())
    """The answering node's metrics (``node.metrics``; names without ``starmesh_``), on the
    first page only."""
    next_after: bytes | None = spec(Optional(NODE_ID), default=None)
    """None (or absent): this is the last page. Else the node id of this page's last member:
    send it as ``StatusRequest.after`` for the next page."""
    total: int = spec(UInt(32), default=0)
    """Members the node knows, itself included, over all pages (0 from a node that does not
    page its answers)."""

    def to_wire(self) -> dict[str, Any]:
        return _omit_defaults(Message.to_wire(self), "next_after", "total")
