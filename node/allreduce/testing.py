"""All-reduce rounds in one process on virtual time: the harness of the all-reduce tests and
of ``python -m simulations allreduce``. N real ``AllReduceRound`` cores, each behind its own
``RoundTable`` (inbox, recent rounds, lossy-average rule: the node's path), the real codecs,
a seeded network, scripted faults.

The network has one FIFO link per (source, destination, channel): control messages and
tensor chunks travel on separate channels (CONTROL and BULK, as in ``node/``). A message
leaves its link after ``size / bandwidth`` (that is when ``on_sent`` acknowledges a tensor
chunk; with ``shared_nic`` all of a node's links share one uplink and one downlink of that
bandwidth, the model behind the link optimum ``2 (N-1)/N * bytes / bandwidth``) and
arrives ``latency + jitter`` later, jitter drawn from one seeded ``random.Random``, so a
seed fixes every arrival order. An average chunk is encoded once for all its receivers
and, with a lossy codec, its owner's result takes what they decode
(``rounds.same_as_receivers``), as in the node. Faults are scripted per node
(``NodeScript``): never start, crash after k part/average chunks, crash at a time, cancel,
delay each part or average chunk (a slow sender / a slow reducer). When a node crashes,
the others are told (``peer_failed``) after ``detect_delay`` unless ``notify`` is off,
in which case only deadlines can find out. Messages already emitted are still delivered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from node.allreduce.config import AllReduceConfig
from node.allreduce.events import (
    AllReduceError,
    AllReduceResult,
    Floats,
    OutgoingChunk,
    PeerDropped,
    RoundFailed,
    RoundFinished,
    RoundSend,
    TensorKind,
)
from node.allreduce.round import AllReduceRound
from node.allreduce.rounds import RoundTable, SentAverage, outcome_of, same_as_receivers
from node.core import Send
from protocol.messages.tensor import ALLREDUCE_CONTROL_TYPES, ArAverage, ArPart
from protocol.schema import Message, decode_body, encode_body
from protocol.tensor import CodecSpec, TensorChunk, decode_chunk, encode_chunk

#: Link channels of the simulated network.
_CONTROL, _BULK = 0, 1


@dataclass
class NodeScript:
    """What goes wrong with one node (all off: a healthy node starting at t=0)."""

    start_at: float | None = 0.0
    """When the node calls all-reduce; ``None``: never (it failed before the round)."""
    crash_after_parts: int | None = None
    """Crash right after emitting this many AR_PART chunks (0: right after starting)."""
    crash_after_averages: int | None = None
    """Crash right after emitting this many AR_AVERAGE chunks (0: on accepting a commit)."""
    crash_at: float | None = None
    cancel_at: float | None = None
    cancel_after_parts: int | None = None
    part_delay: float = 0.0
    """Extra seconds before each AR_PART chunk leaves (a slow sender)."""
    average_delay: float = 0.0
    """Extra seconds before each AR_AVERAGE chunk leaves (a slow reducer)."""
    crash_after_message: tuple[str, int] | None = None
    """Crash right after emitting this many control messages of this type (e.g. ("ArFinish", 1))."""
    control_delay: float = 0.0
    """Extra seconds before each control message leaves (a stalled process, e.g. a frozen leader)."""
    notify: bool = True
    """Whether the others learn of this node's crash (or absence) via ``peer_failed``."""
    early_average_for: int | None = None
    """A hostile node: its early (epoch 0) averages claim to be of this other member's slice."""

    @property
    def faulty(self) -> bool:
        return (self.start_at is None or self.crash_after_parts is not None
                or self.crash_after_averages is not None or self.crash_at is not None
                or self.cancel_at is not None or self.cancel_after_parts is not None
                or self.crash_after_message is not None)


@dataclass
class NodeOutcome:
    node: bytes
    index: int
    result: AllReduceResult | None = None
    error: AllReduceError | None = None
    crashed: bool = False
    started: bool = False
    ended_at: float | None = None
    dropped: list[PeerDropped] = field(default_factory=list)
    parts_sent: int = 0
    averages_sent: int = 0
    early_averages_sent: int = 0
    """Averages sent before any commit (epoch 0)."""
    first_average_at: float | None = None
    first_commit_at: float | None = None
    """When this member (as leader) first sent an AR_COMMIT."""
    bytes_sent: int = 0
    control_sent: dict[str, int] = field(default_factory=dict)


def node_ids(n: int) -> list[bytes]:
    """``n`` deterministic 32-byte node ids, ascending (so member index == list index)."""
    return sorted(hashlib.sha256(b"starmesh-sim-node-%d" % i).digest() for i in range(n))


