"""The node's answer to ``python -m node status``: members and metrics on CLIENT links.

A ``StatusRequest`` on a CLIENT link is answered at once with one ``StatusReply``: one page
of the members this node knows, after the request's ``after`` cursor
(``node.status.build_status_reply``), and on the first page a snapshot of its metrics
(``node.metrics.flatten`` of ``Node.stats()``, taken only then). The reply is written
without waiting: a client that does not read its replies is disconnected, never waited on.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from discovery.events import MemberEvent
from node.context import Handlers, NodeContext
from node.core import Stats
from node.metrics import flatten
from node.status import build_status_reply
from node.transport import Link
from protocol.connection import Channel
from protocol.errors import ErrorCode
from protocol.messages.control import MAX_STATUS_METRICS, MetricSample, StatusRequest
from protocol.schema import Message
from protocol.tags import MsgType


class StatusService:
    """Serves ``STATUS_REQUEST`` (module docstring)."""

    name = "status"

    def __init__(self, ctx: NodeContext, *, metrics: Callable[[], Stats], started: float) -> None:
        self._ctx = ctx
        self._metrics = metrics
        self._started = started
        self.served = 0

    def handlers(self) -> Handlers:
        return {(Channel.CLIENT, MsgType.STATUS_REQUEST): self._serve}

    def on_member_event(self, event: MemberEvent) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def stats(self) -> Stats:
        return {"status_requests_total": float(self.served)}

    def samples(self) -> tuple[MetricSample, ...]:
        """The node's metrics as wire samples (finite values only, at most the wire's cap)."""
        flat = flatten(self._metrics())
        return tuple(MetricSample(name=k, value=v) for k, v in list(flat.items())[:MAX_STATUS_METRICS]
                     if math.isfinite(v))

    async def _serve(self, link: Link, message: Message) -> None:
        assert isinstance(message, StatusRequest)
        now = self._ctx.now()
        self.served += 1
        after = message.after
        reply = build_status_reply(self._ctx.members(), self_id=self._ctx.node_id, now=now,
                                   uptime_s=now - self._started, after=after,
                                   metrics=() if after is not None else self.samples())
        if not link.send_nowait(reply):  # never wait on a client that does not read its replies
            link.abort(ErrorCode.LIMIT_EXCEEDED, "status client is not reading its replies")
