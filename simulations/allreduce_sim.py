"""All-reduce rounds in one process on virtual time: N real ``AllReduceRound`` cores, the
real codecs, a seeded network, scripted faults (``python -m simulations allreduce``).

The network has one FIFO link per (source, destination, channel): control messages and
tensor chunks travel on separate channels (CONTROL and BULK, as in ``node/``). A message
leaves its link after ``size / bandwidth`` (that is when ``on_sent`` acknowledges a tensor
chunk; with ``shared_nic`` all of a node's links share one uplink and one downlink of that
bandwidth, the model behind the link optimum ``2 (N-1)/N * bytes / bandwidth``) and
arrives ``latency + jitter`` later, jitter drawn from one seeded
``random.Random``, so a seed fixes every arrival order. Faults are scripted per node
(``NodeScript``): never start, crash after k part/average chunks, crash at a time, cancel,
delay each part or average chunk (a slow sender / a slow reducer). When a node crashes,
the others are told (``peer_failed``) after ``detect_delay`` unless ``notify`` is off,
in which case only deadlines can find out. Messages already emitted are still delivered.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import heapq
import json
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from node.allreduce import (
    AllReduceConfig,
    AllReduceError,
    AllReduceResult,
    AllReduceRound,
    PeerDropped,
    RoundFailed,
    RoundFinished,
    SendMessage,
    SendTensor,
    TensorKind,
)
from protocol.messages.tensor import ArAverage, ArPart
from protocol.schema import Message, decode_body, encode_body
from protocol.tensor import CodecSpec, decode_chunk, encode_chunk

Floats = np.ndarray[Any, np.dtype[np.float32]]


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
        self.out = {i: NodeOutcome(self.ids[i], i) for i in range(self.n)}
        self._heap: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self._seq = 0
        self._link_free: dict[tuple[int, int, int], float] = {}
        self._link_last: dict[tuple[int, int, int], float] = {}
        self._queue_ready: dict[tuple[int, int, int], float] = {}
        self.shared_nic = shared_nic
        self._nic_up: dict[int, float] = {}
        self._nic_down: dict[int, float] = {}
        self._early: dict[int, list[tuple[str, tuple[Any, ...]]]] = {i: [] for i in range(self.n)}
        self._timer_at: dict[int, float] = {}
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
            getattr(self, "_ev_" + kind)(*args)
        return self.out

    def _roundtrip(self, values: Floats) -> Floats:
        return decode_chunk(encode_chunk(values, self.codec))

    def live(self, i: int) -> bool:
        return i in self.cores and not self.out[i].crashed

    def _push(self, at: float, kind: str, args: tuple[Any, ...]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, args))

    # ------------------------------------------------------------------ events

    def _ev_start(self, i: int) -> None:
        core = AllReduceRound(node_id=self.ids[i], group=self.ids, key=self.key, tensor=self.tensors[i],
                              now=self.now, config=self.config, weights=self.weights,
                              codec_name=self.codec.name,
                              average_roundtrip=None if self.codec.lossless else self._roundtrip)
        self.cores[i] = core
        self.out[i].started = True
        for kind, args in self._early.pop(i, []):
            self._apply(i, kind, args)
        self._pump(i)
        sc = self.scripts[i]
        if sc.crash_after_parts == 0:
            self._crash(i)

    def _ev_deliver(self, dst: int, kind: str, args: tuple[Any, ...]) -> None:
        if self.out[dst].crashed:
            return
        if dst not in self.cores:
            self._early.setdefault(dst, []).append((kind, args))
            return
        self._apply(dst, kind, args)
        self._pump(dst)

    def _apply(self, dst: int, kind: str, args: tuple[Any, ...]) -> None:
        core = self.cores[dst]
        if kind == "msg":
            src, msg = args
            core.on_message(self.ids[src], msg, now=self.now)
        elif kind == "tensor":
            src, msg, values = args
            core.on_tensor(self.ids[src], msg, values, now=self.now)
        elif kind == "failed":
            core.peer_failed(self.ids[args[0]], now=self.now)

    def _ev_sent(self, i: int, dest: bytes, nbytes: int) -> None:
        if self.live(i):
            self.cores[i].on_sent(dest, nbytes, now=self.now)
            self._pump(i)

    def _ev_timer(self, i: int) -> None:
        if self.live(i) and self._timer_at.get(i) == self.now:
            del self._timer_at[i]
            self.cores[i].handle_timer(now=self.now)
            self._pump(i)

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
        """Drain node i's outputs into the network, then re-arm its timer."""
        core, o, sc = self.cores[i], self.out[i], self.scripts[i]
        while not o.crashed:
            sends = core.messages_to_send()
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
                o.result, o.ended_at = ev.result, self.now
            elif isinstance(ev, RoundFailed):
                o.error, o.ended_at = ev.error, self.now
        if sc.cancel_after_parts is not None and o.parts_sent >= sc.cancel_after_parts and core.active:
            core.cancel(now=self.now)
            self._pump(i)
            return
        at = core.next_deadline()
        if at is not None and not o.crashed and self._timer_at.get(i) != at:
            self._timer_at[i] = at
            self._push(max(at, self.now), "timer", (i,))

    def _transmit(self, i: int, send: SendMessage | SendTensor) -> None:
        """Node i emitted ``send``: it goes on the wire after the node's scripted delay, in
        emission order per (destination, channel), as a pump per connection would write it."""
        o, sc = self.out[i], self.scripts[i]
        self.messages += 1
        if isinstance(send, SendMessage):
            delay, channel = sc.control_delay, 0
        else:
            delay, channel = (sc.part_delay if send.kind is TensorKind.PART else sc.average_delay), 1
        key = (i, self.ids.index(send.dest), channel)
        at = max(self.now + delay, self._queue_ready.get(key, 0.0))
        self._queue_ready[key] = at
        if at > self.now:
            self._push(at, "wire", (i, send))
        else:
            self._ev_wire(i, send)
        if isinstance(send, SendMessage):
            name = type(send.message).__name__
            o.control_sent[name] = o.control_sent.get(name, 0) + 1
            if name == "ArCommit" and o.first_commit_at is None:
                o.first_commit_at = self.now
            if sc.crash_after_message == (name, o.control_sent[name]):
                self._crash(i, even_if_ended=True)  # e.g. a leader dying halfway through its AR_FINISH
        elif send.kind is TensorKind.PART:
            o.parts_sent += 1
            if sc.crash_after_parts is not None and o.parts_sent >= sc.crash_after_parts:
                self._crash(i)
        else:
            o.averages_sent += 1
            o.early_averages_sent += send.epoch == 0
            if o.first_average_at is None:
                o.first_average_at = self.now
            if sc.crash_after_averages is not None and o.averages_sent >= sc.crash_after_averages:
                self._crash(i)

    def _ev_wire(self, i: int, send: SendMessage | SendTensor) -> None:
        if self.out[i].crashed:
            return  # still in the crashed process's queues: lost
        j = self.ids.index(send.dest)
        if isinstance(send, SendMessage):
            msg: Message = send.message
            size = 64
            if self.wire:
                body = encode_body(msg)
                size, msg = len(body), decode_body(body)
            self._link(i, j, 0, self.now, size, "msg", (i, msg))
            return
        chunk = encode_chunk(send.values, self.codec, offset=send.offset)
        forged = self.scripts[i].early_average_for
        if forged is not None and send.kind is TensorKind.AVERAGE and send.epoch == 0:
            send = dataclasses.replace(send, slice=forged)
        tmsg: ArPart | ArAverage = send.to_message(chunk)
        if self.wire:
            decoded = decode_body(encode_body(tmsg))
            assert isinstance(decoded, ArPart | ArAverage)
            tmsg = decoded
        size = len(tmsg.data.payload) + 48
        self.out[i].bytes_sent += size
        done = self._link(i, j, 1, self.now, size, "tensor", (i, tmsg, decode_chunk(tmsg.data)))
        self._push(done, "sent", (i, send.dest, send.nbytes))

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


