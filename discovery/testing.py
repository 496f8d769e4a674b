"""An in-memory mesh of ``Swim`` cores on explicit virtual time, for tests and examples.

No I/O and no wall clock: ``run_until(t)`` repeatedly takes the earliest of (a) a message
delivery and (b) a node's ``next_deadline()``, sets ``now`` to it and feeds that node.
Every message goes through the real codec (``encode_body`` / ``decode_body``), so a
message that could not cross the wire fails here too; one over the sealed-message cap
raises ``LocalProtocolError(FRAME_TOO_LARGE)`` at the send, as ``protocol.Connection`` does. Ties are broken by insertion order,
so a run is a pure function of its inputs.

Faults: ``crash(address)`` silences a node (its timers stop, messages to it vanish; with
``hints`` the sender gets ``on_unreachable`` as a TCP dial would report), ``partition``
drops messages between groups, ``drop`` takes any predicate over ``(src, dst, msg)``.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from discovery.config import FloodPolicy, SwimConfig
from discovery.events import MemberEvent
from discovery.swim import Swim
from protocol.connection import MAX_MESSAGE_BYTES
from protocol.errors import ErrorCode, LocalProtocolError
from protocol.messages.gossip import MemberStatus, NodeMeta
from protocol.schema import Message, decode_body, encode_body


def node_id_for(address: str) -> bytes:
    """A deterministic 32-byte node id for a test address."""
    return hashlib.sha256(address.encode()).digest()


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message that crossed (or was dropped by) the in-memory network."""

    at: float
    src: str
    dst: str
    msg: Message
    dropped: bool = False


DropRule = Callable[[str, str, Message], bool]


