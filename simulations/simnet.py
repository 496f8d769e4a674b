"""A discrete-event network for sans-I/O cores: one timer heap, virtual ``now``, seeded faults.

Theory of operation
-------------------
Everything that happens is an entry ``(time, order, kind, node, payload)`` in one heap;
the loop pops the earliest, sets ``now`` to its time and feeds the one node it concerns
(a delivered message or its timer). After every feed the node's outputs are drained: each
message is encoded with the real codec (``encode_body``), passed through the fault model
(crash, partition, loss), delayed, and later decoded with ``decode_body`` at the receiver.
Each node has one live timer entry at its ``next_deadline()``; a re-armed timer bumps a
generation number and stale entries are skipped when popped.

Codec: every message is encoded with ``encode_body`` and decoded with ``decode_body``
(each distinct body once: a gossip message sent to many peers has one body). Large state
syncs are unpacked and their member entries decoded one distinct entry at a time with
the real ``MemberState`` decoder, then rebuilt into a validated ``PushPull``: a 1000-member
sync is mostly entries decoded before, and decoding each from scratch would dominate a
1000-node run.

Determinism: ties are broken by a global insertion counter; node ``i`` decides with
``random.Random(f"{seed}:node:{i}")`` and its outgoing link faults (loss, delay, jitter) are
drawn from its own stream ``random.Random(f"{seed}:net:{i}")`` (per-sender streams, so one
node's extra traffic does not reshuffle everyone else's luck; per-link streams would cost
N^2 generators). Nothing reads a wall clock, and nothing iterates a hash-ordered set.

Logging: records emitted while a node is being fed carry ``T=<virtual time> node=<id>``
(``SimTimeFilter``), like the 500 Lines "cluster" chapter's SimTimeLogger.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import random
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack

from discovery.config import SwimConfig
from discovery.events import MemberEvent
from discovery.swim import Swim
from protocol.messages.gossip import MemberState, NodeMeta, PushPull
from protocol.schema import Message, decode_body, encode_body
from protocol.tags import MsgType

_TIMER, _DELIVER, _CALL = 0, 1, 2

#: Bodies larger than this are state syncs, decoded entry by entry (``_decode_sync``).
_SYNC_BODY = 4096

#: Bytes a frame adds around a msgpack body on the real wire (length prefix + AEAD tag).
FRAME_OVERHEAD = 4 + 16


class SimTimeFilter(logging.Filter):
    """Prefix log records with the simulation's virtual time and the node being fed."""

    def __init__(self, net: SimNet) -> None:
        super().__init__()
        self.net = net

    def filter(self, record: logging.LogRecord) -> bool:
        node = self.net.current
        who = "-" if node < 0 else self.net.labels[node]
        record.msg = f"T={self.net.now:.3f} node={who} {record.msg}"
        return True


@dataclass(slots=True)
class Faults:
    """The fault model of the links."""

    loss: float = 0.0
    """Probability that one write (a message and what is piggybacked on it) is lost."""
    delay: float = 0.005
    """Mean one-way delay in seconds; each message takes ``delay * U(0.5, 1.5)``."""
    hints: bool = False
    """Tell a sender ``on_unreachable`` when it sends to a crashed node (a refused TCP dial)."""
    groups: list[frozenset[int]] = field(default_factory=list)
    """Partition: messages between different groups are dropped (empty: no partition)."""


@dataclass(slots=True)
class Traffic:
    """Messages and bytes sent, per node, since ``since``."""

    since: float
    messages: list[int]
    bytes: list[int]
    sync_bytes: list[int]
    """The part of ``bytes`` that was PushPull (state sync)."""


EventHook = Callable[[int, MemberEvent], None]


