"""``python -m node status``: a node's membership view, served and fetched over CLIENT links.

Server side: ``build_status_reply`` turns the Swim view into one page of the answer, a
``StatusReply`` of at most ``MAX_PAGE_BYTES`` (``StatusService`` answers each ``StatusRequest``
on a CLIENT-channel link with one; paging: ``protocol.messages.control``). Client side:
``StatusClient`` keeps one CLIENT link open for repeated requests (benchmarks poll with it), each
fetching every page into one ``NodeStatus``; ``fetch_status`` dials with a throwaway identity and
the mesh secret, asks once and closes; ``render_table`` / ``reply_to_json`` print an answer
(``node.cli`` runs ``python -m node status``).
"""

from __future__ import annotations

import asyncio
import bisect
import builtins
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from discovery.members import MemberView
from node.client_link import dial_client
from node.config import Address
from node.transport import Link, Spawn, handshake_failure
from protocol import crypto
from protocol.connection import Channel
from protocol.errors import (
    ErrorCode,
    RemoteProtocolError,
    StarmeshError,
    TimeoutError,
    TransportError,
)
from protocol.limits import MAX_MEMBERS_PER_SYNC
from protocol.messages.control import MemberReport, MetricSample, StatusReply, StatusRequest
from protocol.messages.gossip import MAX_SYNC_BYTES, MemberStatus, encoded_size
from protocol.schema import Message
from protocol.tags import MsgType

STATE_NAMES = {
    MemberStatus.ALIVE: "alive",
    MemberStatus.SUSPECT: "suspect",
    MemberStatus.DEAD: "dead",
    MemberStatus.LEFT: "left",
}
_STATE_STYLE = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim"}


def member_report(view: MemberView, *, now: float, self_id: bytes) -> MemberReport:
    heard = 0.0 if view.node_id == self_id else max(0.0, now - view.last_heard)
    return MemberReport(
        node=view.node_id,
        address=view.address,
        status=view.status,
        incarnation=view.incarnation,
        meta=view.meta,
        last_heard_s=float(heard),
    )


#: Largest encoded body of one status page.
MAX_PAGE_BYTES = MAX_SYNC_BYTES
#: Bytes of an encoded ``StatusReply`` besides its reports and samples (an upper bound): the map
#: header, seven keys, the tag, a float64, two array32 headers, a 32-byte cursor, a uint32.
_REPLY_FIXED_BYTES = 128
#: Most members a client assembles from the pages of one answer (a member table's cap).
MAX_STATUS_MEMBERS = 65_536


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """A node's whole answer, assembled from its pages (``StatusClient.request``)."""

    self_report: MemberReport
    uptime_s: float
    members: tuple[MemberReport, ...]
    """Every member the node knows, itself included, in node-id order."""
    metrics: tuple[MetricSample, ...]


def build_status_reply(
    members: Iterable[MemberView], *, self_id: bytes, now: float, uptime_s: float,
    metrics: tuple[MetricSample, ...] = (), after: bytes | None = None,
) -> StatusReply:
    """One page of the answer to ``StatusRequest(after=after)``: the members (ourselves
    included) whose node id sorts after ``after``, in node-id order, as many as fit
    ``MAX_PAGE_BYTES`` encoded (and ``MAX_MEMBERS_PER_SYNC``), at least one; our own report; and
    on the first page (``after`` None) the node's ``metrics``."""
    views = sorted(members, key=lambda v: v.node_id)
    own = member_report(next(v for v in views if v.node_id == self_id), now=now, self_id=self_id)
    metrics = () if after is not None else metrics
    budget = (MAX_PAGE_BYTES - _REPLY_FIXED_BYTES - encoded_size(own)
              - sum(encoded_size(m) for m in metrics))
    start = 0 if after is None else bisect.bisect_right([v.node_id for v in views], after)
    reports: list[MemberReport] = []
    used = 0
    for view in views[start:]:
        report = member_report(view, now=now, self_id=self_id)
        size = encoded_size(report)
        if reports and (used + size > budget or len(reports) >= MAX_MEMBERS_PER_SYNC):
            break
        reports.append(report)
        used += size
    more = start + len(reports) < len(views)
    return StatusReply(self_report=own, uptime_s=max(0.0, float(uptime_s)), members=tuple(reports),
                       metrics=metrics, next_after=reports[-1].node if more else None,
                       total=len(views))