class MemoryMesh:
    """Several Swim cores wired through an in-memory network with a fixed latency."""

    def __init__(
        self,
        *,
        config: SwimConfig,
        seed: int = 0,
        latency: float = 1 / 1024,
        hints: bool = True,
        flood: FloodPolicy | None = None,
    ) -> None:
        self.config = config
        self.flood = flood
        self.seed = seed
        self.latency = latency
        self.hints = hints
        self.now = 0.0
        self.nodes: dict[str, Swim] = {}
        self.crashed: set[str] = set()
        self.log: list[Delivery] = []
        """Every message sent, in send order (``dropped`` when the network ate it)."""
        self.events: list[tuple[float, str, MemberEvent]] = []
        self._drop_rules: list[DropRule] = []
        self._groups: list[frozenset[str]] = []
        self._frozen: dict[str, float] = {}
        self._queue: list[tuple[float, int, str, str, bytes]] = []
        self._counter = 0

    # ---------------------------------------------------------------- set-up

    def add(self, address: str, *, seeds: Iterable[str] = (), meta: NodeMeta | None = None) -> Swim:
        """Start a node at ``address`` (now) and join it through ``seeds``."""
        rng = random.Random(f"{self.seed}:{address}")
        node = Swim(
            node_id=node_id_for(address),
            address=address,
            meta=meta or NodeMeta(hostname=address.split(":")[0]),
            config=self.config,
            rng=rng,
            now=self.now,
            flood=self.flood,
        )
        self.nodes[address] = node
        self.crashed.discard(address)
        node.join(list(seeds), now=self.now)
        self._collect(address)
        return node

    def crash(self, address: str) -> None:
        """kill -9: the node stops. With ``hints``, every peer's connection to it drops now
        (``on_unreachable``), as the TCP transport reports a reset."""
        self.crashed.add(address)
        if self.hints:
            for other, node in self.nodes.items():
                if other not in self.crashed:
                    node.on_unreachable(address, now=self.now)
                    self._collect(other)

    def freeze(self, address: str, seconds: float) -> None:
        """SIGSTOP for ``seconds``: no timers run and arriving messages wait (in order) in
        its socket buffers; at the thaw they are read first, then its timers fire."""
        self._frozen[address] = self.now + seconds

    def partition(self, *groups: Iterable[str]) -> None:
        """Drop every message between members of different groups (unlisted nodes: own group)."""
        self._groups = [frozenset(g) for g in groups]

    def heal(self) -> None:
        self._groups = []

    def drop(self, rule: DropRule) -> None:
        self._drop_rules.append(rule)

    def clear_drops(self) -> None:
        self._drop_rules.clear()

    # -------------------------------------------------------------- running

    def run_until(self, t: float) -> None:
        """Process every delivery and timer due at or before ``t``; then ``now = t``."""
        while True:
            when, address = self._next_timer()
            deliver_at = self._queue[0][0] if self._queue else None
            if deliver_at is not None and deliver_at <= t and (when is None or deliver_at <= when):
                self._deliver_one()
            elif when is not None and when <= t:
                self.now = max(self.now, when)
                self.nodes[address].handle_timer(now=self.now)
                self._collect(address)
            else:
                break
        self.now = max(self.now, t)

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def inject(self, src: str, dst: str, msg: Message) -> None:
        """Deliver ``msg`` from ``src`` to ``dst`` right now (through the codec)."""
        body = decode_body(encode_body(msg))
        self.nodes[dst].on_message(src, node_id_for(src), body, now=self.now)
        self._collect(dst)

    # -------------------------------------------------------------- queries

    def view(self, address: str) -> dict[str, MemberStatus]:
        """``{address: status}`` as ``address`` sees the mesh."""
        return {m.address: m.status for m in self.nodes[address].members()}

    def converged(self, addresses: Iterable[str] | None = None) -> bool:
        """Every listed (default: every running) node sees exactly the running nodes alive."""
        live = [a for a in self.nodes if a not in self.crashed]
        who = list(addresses) if addresses is not None else live
        want = {a: MemberStatus.ALIVE for a in who}
        return all(
            {k: v for k, v in self.view(a).items() if v is MemberStatus.ALIVE} == want for a in who
        )

    def sent(self, src: str | None = None, *, since: float = 0.0) -> list[Delivery]:
        return [d for d in self.log if (src is None or d.src == src) and d.at >= since]

    def kinds(self, address: str, *, since: float = 0.0) -> list[tuple[str, str]]:
        """``(event kind, member address)`` seen by ``address`` since ``since``."""
        return [
            (e.kind.name, e.member.address)
            for at, a, e in self.events
            if a == address and at >= since
        ]

    # ------------------------------------------------------------- internals

    def _next_timer(self) -> tuple[float | None, str]:
        best: float | None = None
        best_addr = ""
        for address, node in self.nodes.items():
            if address in self.crashed:
                continue
            d = node.next_deadline()
            thaw = self._frozen.get(address)
            if d is not None and thaw is not None and d <= thaw:
                d = thaw + self.latency / 2  # after the buffered messages are read
            if d is not None and (best is None or d < best):
                best, best_addr = d, address
        return best, best_addr

    def _blocked(self, src: str, dst: str, msg: Message) -> bool:
        if dst in self.crashed or src in self.crashed:
            return True
        if self._groups:
            gs = next((g for g in self._groups if src in g), frozenset({src}))
            if dst not in gs:
                return True
        return any(rule(src, dst, msg) for rule in self._drop_rules)

    def _collect(self, address: str) -> None:
        node = self.nodes[address]
        while True:
            while (event := node.next_event()) is not None:
                self.events.append((self.now, address, event))
            out = node.messages_to_send()
            if not out:
                return
            for dst, msg in out:
                self._route(node, address, dst, msg)

    def _route(self, node: Swim, src: str, dst: str, msg: Message) -> None:
        body = encode_body(msg)
        if len(body) > MAX_MESSAGE_BYTES:
            raise LocalProtocolError(
                f"{src} sent a {msg.TAG.name} of {len(body)} bytes, over the "
                f"{MAX_MESSAGE_BYTES}-byte message cap",
                code=ErrorCode.FRAME_TOO_LARGE,
            )
        dropped = dst not in self.nodes or self._blocked(src, dst, msg)
        self.log.append(Delivery(self.now, src, dst, msg, dropped))
        if not dropped:
            self._counter += 1
            heapq.heappush(self._queue, (self.now + self.latency, self._counter, src, dst, body))
        elif (
            self.hints
            and src not in self.crashed
            and (dst not in self.nodes or dst in self.crashed)
        ):
            node.on_unreachable(dst, now=self.now)  # what a refused TCP dial reports

    def _deliver_one(self) -> None:
        at, _, src, dst, body = heapq.heappop(self._queue)
        self.now = max(self.now, at)
        if dst in self.crashed:
            return
        thaw = self._frozen.get(dst)
        if thaw is not None and at < thaw:  # held in the socket buffer until the thaw
            self._counter += 1
            heapq.heappush(self._queue, (thaw, self._counter, src, dst, body))
            return
        self.nodes[dst].on_message(src, node_id_for(src), decode_body(body), now=self.now)
        self._collect(dst)