class SimNet:
    """N Swim cores on one discrete-event network."""

    def __init__(
        self, *, n: int, seed: int, config: SwimConfig, faults: Faults, on_event: EventHook
    ) -> None:
        self.n = n
        self.seed = seed
        self.config = config
        self.faults = faults
        self.on_event = on_event
        self.now = 0.0
        self.current = -1
        self.labels = [f"n{i}" for i in range(n)]
        self.addresses = [f"n{i}:7946" for i in range(n)]
        self.index = {a: i for i, a in enumerate(self.addresses)}
        self.ids = [hashlib.sha256(f"{seed}:id:{i}".encode()).digest() for i in range(n)]
        self.nodes: list[Swim | None] = [None] * n
        self.crashed = [False] * n
        self._net_rng = [random.Random(f"{seed}:net:{i}") for i in range(n)]
        self._heap: list[tuple[float, int, int, int, object]] = []
        self._order = 0
        self._timer_at: list[float | None] = [None] * n
        self._timer_gen = [0] * n
        self._encoded: dict[int, tuple[Message, bytes]] = {}
        self._decoded: dict[bytes, Message] = {}
        self._states: dict[bytes, MemberState] = {}
        self.traffic = Traffic(0.0, [0] * n, [0] * n, [0] * n)
        self.delivered = 0
        self.lost = 0

    # ------------------------------------------------------------ scheduling

    def _push(self, at: float, kind: int, node: int, payload: object) -> None:
        self._order += 1
        heapq.heappush(self._heap, (at, self._order, kind, node, payload))

    def call_at(self, at: float, fn: Callable[[], None]) -> None:
        """Run ``fn()`` at virtual time ``at`` (scenario steps: starts, crashes, samples)."""
        self._push(at, _CALL, -1, fn)

    def start(self, i: int, *, seeds: list[int], meta: NodeMeta) -> None:
        """Boot node ``i`` now and join it through ``seeds``."""
        rng = random.Random(f"{self.seed}:node:{i}")
        swim = Swim(
            node_id=self.ids[i],
            address=self.addresses[i],
            meta=meta,
            config=self.config,
            rng=rng,
            now=self.now,
        )
        self.nodes[i] = swim
        self.crashed[i] = False
        self.current = i
        swim.join([self.addresses[s] for s in seeds], now=self.now)
        self._after(i, swim)

    def crash(self, i: int) -> None:
        """Node ``i`` stops: no timers, incoming messages vanish. With ``hints`` its peers
        hear at once that their connection to it dropped (``on_unreachable``)."""
        self.crashed[i] = True
        if self.faults.hints:
            for j, swim in enumerate(self.nodes):
                if swim is not None and not self.crashed[j]:
                    self.current = j
                    swim.on_unreachable(self.addresses[i], now=self.now)
                    self._after(j, swim)

    def poke(self, i: int, fn: Callable[[Swim], None]) -> None:
        """Call ``fn(node)`` now (e.g. ``update_meta``) and process its outputs."""
        swim = self.nodes[i]
        assert swim is not None
        self.current = i
        fn(swim)
        self._after(i, swim)

    def reset_traffic(self) -> None:
        self.traffic = Traffic(self.now, [0] * self.n, [0] * self.n, [0] * self.n)

    # ----------------------------------------------------------------- loop

    def run_until(self, end: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= end:
            at, _, kind, i, payload = heapq.heappop(heap)
            self.now = at
            if kind == _CALL:
                self.current = -1
                payload()  # type: ignore[operator]
                continue
            swim = self.nodes[i]
            if swim is None or self.crashed[i]:
                continue
            if kind == _TIMER:
                if payload != self._timer_gen[i]:
                    continue
                self._timer_at[i] = None
                self.current = i
                swim.handle_timer(now=at)
            else:
                src, bodies = typing.cast(tuple[int, tuple[bytes, ...]], payload)
                self.current = i
                src_address, src_id = self.addresses[src], self.ids[src]
                for body in bodies:
                    self.delivered += 1
                    swim.on_message(src_address, src_id, self._decode(body), now=at)
            self._after(i, swim)
        self.now = max(self.now, end)
        self.current = -1

    def _after(self, i: int, swim: Swim) -> None:
        while (event := swim.next_event()) is not None:
            self.on_event(i, event)
        for _ in range(4):  # a hint (on_unreachable) may produce more output
            out = swim.messages_to_send()
            if not out:
                break
            # Consecutive messages to one destination are one write: they travel (and are
            # lost) together, like a probe and its piggybacked gossip in one packet.
            k = 0
            while k < len(out):
                dst_address = out[k][0]
                j = k + 1
                while j < len(out) and out[j][0] == dst_address:
                    j += 1
                self._send(i, swim, dst_address, [m for _, m in out[k:j]])
                k = j
        deadline = swim.next_deadline()
        if deadline is not None and deadline != self._timer_at[i]:
            self._timer_gen[i] += 1
            self._timer_at[i] = deadline
            self._push(max(deadline, self.now), _TIMER, i, self._timer_gen[i])

    def _encode(self, msg: Message) -> bytes:
        # The same message object is sent many times (a broadcast goes to several peers,
        # a received Alive is re-gossiped as is): encode each object once. The cache holds
        # the object, so its id cannot be reused while the entry lives.
        hit = self._encoded.get(id(msg))
        if hit is not None and hit[0] is msg:
            return hit[1]
        body = encode_body(msg)
        if len(self._encoded) > 65_536:
            self._encoded.clear()
        self._encoded[id(msg)] = (msg, body)
        return body

    def _decode(self, body: bytes) -> Message:
        # Identical bodies (one gossip message sent to many peers) decode to equal,
        # immutable messages: decode each distinct body once. Still the real decoder.
        msg = self._decoded.get(body)
        if msg is None:
            msg = self._decode_sync(body) if len(body) > _SYNC_BODY else decode_body(body)
            if len(self._decoded) > 65_536:
                self._decoded.clear()
            self._decoded[body] = msg
        return msg

    def _decode_sync(self, body: bytes) -> Message:
        """A state sync (thousands of member entries, mostly seen before): msgpack-unpack
        it, decode each *distinct* entry once with the real ``MemberState`` decoder, and
        build the validated ``PushPull`` from them. Anything else: ``decode_body``."""
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True)
        if type(raw) is not dict or raw.get("t") != MsgType.PUSH_PULL:
            return decode_body(body)
        members = []
        for entry in raw["members"]:
            key = msgpack.packb(entry, use_bin_type=True)
            state = self._states.get(key)
            if state is None:
                state = MemberState.from_wire(entry)
                if len(self._states) > 262_144:
                    self._states.clear()
                self._states[key] = state
            members.append(state)
        return PushPull(
            join=raw.get("join", False), reply=raw.get("reply", False), members=tuple(members)
        )

    def _send(self, i: int, swim: Swim, dst_address: str, msgs: list[Message]) -> None:
        bodies = tuple(self._encode(m) for m in msgs)
        self.traffic.messages[i] += len(bodies)
        size = sum(len(b) for b in bodies) + FRAME_OVERHEAD * len(bodies)
        self.traffic.bytes[i] += size
        if isinstance(msgs[0], PushPull):
            self.traffic.sync_bytes[i] += size
        dst = self.index.get(dst_address)
        faults = self.faults
        if dst is None or self.crashed[dst]:
            if faults.hints:
                swim.on_unreachable(dst_address, now=self.now)
            return
        if faults.groups and not any(i in g and dst in g for g in faults.groups):
            return
        rng = self._net_rng[i]
        if faults.loss and rng.random() < faults.loss:
            self.lost += 1
            return
        delay = faults.delay * (0.5 + rng.random())
        self._push(self.now + delay, _DELIVER, dst, (i, bodies))
