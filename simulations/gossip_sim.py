"""``python -m simulations gossip``: SWIM on virtual time, many nodes in one process.

The real ``discovery.Swim`` state machines and the real message codec run on a seeded,
lossy, delaying discrete-event network (``simulations/simnet.py``). The scenario:

1. bootstrap: node 0 starts at t=0, the others at random times in ``--join-window``, each
   joining through node 0 as its one seed (the usual deployment: one seed address);
2. convergence: time (and gossip rounds since the last start) until every node sees all N
   alive; then ``--idle`` seconds of steady state to measure idle traffic;
3. dissemination: one node updates its metadata; gossip rounds until all others see it
   (the O(log N) quantity);
4. failure: ``--crash`` random nodes stop; time until every survivor marks each dead.

It prints a table (and with ``--json`` a final JSON line), optionally plots to a PNG, and
with ``--scale 50,100,...`` repeats the run per N to show rounds ~ log N and flat traffic.
Same arguments and seed, same numbers.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from discovery.config import PRESETS
from discovery.events import EventKind, MemberEvent
from protocol.errors import ConfigError
from protocol.limits import MAX_MEMBERS_PER_SYNC
from protocol.messages.gossip import MemberState, NodeMeta, PushPull
from protocol.schema import encode_body
from simulations.simnet import FRAME_OVERHEAD, Faults, SimNet, SimTimeFilter

SAMPLE_EVERY = 0.25
_LIVE_KINDS = (EventKind.JOINED, EventKind.REFUTED)
_GONE_KINDS = (EventKind.DEAD, EventKind.LEFT, EventKind.REAPED)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=200, help="number of nodes (default 200)")
    parser.add_argument(
        "--loss", type=float, default=0.0, help="message loss probability (default 0)"
    )
    parser.add_argument(
        "--delay-ms", type=float, default=5.0, help="mean one-way delay, ms (+-50%% jitter)"
    )
    parser.add_argument("--crash", type=int, default=0, help="nodes to crash after convergence")
    parser.add_argument("--seed", type=int, default=1, help="simulation seed")
    parser.add_argument("--duration", type=float, default=600.0, help="virtual-time cap, seconds")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="lan", help="SwimConfig preset"
    )
    parser.add_argument(
        "--join-window", type=float, default=5.0, help="nodes start within this many s"
    )
    parser.add_argument(
        "--idle", type=float, default=20.0, help="steady-state seconds to measure traffic"
    )
    parser.add_argument(
        "--partition", metavar="AT,SECONDS", help="split the mesh in halves at AT for SECONDS"
    )
    parser.add_argument(
        "--hints", action="store_true", help="senders learn of crashed peers (TCP refusals)"
    )
    parser.add_argument(
        "--scale", metavar="N1,N2,...", help="repeat for each N; print rounds and traffic vs N"
    )
    parser.add_argument("--plot", metavar="PATH", help="write a PNG plot")
    parser.add_argument("--json", action="store_true", help="print a final JSON line")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logs tagged T=<sim> node=<id>"
    )


@dataclass
class Result:
    nodes: int
    seed: int
    preset: str
    loss: float
    delay_ms: float
    converged_s: float | None = None
    """Virtual time at which every node first saw all N alive."""
    convergence_after_last_start_s: float | None = None
    convergence_rounds: float | None = None
    update_s: float | None = None
    update_rounds: float | None = None
    crashed: int = 0
    detect_p50_s: float | None = None
    detect_max_s: float | None = None
    undetected: int = 0
    false_suspicions: int = 0
    """Distinct (member, incarnation) suspicions of a member that was in fact alive."""
    false_suspicion_events: int = 0
    """SUSPECTED events about live members, over all observers."""
    false_deaths: int = 0
    """Distinct (member, incarnation) deaths declared for a member that was in fact alive."""
    false_death_events: int = 0
    first_false_death_s: float | None = None
    refutations: int = 0
    msgs_per_node_s: float = 0.0
    bytes_per_node_s: float = 0.0
    idle_msgs_per_node_s: float | None = None
    idle_bytes_per_node_s: float | None = None
    """Probes and gossip (measured) plus push/pull (computed from the table size)."""
    idle_probe_bytes_per_node_s: float | None = None
    idle_sync_bytes_per_node_s: float | None = None
    virtual_s: float = 0.0
    wall_s: float = 0.0
    series: dict[str, list[float]] = field(default_factory=dict)


class Scenario:
    """One run: schedules the phases and turns membership events into metrics."""

    def __init__(self, args: argparse.Namespace, n: int) -> None:
        if n < 2:
            raise ConfigError("--nodes must be at least 2")
        if not 0.0 <= args.loss < 1.0:
            raise ConfigError("--loss must be in [0, 1)")
        if args.crash >= n - 1:
            raise ConfigError("--crash must leave at least two survivors")
        self.args = args
        self.n = n
        self.config = PRESETS[args.preset]()
        self.rng = random.Random(f"{args.seed}:scenario")
        faults = Faults(loss=args.loss, delay=args.delay_ms / 1000.0, hints=args.hints)
        self.net = SimNet(
            n=n, seed=args.seed, config=self.config, faults=faults, on_event=self._on_event
        )
        self.res = Result(
            nodes=n, seed=args.seed, preset=args.preset, loss=args.loss, delay_ms=args.delay_ms
        )
        self.id_index = {nid: i for i, nid in enumerate(self.net.ids)}
        self.live = [bytearray(n) for _ in range(n)]
        self.count = [0] * n
        self.full = 0
        self.started = 0
        self.last_start = 0.0
        self.crash_at: float | None = None
        self.victims: list[int] = []
        self.detected_by: dict[int, bytearray] = {}
        self.detected_n: dict[int, int] = {}
        self.detect_s: dict[int, float] = {}
        self.update_node = -1
        self.update_inc = -1
        self.update_at = 0.0
        self.update_seen = 0
        self.idle_from: float | None = None
        self.suspected: set[tuple[int, int]] = set()
        self.killed: set[tuple[int, int]] = set()
        self.done_at: float | None = None
        self.series: dict[str, list[float]] = {"t": [], "full": [], "kbytes": [], "dead_frac": []}

    # --------------------------------------------------------------- phases

    def run(self) -> Result:
        wall = time.perf_counter()
        self.schedule()
        net, end, step, t = self.net, self.args.duration, 1.0, 0.0
        while t < end and self.done_at is None:
            t = min(end, t + step)
            net.run_until(t)
        if self.done_at is not None:
            net.run_until(self.done_at)
        self._finish(time.perf_counter() - wall)
        return self.res

    def schedule(self) -> None:
        """Put the starts, the partition and the sampler on the timeline."""
        n, net = self.n, self.net
        order = list(range(n))
        starts = [0.0, *sorted(self.rng.uniform(0.0, self.args.join_window) for _ in range(n - 1))]
        for k, i in enumerate(order):
            seed = [] if k == 0 else [order[0]]
            net.call_at(starts[k], functools.partial(self._start, i, seed))
        self.last_start = starts[-1]
        if self.args.partition:
            at, secs = (float(x) for x in self.args.partition.split(","))
            halves = [frozenset(range(n // 2)), frozenset(range(n // 2, n))]
            net.call_at(at, lambda: setattr(net.faults, "groups", halves))
            net.call_at(at + secs, lambda: setattr(net.faults, "groups", []))
        net.call_at(SAMPLE_EVERY, self._sample)

    def _start(self, i: int, seeds: list[int]) -> None:
        meta = NodeMeta(
            hostname=f"n{i}", cpus=16, memory_bytes=64 << 30, torch_version="2.13.0", load=i % 3
        )
        self.live[i][i] = 1
        self.count[i] = 1
        self.started += 1
        self.net.start(i, seeds=seeds, meta=meta)
        self._check_full(i, 0)

    def _converged(self) -> None:
        now = self.net.now
        res = self.res
        res.converged_s = now
        res.convergence_after_last_start_s = now - self.last_start
        res.convergence_rounds = (now - self.last_start) / self.config.gossip_interval
        self.net.call_at(now + 1.0, self._idle_start)

    def _idle_start(self) -> None:
        # Idle means no gossip left over from the bootstrap: wait for the queues to drain.
        net = self.net
        pending = sum(s.pending_broadcasts for s in net.nodes if s is not None)
        if pending > self.n // 10 and net.now < self.res.converged_s + 120.0:  # type: ignore[operator]
            net.call_at(net.now + 1.0, self._idle_start)
            return
        self.idle_from = self.net.now
        self.net.reset_traffic()
        self.net.call_at(self.net.now + self.args.idle, self._idle_end)

    def _idle_end(self) -> None:
        tr, span = self.net.traffic, self.net.now - self.net.traffic.since
        self.res.idle_msgs_per_node_s = sum(tr.messages) / self.n / span
        # Push/pull runs every push_pull_interval * max(1, N / threshold) seconds: far
        # longer than the window at large N, so its share is computed, not sampled: per
        # period each node sends its full table once (its own sync) and once (an answer).
        probes_gossip = (sum(tr.bytes) - sum(tr.sync_bytes)) / self.n / span
        cfg = self.config
        period = cfg.push_pull_interval * max(1.0, self.n / cfg.push_pull_scale_threshold)
        node = next(s for s in self.net.nodes if s is not None)
        table = tuple(
            MemberState(
                node=m.node_id,
                address=m.address,
                incarnation=m.incarnation,
                status=m.status,
                meta=m.meta,
            )
            for m in node.members()
        )
        sync = sum(len(encode_body(PushPull(members=table[k : k + MAX_MEMBERS_PER_SYNC])))
                   for k in range(0, len(table), MAX_MEMBERS_PER_SYNC)) + FRAME_OVERHEAD  # fmt: skip
        self.res.idle_sync_bytes_per_node_s = 2 * sync / period if period > 0 else 0.0
        self.res.idle_probe_bytes_per_node_s = probes_gossip
        self.res.idle_bytes_per_node_s = probes_gossip + self.res.idle_sync_bytes_per_node_s
        self.net.reset_traffic()
        self.update_node = self.rng.randrange(self.n)
        self.update_at = self.net.now

        def bump(swim: Any) -> None:
            swim.update_meta(NodeMeta(hostname=f"n{self.update_node}", load=99), now=self.net.now)
            self.update_inc = swim.incarnation

        self.net.poke(self.update_node, bump)

    def _crash(self) -> None:
        pool = [i for i in range(self.n) if i != self.update_node]
        self.victims = sorted(self.rng.sample(pool, self.args.crash))
        self.crash_at = self.net.now
        for v in self.victims:
            self.net.crash(v)
            self.detected_by[v] = bytearray(self.n)
            self.detected_n[v] = 0
        if not self.victims:
            self.done_at = self.net.now + 1.0

    def _sample(self) -> None:
        s, net = self.series, self.net
        s["t"].append(net.now)
        s["full"].append(self.full / self.n)
        s["kbytes"].append(sum(net.traffic.bytes) / 1000.0)
        if self.victims:
            survivors = self.n - len(self.victims)
            s["dead_frac"].append(sum(self.detected_n.values()) / (survivors * len(self.victims)))
        else:
            s["dead_frac"].append(0.0)
        net.call_at(net.now + SAMPLE_EVERY, self._sample)

    # --------------------------------------------------------------- events

    def _check_full(self, i: int, before: int) -> None:
        if before != self.n and self.count[i] == self.n:
            self.full += 1
        elif before == self.n and self.count[i] != self.n:
            self.full -= 1
        if self.res.converged_s is None and self.full == self.n and self.started == self.n:
            self._converged()

    def _on_event(self, i: int, ev: MemberEvent) -> None:
        j = self.id_index[ev.member.node_id]
        kind = ev.kind
        if j == i:
            return
        res = self.res
        crashed = self.net.crashed[j]
        if kind is EventKind.SUSPECTED and not crashed:
            res.false_suspicion_events += 1
            key = (j, ev.member.incarnation)
            if key not in self.suspected:
                self.suspected.add(key)
                res.false_suspicions += 1
        elif kind is EventKind.DEAD and not crashed:
            res.false_death_events += 1
            key = (j, ev.member.incarnation)
            if key not in self.killed:
                self.killed.add(key)
                res.false_deaths += 1
                if res.first_false_death_s is None:
                    res.first_false_death_s = self.net.now
        elif kind is EventKind.REFUTED:
            res.refutations += 1
        elif (
            kind is EventKind.UPDATED
            and j == self.update_node
            and ev.member.incarnation >= self.update_inc
        ):
            self._update_seen()
        before = self.count[i]
        row = self.live[i]
        if kind in _LIVE_KINDS and not row[j]:
            row[j] = 1
            self.count[i] += 1
        elif kind in _GONE_KINDS and row[j]:
            row[j] = 0
            self.count[i] -= 1
            if crashed and j in self.detected_by:
                self._detected(j, i)
        self._check_full(i, before)

    def _update_seen(self) -> None:
        self.update_seen += 1
        if self.update_seen == self.n - 1:
            dt = self.net.now - self.update_at
            self.res.update_s = dt
            self.res.update_rounds = dt / self.config.gossip_interval
            self.net.call_at(self.net.now + 1.0, self._crash)

    def _detected(self, victim: int, by: int) -> None:
        marks = self.detected_by[victim]
        if marks[by] or self.net.crashed[by]:
            return
        marks[by] = 1
        self.detected_n[victim] += 1
        assert self.crash_at is not None
        if self.detected_n[victim] == self.n - len(self.victims):
            self.detect_s[victim] = self.net.now - self.crash_at
            if len(self.detect_s) == len(self.victims):
                self.done_at = self.net.now + 1.0

    def _finish(self, wall_s: float) -> None:
        res, net = self.res, self.net
        res.crashed = len(self.victims)
        if self.detect_s:
            times = sorted(self.detect_s.values())
            res.detect_p50_s = statistics.median(times)
            res.detect_max_s = times[-1]
        res.undetected = len(self.victims) - len(self.detect_s)
        res.virtual_s = net.now
        span = max(net.now - net.traffic.since, 1e-9)
        res.msgs_per_node_s = sum(net.traffic.messages) / self.n / span
        res.bytes_per_node_s = sum(net.traffic.bytes) / self.n / span
        res.wall_s = wall_s
        res.series = self.series


# ------------------------------------------------------------------- output


def _fmt(v: float | None, unit: str = "", digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}{unit}"


def print_result(res: Result) -> None:
    rows = [
        ("nodes / preset / loss / delay", f"{res.nodes} / {res.preset} / {res.loss:g} / {res.delay_ms:g} ms"),
        ("full view at (virtual)", _fmt(res.converged_s, " s")),
        ("  after the last start", f"{_fmt(res.convergence_after_last_start_s, ' s')} "
                                   f"= {_fmt(res.convergence_rounds, ' gossip rounds', 1)}"),
        ("one update reaches all", f"{_fmt(res.update_s, ' s')} = {_fmt(res.update_rounds, ' gossip rounds', 1)}"
                                   f" (log2 N = {math.log2(res.nodes):.1f})"),
        ("crashed nodes", str(res.crashed)),
        ("  dead at every survivor p50", _fmt(res.detect_p50_s, " s")),
        ("  dead at every survivor max", _fmt(res.detect_max_s, " s")),
        ("  never detected", str(res.undetected)),
        ("false suspicions (events)", f"{res.false_suspicions} ({res.false_suspicion_events})"),
        ("false deaths (events)", f"{res.false_deaths} ({res.false_death_events})"
                                  + (f", first at {res.first_false_death_s:.1f} s" if res.false_deaths else "")),
        ("refutations", str(res.refutations)),
        ("idle msgs / node / s", _fmt(res.idle_msgs_per_node_s, "", 1)),
        ("idle bytes / node / s", f"{_fmt(res.idle_bytes_per_node_s, '', 0)} = "
                                  f"{_fmt(res.idle_probe_bytes_per_node_s, '', 0)} probes+gossip + "
                                  f"{_fmt(res.idle_sync_bytes_per_node_s, '', 0)} push/pull"),
        ("after-idle msgs / node / s", _fmt(res.msgs_per_node_s, "", 1)),
        ("after-idle bytes / node / s", _fmt(res.bytes_per_node_s, "", 0)),
        ("virtual time / wall time", f"{res.virtual_s:.1f} s / {res.wall_s:.1f} s"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _plot(results: list[Result], path: str, scale: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if scale:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ns = [r.nodes for r in results]
        ax1.plot(ns, [r.update_rounds or 0 for r in results], "o-", label="one update, all nodes")
        ax1.plot(ns, [math.log2(n) for n in ns], "--", label="log2 N")
        ax1.set_xscale("log")
        ax1.set_xlabel("N")
        ax1.set_ylabel("gossip rounds")
        ax1.legend()
        ax2.plot(ns, [r.idle_bytes_per_node_s or 0 for r in results], "o-")
        ax2.set_xscale("log")
        ax2.set_ylim(bottom=0)
        ax2.set_xlabel("N")
        ax2.set_ylabel("idle bytes / node / s")
    else:
        res = results[0]
        s = res.series
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        ax1.plot(s["t"], s["full"], label="nodes with the full view")
        ax1.plot(s["t"], s["dead_frac"], label="(survivor, crashed) pairs marked dead")
        ax1.set_ylabel("fraction")
        ax1.legend()
        t, kb = s["t"], s["kbytes"]
        rate = [0.0] + [
            (kb[k] - kb[k - 1]) / (t[k] - t[k - 1]) / res.nodes for k in range(1, len(t))
        ]
        ax2.plot(t, [max(r, 0.0) for r in rate])
        ax2.set_ylabel("kB / node / s")
        ax2.set_xlabel("virtual time (s)")
        fig.suptitle(f"SWIM: {res.nodes} nodes, loss {res.loss:g}, seed {res.seed}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _summary(res: Result) -> dict[str, Any]:
    out = asdict(res)
    out.pop("series")
    return out


def run(args: argparse.Namespace) -> int:
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(message)s")
    try:
        sizes = [int(x) for x in args.scale.split(",")] if args.scale else [args.nodes]
        results = []
        if args.scale:
            print(_SCALE_HEAD, flush=True)
        for n in sizes:
            scenario = Scenario(args, n)
            handler_filter = SimTimeFilter(scenario.net)
            for h in logging.getLogger().handlers:
                h.filters[:] = [handler_filter]
            results.append(scenario.run())
            if args.scale:
                print(_scale_row(results[-1]), flush=True)
    except (ConfigError, ValueError) as exc:
        print(f"gossip: {exc}", file=sys.stderr)
        return 2
    if not args.scale:
        print_result(results[0])
    if args.plot:
        _plot(results, args.plot, bool(args.scale))
        print(f"plot written to {args.plot}")
    if args.json:
        payload: Any = [_summary(r) for r in results] if args.scale else _summary(results[0])
        print(json.dumps(payload, sort_keys=True))
    return 0


_SCALE_HEAD = (
    f"{'N':>6} {'log2N':>6} {'full view s':>11} {'rounds':>7} {'update rnds':>11} "
    f"{'detect p50':>10} {'idle msg/s':>10} {'idle B/s':>9} {'of it sync':>10} {'wall s':>7}"
)


def _scale_row(r: Result) -> str:
    """One row of the ``--scale`` table: N, bootstrap and update rounds, idle traffic."""
    return (
        f"{r.nodes:>6} {math.log2(r.nodes):>6.1f} {_fmt(r.convergence_after_last_start_s):>11} "
        f"{_fmt(r.convergence_rounds, '', 1):>7} {_fmt(r.update_rounds, '', 1):>11} "
        f"{_fmt(r.detect_p50_s):>10} {_fmt(r.idle_msgs_per_node_s, '', 1):>10} "
        f"{_fmt(r.idle_bytes_per_node_s, '', 0):>9} {_fmt(r.idle_sync_bytes_per_node_s, '', 0):>10} "
        f"{r.wall_s:>7.1f}"
    )