def report_to_json(report: MemberReport) -> dict[str, Any]:
    meta = report.meta
    return {
        "id": report.node.hex(),
        "short_id": crypto.short_id(report.node),
        "address": report.address,
        "state": STATE_NAMES[report.status],
        "incarnation": report.incarnation,
        "last_heard_s": round(report.last_heard_s, 3),
        "hostname": meta.hostname,
        "cpus": meta.cpus,
        "memory_bytes": meta.memory_bytes,
        "gpus": [{"name": g.name, "memory_bytes": g.memory_bytes} for g in meta.gpus],
        "torch_version": meta.torch_version,
        "cuda_version": meta.cuda_version,
        "load": meta.load,
        "protocol_version": meta.protocol_version,
        "tags": list(meta.tags),
    }


def reply_to_json(reply: StatusReply | NodeStatus) -> dict[str, Any]:
    """``{"self": ..., "uptime_s": ..., "members": [{"id", "address", "state", ...}],
    "metrics": {"members{state=\"alive\"}": 3.0, ...}}``."""
    return {
        "self": report_to_json(reply.self_report),
        "uptime_s": round(reply.uptime_s, 3),
        "members": [report_to_json(r) for r in reply.members],
        "metrics": {m.name: m.value for m in reply.metrics},
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "-"


def _resources(m: dict[str, Any]) -> str:
    parts = [f"{m['cpus']} cpu", _gib(m["memory_bytes"])]
    parts += [f"{g['name']} {_gib(g['memory_bytes'])}" for g in m["gpus"]]
    if m["torch_version"]:
        cuda = f" cuda {m['cuda_version']}" if m["cuda_version"] else ""
        parts.append(f"torch {m['torch_version']}{cuda}")
    return ", ".join(parts)


def render_table(reply: StatusReply | NodeStatus) -> None:
    """Print the view as a rich table (imported only here: the node never loads rich)."""
    from rich.console import Console
    from rich.table import Table

    data = reply_to_json(reply)
    me = data["self"]
    counts = {s: sum(1 for m in data["members"] if m["state"] == s) for s in _STATE_STYLE}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    table = Table(title=f"node {me['short_id']} at {me['address']}, up {data['uptime_s']:.0f}s: {summary}")
    for column in ("id", "address", "state", "inc", "resources", "heard"):
        table.add_column(column, no_wrap=column != "resources")
    for m in data["members"]:
        style = _STATE_STYLE[m["state"]]
        heard = "self" if m["id"] == me["id"] else f"{m['last_heard_s']:.1f}s ago"
        table.add_row(
            m["short_id"], m["address"], f"[{style}]{m['state']}[/]", str(m["incarnation"]),
            _resources(m), heard,
        )
    Console().print(table)


class StatusClient:
    """A CLIENT-channel link to one node, for repeated status requests (one at a time).

    ``connect`` dials with a throwaway identity (or ``identity``) and the mesh secret;
    ``request`` fetches the whole answer, page by page. A page that times out closes the link
    (a late reply must not answer the next request); make a new client then.
    """

    def __init__(self) -> None:
        self.link: Link | None = None
        self._waiter: asyncio.Future[StatusReply] | None = None
        self._lock = asyncio.Lock()

    async def _on_reply(self, link: Link, message: Message) -> None:
        waiter = self._waiter
        if isinstance(message, StatusReply) and waiter is not None and not waiter.done():
            waiter.set_result(message)

    def _on_close(self, link: Link, error: BaseException | None) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(handshake_failure(link))
            waiter.exception()  # retrieved here; request() re-raises it

    @classmethod
    async def connect(
        cls, address: Address, *, mesh_secret: bytes, spawn: Spawn, timeout: float = 3.0,
        identity: Ed25519PrivateKey | None = None,
    ) -> StatusClient:
        """Dial ``address`` and finish the handshake. ``TransportError``, ``TimeoutError`` or
        ``RemoteProtocolError`` (refused, e.g. another mesh key)."""
        client = cls()
        client.link = await dial_client(
            address, mesh_secret=mesh_secret, spawn=spawn, identity=identity, timeout=timeout,
            dispatch={Channel.CLIENT: {MsgType.STATUS_REPLY: client._on_reply}}, on_close=client._on_close)
        return client

    async def request(self, *, timeout: float = 3.0) -> NodeStatus:
        """The node's whole view: ``StatusRequest`` -> ``StatusReply`` round trips, one per
        page (each within ``timeout``), until a page says it is the last. A node that pages
        wrongly (a cursor that does not advance, more than ``MAX_STATUS_MEMBERS``) is a
        ``RemoteProtocolError``."""
        async with self._lock:
            first = page = await self._page(StatusRequest(), timeout)
            members = list(page.members)
            while page.next_after is not None:
                after = page.next_after
                if not page.members or page.members[-1].node != after:
                    raise RemoteProtocolError("status page cursor is not its last member")
                if len(members) > MAX_STATUS_MEMBERS:
                    raise RemoteProtocolError(f"status answer over {MAX_STATUS_MEMBERS} members",
                                              code=ErrorCode.LIMIT_EXCEEDED)
                page = await self._page(StatusRequest(after=after), timeout)
                if page.members and page.members[0].node <= after:
                    raise RemoteProtocolError("status pages are not in node-id order")
                members.extend(page.members)
        return NodeStatus(self_report=first.self_report, uptime_s=first.uptime_s,
                          members=tuple(members), metrics=first.metrics)

    async def _page(self, request: StatusRequest, timeout: float) -> StatusReply:
        """One ``StatusRequest`` -> ``StatusReply`` round trip (the caller holds the lock)."""
        link = self.link
        if link is None:
            raise TransportError("status client is not connected")
        waiter: asyncio.Future[StatusReply] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            async with asyncio.timeout(timeout):
                await link.send(request)
                return await waiter
        except builtins.TimeoutError:
            self.close()
            raise TimeoutError(f"{link.remote}: no status reply within {timeout}s") from None
        finally:
            self._waiter = None

    @property
    def is_open(self) -> bool:
        return self.link is not None and self.link.is_open

    def close(self) -> None:
        if self.link is not None:
            self.link.close()


async def fetch_status(address: Address, *, mesh_secret: bytes, timeout: float = 3.0) -> NodeStatus:
    """Ask the node at ``address`` for its whole view once (every page), as a CLIENT with a
    throwaway identity.

    Raises ``TransportError`` (unreachable), ``TimeoutError`` or ``RemoteProtocolError`` (the
    node refused us, e.g. a different mesh key).
    """
    outcome: NodeStatus | StarmeshError = TransportError("no answer")
    async with asyncio.TaskGroup() as tasks:  # the link's reader task lives here

        def spawn(coro: Coroutine[Any, Any, None]) -> None:
            tasks.create_task(coro)

        try:
            client = await StatusClient.connect(address, mesh_secret=mesh_secret, spawn=spawn,
                                                timeout=timeout)
            try:
                outcome = await client.request(timeout=timeout)
            finally:
                client.close()
        except StarmeshError as exc:  # raised after the group: 3.11 would wrap it in a group
            outcome = exc
    if isinstance(outcome, StarmeshError):
        raise outcome
    return outcome
