"""``python -m node status``: a node's membership view, served and fetched over CLIENT links.

Server side: ``build_status_reply`` turns the Swim view into a ``StatusReply`` (``StatusService``
answers each ``StatusRequest`` on a CLIENT-channel link with one). Client side:
``StatusClient`` keeps one CLIENT link open for repeated requests (benchmarks poll with it);
``fetch_status`` dials with a throwaway identity and the mesh secret, asks once and closes;
``run_status_command`` prints the answer as a rich table or one JSON object.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import sys
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from discovery.members import MemberView
from node.config import Address, LinkConfig
from node.identity import load_mesh_key
from node.transport import Link, LinkSettings, Spawn, handshake_failure
from protocol import crypto
from protocol.connection import Channel, Role
from protocol.errors import StarmeshError, TimeoutError, TransportError
from protocol.messages.control import MemberReport, MetricSample, StatusReply, StatusRequest
from protocol.messages.gossip import MemberStatus
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


def build_status_reply(
    members: Iterable[MemberView], *, self_id: bytes, now: float, uptime_s: float,
    metrics: tuple[MetricSample, ...] = (),
) -> StatusReply:
    """The answer to a ``StatusRequest``: every member we know (ourselves included) and the
    node's metrics."""
    reports = tuple(member_report(m, now=now, self_id=self_id) for m in members)
    own = next(r for r in reports if r.node == self_id)
    return StatusReply(self_report=own, uptime_s=max(0.0, float(uptime_s)), members=reports,
                       metrics=metrics)


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
    }


def reply_to_json(reply: StatusReply) -> dict[str, Any]:
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


def render_table(reply: StatusReply) -> None:
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
    ``request`` asks once. A request that times out closes the link (a late reply must not
    answer the next request); make a new client then.
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
        settings = LinkSettings(identity=identity or crypto.generate_identity(), mesh_secret=mesh_secret,
                                listen_address=None,
                                config=LinkConfig(handshake_timeout=min(timeout, 600.0)))
        dispatch = {Channel.CLIENT: {MsgType.STATUS_REPLY: client._on_reply}}

        def make_link() -> Link:
            return Link(role=Role.INITIATOR, channel=Channel.CLIENT, settings=settings, dispatch=dispatch,
                        spawn=spawn, on_open=lambda _: None, on_close=client._on_close)

        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, client.link = await loop.create_connection(make_link, address.host, address.port)
                await client.link.opened
        except builtins.TimeoutError:
            client.close()
            raise TimeoutError(f"{address}: no handshake within {timeout}s") from None
        except OSError as exc:
            raise TransportError(f"{address}: {exc.strerror or exc}") from None
        except BaseException:
            client.close()
            raise
        return client

    async def request(self, *, timeout: float = 3.0) -> StatusReply:
        """One ``StatusRequest`` -> ``StatusReply`` round trip."""
        link = self.link
        if link is None:
            raise TransportError("status client is not connected")
        async with self._lock:
            waiter: asyncio.Future[StatusReply] = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                async with asyncio.timeout(timeout):
                    await link.send(StatusRequest())
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


async def fetch_status(address: Address, *, mesh_secret: bytes, timeout: float = 3.0) -> StatusReply:
    """Ask the node at ``address`` for its view once, as a CLIENT with a throwaway identity.

    Raises ``TransportError`` (unreachable), ``TimeoutError`` or ``RemoteProtocolError`` (the
    node refused us, e.g. a different mesh key).
    """
    outcome: StatusReply | StarmeshError = TransportError("no answer")
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


def run_status_command(*, connect: Address, mesh_key_file: Path, as_json: bool, timeout: float) -> int:
    """Body of ``python -m node status``; returns the exit code."""
    secret = load_mesh_key(mesh_key_file)
    try:
        reply = asyncio.run(fetch_status(connect, mesh_secret=secret, timeout=timeout))
    except StarmeshError as exc:
        print(f"error: cannot get status from {connect}: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(reply_to_json(reply), sort_keys=True))
    else:
        render_table(reply)
    return 0