def exact_mean(tensors: list[Floats], members: list[int]) -> Floats:
    """The reference: fp64 mean over ``members`` (ascending), cast to fp32."""
    stack = np.stack([tensors[m] for m in sorted(members)]).astype(np.float64)
    out: Floats = stack.mean(axis=0).astype(np.float32)
    return out


class AllReduceSim:
    def __init__(self, tensors: list[Floats], *, scripts: dict[int, NodeScript] | None = None,
                 config: AllReduceConfig | None = None, seed: int = 0, codec: str = "none",
                 latency: float = 0.001, jitter: float = 0.002, bandwidth: float = 1e8,
                 detect_delay: float = 0.05, wire: bool = False, key: bytes = b"step-1",
                 weights: list[float] | None = None, shared_nic: bool = False) -> None:
        self.n = len(tensors)
        self.ids = node_ids(self.n)
        self.tensors = tensors
        self.scripts = {i: (scripts or {}).get(i, NodeScript()) for i in range(self.n)}
        self.config = config or AllReduceConfig.test()
        self.codec = CodecSpec.parse(codec)
        self.latency, self.jitter, self.bandwidth = latency, jitter, bandwidth
        self.detect_delay, self.wire, self.key = detect_delay, wire, key
        self.weights = None if weights is None else dict(zip(self.ids, weights, strict=True))
        self.rng = random.Random(seed)
        self.now = 0.0
        self.cores: dict[int, AllReduceRound] = {}
        self.tables: dict[int, RoundTable[AllReduceRound]] = {i: RoundTable() for i in range(self.n)}
        """Each node's ``RoundTable`` (its ``stats()`` are the node's all-reduce metrics)."""
        self.out = {i: NodeOutcome(self.ids[i], i) for i in range(self.n)}
        self._heap: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self._seq = 0
        self._link_free: dict[tuple[int, int, int], float] = {}
        self._link_last: dict[tuple[int, int, int], float] = {}
        self._queue_ready: dict[tuple[int, int, int], float] = {}
        self.shared_nic = shared_nic
        self._nic_up: dict[int, float] = {}
        self._nic_down: dict[int, float] = {}
        self._heard_dead: dict[int, list[int]] = {i: [] for i in range(self.n)}
        """Failures a node was told of before it started (its membership view at the start)."""
        self._started_at: dict[int, float] = {}
        self._timer_at: dict[int, float] = {}
        self._inbox_at: dict[int, float] = {}
        self._encoded: dict[int, dict[tuple[int, int, int], TensorChunk]] = {i: {} for i in range(self.n)}
        self._sent_averages: dict[int, list[SentAverage]] = {i: [] for i in range(self.n)}
        self._events: dict[str, Callable[..., None]] = {
            "start": self._ev_start, "deliver": self._ev_deliver, "sent": self._ev_sent,
            "timer": self._ev_timer, "inbox": self._ev_inbox, "crash": self._ev_crash,
            "cancel": self._ev_cancel, "wire": self._ev_wire, "nic_in": self._ev_nic_in,
        }
        self.events_processed = 0
        self.messages = 0

    # ------------------------------------------------------------------ running

    def run(self, *, until: float = 1000.0, max_events: int = 2_000_000) -> dict[int, NodeOutcome]:
        for i, sc in self.scripts.items():
            if sc.start_at is not None:
                self._push(sc.start_at, "start", (i,))
            elif sc.notify:
                self._tell_others(i, self.detect_delay)
            if sc.crash_at is not None:
                self._push(sc.crash_at, "crash", (i,))
            if sc.cancel_at is not None:
                self._push(sc.cancel_at, "cancel", (i,))
        while self._heap and self.events_processed < max_events:
            at, _, kind, args = heapq.heappop(self._heap)
            if at > until:
                break
            self.now = at
            self.events_processed += 1
            self._events[kind](*args)
        return self.out

    def live(self, i: int) -> bool:
        return i in self.cores and not self.out[i].crashed

    def _push(self, at: float, kind: str, args: tuple[Any, ...]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, args))

    # ------------------------------------------------------------------ events

    def _ev_start(self, i: int) -> None:
        table = self.tables[i]
        core = AllReduceRound(node_id=self.ids[i], group=self.ids, key=table.key_for(tuple(self.ids), self.key),
                              tensor=self.tensors[i], now=self.now, config=self.config, weights=self.weights,
                              codec_name=self.codec.name)
        self.cores[i] = core
        self._started_at[i] = self.now
        self.out[i].started = True
        for src, msg in table.add(core.round_id, core):
            core.on_message(src, msg, now=self.now)
        for j in self._heard_dead.pop(i, []):
            core.peer_failed(self.ids[j], now=self.now)
        self._pump(i)
        if self.scripts[i].crash_after_parts == 0:
            self._crash(i)

    def _ev_deliver(self, dst: int, kind: str, args: tuple[Any, ...]) -> None:
        if self.out[dst].crashed:
            return
        if kind == "failed":
            if dst in self.cores:
                self.cores[dst].peer_failed(self.ids[args[0]], now=self.now)
                self._pump(dst)
            else:
                self._heard_dead[dst].append(args[0])
            return
        table, src = self.tables[dst], self.ids[args[0]]
        if kind == "msg":
            msg = args[1]
            assert isinstance(msg, ALLREDUCE_CONTROL_TYPES)
            core = table.on_control(src, msg, now=self.now)
            if core is not None:
                core.on_message(src, msg, now=self.now)
        else:
            core = table.on_tensor(args[1])
            if core is not None:
                core.on_tensor(src, args[1], args[2], now=self.now)
        if dst in self.cores:
            self._pump(dst)
        else:
            self._arm_inbox(dst)

    def _ev_sent(self, i: int, dest: bytes, nbytes: int) -> None:
        if self.live(i):
            self.cores[i].on_sent(dest, nbytes, now=self.now)
            self._pump(i)

    def _ev_timer(self, i: int) -> None:
        if self.live(i) and self._timer_at.get(i) == self.now:
            del self._timer_at[i]
            self.cores[i].handle_timer(now=self.now)
            self._pump(i)

    def _ev_inbox(self, i: int) -> None:
        if not self.out[i].crashed and self._inbox_at.get(i) == self.now:
            del self._inbox_at[i]
            self.tables[i].handle_timer(now=self.now)
            self._arm_inbox(i)

    def _ev_crash(self, i: int) -> None:
        if not self.out[i].crashed:
            self._crash(i)

    def _ev_cancel(self, i: int) -> None:
        if self.live(i):
            self.cores[i].cancel(now=self.now)
            self._pump(i)

    # ------------------------------------------------------------------ plumbing

    def _crash(self, i: int, *, even_if_ended: bool = False) -> None:
        o = self.out[i]
        if o.crashed or (i in self.cores and not self.cores[i].active and not even_if_ended):
            return
        o.crashed, o.ended_at = True, o.ended_at or self.now
        if self.scripts[i].notify:
            self._tell_others(i, self.now + self.detect_delay)

    def _tell_others(self, i: int, at: float) -> None:
        for j in range(self.n):
            if j != i:
                self._push(at, "deliver", (j, "failed", (i,)))

    def _pump(self, i: int) -> None:
        """Drain node i's outputs into the network, then re-arm its timers."""
        core, table, o, sc = self.cores[i], self.tables[i], self.out[i], self.scripts[i]
        while not o.crashed:
            sends = core.messages_to_send() + table.messages_to_send()
            if not sends:
                break
            for send in sends:
                if o.crashed:
                    break
                self._transmit(i, send)
        while (ev := core.next_event()) is not None:
            if isinstance(ev, PeerDropped):
                o.dropped.append(ev)
            elif isinstance(ev, RoundFinished):
                o.result, o.ended_at = same_as_receivers(ev.result, self._sent_averages[i]), self.now
                table.end(core.round_id, outcome=outcome_of(None, timed_out=False),
                          seconds=self.now - self._started_at[i], epilogue=core.epilogue)
            elif isinstance(ev, RoundFailed):
                o.error, o.ended_at = ev.error, self.now
                timed_out = self.now >= self._started_at[i] + self.config.round_timeout - 1e-3
                table.end(core.round_id, outcome=outcome_of(ev.error, timed_out=timed_out))
        if sc.cancel_after_parts is not None and o.parts_sent >= sc.cancel_after_parts and core.active:
            core.cancel(now=self.now)
            self._pump(i)
            return
        at = core.next_deadline()
        if at is not None and not o.crashed and self._timer_at.get(i) != at:
            self._timer_at[i] = at
            self._push(max(at, self.now), "timer", (i,))
        self._arm_inbox(i)

    def _arm_inbox(self, i: int) -> None:
        at = self.tables[i].next_deadline()
        if at is not None and not self.out[i].crashed and self._inbox_at.get(i) != at:
            self._inbox_at[i] = at
            self._push(max(at, self.now), "inbox", (i,))

    def _transmit(self, i: int, send: RoundSend | Send[Message]) -> None:
        """Node i emitted ``send``: it goes on the wire after the node's scripted delay, in
        emission order per (destination, channel), as a pump per connection would write it."""
        o, sc = self.out[i], self.scripts[i]
        self.messages += 1
        out = send.message
        if isinstance(out, OutgoingChunk):
            delay, channel = (sc.part_delay if out.kind is TensorKind.PART else sc.average_delay), _BULK
        else:
            delay, channel = sc.control_delay, _CONTROL
        key = (i, self.ids.index(send.dest), channel)
        at = max(self.now + delay, self._queue_ready.get(key, 0.0))
        self._queue_ready[key] = at
        if at > self.now:
            self._push(at, "wire", (i, send))
        else:
            self._ev_wire(i, send)
        if not isinstance(out, OutgoingChunk):
            name = type(out).__name__
            o.control_sent[name] = o.control_sent.get(name, 0) + 1
            if name == "ArCommit" and o.first_commit_at is None:
                o.first_commit_at = self.now
            if sc.crash_after_message == (name, o.control_sent[name]):
                self._crash(i, even_if_ended=True)  # e.g. a leader dying halfway through its AR_FINISH
        elif out.kind is TensorKind.PART:
            o.parts_sent += 1
            if sc.crash_after_parts is not None and o.parts_sent >= sc.crash_after_parts:
                self._crash(i)
        else:
            o.averages_sent += 1
            o.early_averages_sent += out.epoch == 0
            if o.first_average_at is None:
                o.first_average_at = self.now
            if sc.crash_after_averages is not None and o.averages_sent >= sc.crash_after_averages:
                self._crash(i)

    def _ev_wire(self, i: int, send: RoundSend | Send[Message]) -> None:
        if self.out[i].crashed:
            return  # still in the crashed process's queues: lost
        j = self.ids.index(send.dest)
        out = send.message
        if not isinstance(out, OutgoingChunk):
            msg: Message = out
            size = 64
            if self.wire:
                body = encode_body(msg)
                size, msg = len(body), decode_body(body)
            self._link(i, j, _CONTROL, self.now, size, "msg", (i, msg))
            return
        chunk = self._encode(i, out)
        forged = self.scripts[i].early_average_for
        if forged is not None and out.kind is TensorKind.AVERAGE and out.epoch == 0:
            out = dataclasses.replace(out, slice=forged)
        tmsg: ArPart | ArAverage = out.to_message(chunk)
        if self.wire:
            decoded = decode_body(encode_body(tmsg))
            assert isinstance(decoded, ArPart | ArAverage)
            tmsg = decoded
        size = len(tmsg.data.payload) + 48
        self.out[i].bytes_sent += size
        done = self._link(i, j, _BULK, self.now, size, "tensor", (i, tmsg, decode_chunk(tmsg.data)))
        self._push(done, "sent", (i, send.dest, out.nbytes))

    def _encode(self, i: int, out: OutgoingChunk) -> TensorChunk:
        """Encode a chunk; an average once for all its receivers (recording, with a lossy
        codec, what they decode), as the node's service does."""
        if out.kind is TensorKind.PART:
            return encode_chunk(out.values, self.codec, offset=out.offset)
        key = (out.epoch, out.slice, out.chunk)
        chunk = self._encoded[i].get(key)
        if chunk is None:
            chunk = self._encoded[i][key] = encode_chunk(out.values, self.codec, offset=out.offset)
            if not self.codec.lossless:
                self._sent_averages[i].append(SentAverage(out.offset, out.values, decode_chunk(chunk)))
        return chunk

    def _link(self, i: int, j: int, channel: int, ready: float, size: int, kind: str,
              args: tuple[Any, ...]) -> float:
        """Queue a message on link (i, j, channel); returns when it finished leaving i."""
        key, cost = (i, j, channel), size / self.bandwidth
        leave = max(ready, self._link_free.get(key, 0.0), self._nic_up.get(i, 0.0)) + cost
        if self.shared_nic:  # one uplink per sender, FIFO
            self._nic_up[i] = leave
        self._link_free[key] = leave
        arrive = max(leave + self.latency + self.rng.random() * self.jitter, self._link_last.get(key, 0.0))
        self._link_last[key] = arrive
        if self.shared_nic:  # then one downlink per receiver, served in arrival order
            self._push(arrive, "nic_in", (j, cost, kind, args))
        else:
            self._push(arrive, "deliver", (j, kind, args))
        return leave

    def _ev_nic_in(self, j: int, cost: float, kind: str, args: tuple[Any, ...]) -> None:
        done = max(self.now, self._nic_down.get(j, 0.0)) + cost
        self._nic_down[j] = done
        self._push(done, "deliver", (j, kind, args))
