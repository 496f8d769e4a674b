"""Node control messages: what ``python -m node status`` asks a node and what it answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from protocol.limits import MAX_MEMBERS_PER_SYNC
from protocol.messages.gossip import ADDRESS, INCARNATION, NODE_ID, MemberStatus, NodeMeta
from protocol.schema import EnumOf, Float, ListOf, Message, Str, Struct, StructOf, register, spec
from protocol.tags import MsgType


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class StatusRequest(Message):
    TAG: ClassVar[MsgType] = MsgType.STATUS_REQUEST


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
    """The answering node's metrics (``node.metrics``; names without ``starmesh_``)."""