def exact_mean(tensors: list[Floats], members: list[int]) -> Floats:
    """The reference: fp64 mean over ``members`` (ascending), cast to fp32."""
    stack = np.stack([tensors[m] for m in sorted(members)]).astype(np.float64)
    out: Floats = stack.mean(axis=0).astype(np.float32)
    return out


# ---------------------------------------------------------------------- scenario


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--numel", type=int, default=100_000)
    parser.add_argument("--codec", default="none")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--bandwidth", type=float, default=125e6, help="bytes/s per link")
    parser.add_argument("--latency", type=float, default=0.0002, help="one-way seconds")
    parser.add_argument("--chunk", type=int, default=16_384, help="elements per chunk (window: 4 chunks)")
    parser.add_argument("--json", action="store_true")


FAULTS: dict[str, NodeScript] = {
    "none": NodeScript(),
    "fails-before": NodeScript(start_at=None),
    "fails-sending": NodeScript(crash_after_parts=2),
    "sends-slowly": NodeScript(part_delay=60.0),
    "fails-reducing": NodeScript(crash_after_averages=1),
    "reduces-slowly": NodeScript(average_delay=60.0),
    "cancels": NodeScript(cancel_after_parts=1),
}


def run(args: argparse.Namespace) -> int:
    cfg = AllReduceConfig.for_transfer(numel=args.numel, bytes_per_s=args.bandwidth,
                                       base=AllReduceConfig.local().replace(chunk_elements=args.chunk,
                                                                            window_bytes=16 * args.chunk))
    rows = []
    for name, script in FAULTS.items():
        times, ok = [], True
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            tensors = [rng.standard_normal(args.numel).astype(np.float32) for _ in range(args.nodes)]
            sim = AllReduceSim(tensors, scripts={1: script}, config=cfg, seed=seed, codec=args.codec,
                               bandwidth=args.bandwidth, shared_nic=True, latency=args.latency,
                               jitter=args.latency / 2)
            out = sim.run()
            results = [o.result for o in out.values() if o.result is not None]
            ok &= bool(results) and all(np.array_equal(r.average, results[0].average) for r in results)
            times.append(max(o.ended_at or 0.0 for o in out.values()))
        optimum = 2 * (args.nodes - 1) / args.nodes * 4 * args.numel / args.bandwidth
        median = float(np.median(times))
        rows.append({"fault": name, "median_s": median, "optimum_s": optimum,
                     "efficiency": optimum / median, "consistent": ok})
    print(f"{'fault':16} {'virtual s':>10} {'optimum s':>10} {'of optimum':>10} consistent")
    for r in rows:
        print(f"{r['fault']:16} {r['median_s']:10.3f} {r['optimum_s']:10.3f} {r['efficiency']:10.1%} {r['consistent']}")
    if args.json:
        print(json.dumps({"scenario": "allreduce", "rows": rows}))
    return 0 if all(r["consistent"] for r in rows) else 1
