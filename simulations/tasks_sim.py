"""``python -m simulations tasks``: one map task on many simulated nodes, on virtual time,
under loss, delay, crashes (its coordinator included) and joins.

The harness is ``node.tasks.testing.TaskMesh``, shared with the task tests: N real
``TaskEngine`` cores (the node's code path), every message through the real codecs, a seeded
network (latency, jitter, loss), simulated workers (each subtask takes ``--duration-ms`` on
one of a node's ``--slots``) and failure detection ``--detect-s`` after a crash or a start.

Faults, from their own seeded stream: crashes arrive as a Poisson process of ``--crash-rate``
per virtual minute over random live nodes, plus one forced crash of the task's coordinator
half way through the ideal run when the rate is above 0; joins arrive at ``--join-rate`` per
virtual minute. A crash never takes the last live holder of every committed result (the
design keeps r + 1 copies, refilled after each loss, not more): such a random victim is
drawn again among the nodes that hold nothing and counted as *spared*; the forced crash
waits until its coordinator is not the last one.

Reported:

* exactly once: ``TaskMesh.check_exactly_once`` on the final coordinator, plus
  ``TaskMesh.duplicates`` (subtasks two holders, crashed ones included, recorded with
  different outcomes). Anything wrong, or a task not finished, exits 1;
* throughput vs the ideal: the work (subtasks x duration) over the slot-seconds the live nodes
  offered from the submission until the last result counted (integrated as nodes come and go);
* per coordinator failover, seconds from the crash until a successor coordinates (takeover),
  until it dispatches again, and until its first new result counts (progress resumes);
* messages and encoded bytes per subtask, by message type, and executions per subtask
  (at-least-once: work in flight at a crash runs again).

It prints a table (and with ``--json`` a final JSON line) and plots done subtasks vs virtual
time with the crash, join and failover marks to ``--plot`` (matplotlib, Agg backend).
Same arguments and seed, same numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from node.tasks.coordinator import TaskRecord
from node.tasks.engine import TaskSettings
from node.tasks.testing import SimConfig, TaskMesh
from protocol.messages.tasks import TaskState
from simulations.simnet import FRAME_OVERHEAD

__all__ = ["Failover", "Params", "Report", "add_arguments", "run", "simulate"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Params:
    """One run's knobs (the command's options)."""

    nodes: int = 200
    subtasks: int = 20_000
    crash_rate: float = 1.0
    """Random crashes per virtual minute (0: none, and no forced coordinator crash)."""
    join_rate: float = 1.0
    """Joins per virtual minute."""
    loss: float = 0.01
    latency_ms: float = 2.0
    """One-way delay; jitter adds up to half of it again."""
    detect_s: float = 2.0
    """Seconds until the others see a crash or a start (failure detection, join gossip)."""
    slots: int = 2
    duration_ms: float = 1000.0
    """Virtual time one subtask runs."""
    batch: int = 0
    """Subtasks per assignment (0: the coordinator chooses)."""
    lease_s: float = 5.0
    seed: int = 1
    limit_s: float = 0.0
    """Virtual-time cap (0: 20 x the ideal + 120 s)."""


@dataclass(slots=True)
class Failover:
    """One crash of the task's coordinator; times are seconds after the crash."""

    at: float
    node: str
    epoch: int
    forced: bool
    takeover_s: float | None = None
    """A live node coordinates under a higher ballot."""
    dispatch_s: float | None = None
    """It has handed out work again."""
    resume_s: float | None = None
    """Its first new result counts (done grows past what it replayed)."""
    new_node: str = ""
    _replayed: int = -1


@dataclass(slots=True)
class Report:
    params: dict[str, Any]
    ok: bool = False
    problems: list[str] = field(default_factory=list)
    finished: bool = False
    state: str = ""
    done: int = 0
    failed: int = 0
    duplicates: int = 0
    """Subtasks recorded with different outcomes by two holders (must be 0)."""
    log_duplicates: int = 0
    """Repeated results of an index in the final log, ignored by ``apply`` (allowed)."""
    finish_s: float = 0.0
    """Virtual seconds from the submission until the last result counted."""
    ideal_s: float = 0.0
    """When the work would have finished on every live slot with no overhead."""
    throughput: float = 0.0
    """Subtasks per virtual second."""
    ideal_throughput: float = 0.0
    throughput_ratio: float = 0.0
    """Work / offered slot-seconds until the finish (1: every live slot busy all along)."""
    executions: int = 0
    crashes: int = 0
    spared: int = 0
    joins: int = 0
    nodes_end: int = 0
    failovers: list[Failover] = field(default_factory=list)
    takeovers: int = 0
    messages: int = 0
    bytes: int = 0
    messages_per_subtask: float = 0.0
    bytes_per_subtask: float = 0.0
    wire_bytes_per_subtask: float = 0.0
    """Encoded bodies plus ``FRAME_OVERHEAD`` (length prefix, AEAD tag) per message."""
    by_type: dict[str, dict[str, float]] = field(default_factory=dict)
    """Message type -> count, bytes, per subtask of each."""
    wall_s: float = 0.0
    series: dict[str, list[Any]] = field(default_factory=dict)


# ---------------------------------------------------------------------- the run


class _Run:
    """One simulated task: schedules the faults, watches the records, fills a ``Report``."""

    def __init__(self, p: Params) -> None:
        self._check(p)
        self.p = p
        duration = p.duration_ms / 1000.0
        settings = TaskSettings()
        settings = TaskSettings(coordinator=type(settings.coordinator)(lease_s=p.lease_s))
        self.mesh = TaskMesh(SimConfig(
            nodes=p.nodes, slots=p.slots, latency_s=p.latency_ms / 1000.0,
            jitter_s=p.latency_ms / 2000.0, loss=p.loss, detect_s=p.detect_s,
            duration=lambda index: duration, seed=p.seed, settings=settings))
        self.rng = random.Random(f"{p.seed}:tasks-faults")
        self.work = p.subtasks * duration
        self.ideal_s = self.work / (p.nodes * p.slots)
        self.report = Report(params=asdict(p))
        self.capacity: list[tuple[float, int]] = [(0.0, p.nodes * p.slots)]  # (since, live slots)
        self.marks: dict[str, list[float]] = {"crash": [], "coordinator crash": [], "join": [],
                                              "takeover": [], "resume": []}
        self.progress: list[tuple[float, int]] = [(0.0, 0)]
        self.best = 0
        self.done_flag = False
        self.finish_s: float | None = None
        self.next_join = p.nodes
        self.task = b""

    @staticmethod
    def _check(p: Params) -> None:
        if p.nodes < 2 or p.subtasks < 1 or p.slots < 1 or p.duration_ms <= 0:
            raise ValueError("need --nodes >= 2, --subtasks >= 1, --slots >= 1, --duration-ms > 0")
        if not 0.0 <= p.loss < 1.0 or p.crash_rate < 0 or p.join_rate < 0 or p.latency_ms < 0:
            raise ValueError("--loss must be in [0, 1); rates and latency >= 0")

    # ---- the run ------------------------------------------------------------------------

    def run(self) -> Report:
        wall = time.perf_counter()
        mesh, p = self.mesh, self.p
        self.task = mesh.submit(p.subtasks, batch=p.batch)
        mesh.after_input = self._watch
        if p.crash_rate > 0:
            mesh.at(self.ideal_s / 2, self._crash_coordinator)
            self._next(self._random_crash, p.crash_rate)
        if p.join_rate > 0:
            self._next(self._join, p.join_rate)
        limit = p.limit_s or 20 * self.ideal_s + 120.0
        mesh.run_until(lambda: self.done_flag, limit_s=limit)
        self._finish(time.perf_counter() - wall)
        return self.report

    def _next(self, action: Callable[[], None], per_minute: float) -> None:
        self.mesh.at(self.mesh.now + self.rng.expovariate(per_minute / 60.0), action)

    def _watch(self, nid: bytes) -> None:
        """After every input to ``nid``: progress, takeovers, the end (O(1))."""
        rec = self.mesh.engines[nid].records.get(self.task)
        if rec is None or not rec.is_coordinator:
            return
        now, done = self.mesh.now, rec.kind.done + rec.kind.failed
        for f in self.report.failovers:
            if f.resume_s is None and rec.ballot.epoch > f.epoch:
                self._failover_step(f, rec, now)
        if done > self.best:
            self.best = done
            self.progress.append((now, done))
        if rec.kind.finished() and not self.done_flag:
            self.done_flag = True
            self.finish_s = now

    def _failover_step(self, f: Failover, rec: TaskRecord, now: float) -> None:
        done = rec.kind.done + rec.kind.failed
        if f.takeover_s is None:
            f.takeover_s = now - f.at
            f.new_node = rec.ballot.node.hex()[:8]
            f._replayed = done
            self.marks["takeover"].append(now)
        if f.dispatch_s is None and rec.attempts:
            f.dispatch_s = now - f.at
        if done > f._replayed or rec.kind.finished():
            f.resume_s = now - f.at
            self.marks["resume"].append(now)

    # ---- faults -------------------------------------------------------------------------

    def _crash(self, nid: bytes, *, forced: bool = False) -> None:
        mesh = self.mesh
        rec = mesh.engines[nid].records.get(self.task)
        if rec is not None and rec.is_coordinator and nid == mesh.coordinator_of(self.task):
            self.report.failovers.append(Failover(at=mesh.now, node=nid.hex()[:8], epoch=rec.ballot.epoch,
                                                  forced=forced))
            self.marks["coordinator crash"].append(mesh.now)
        else:
            self.marks["crash"].append(mesh.now)
        mesh.crash(nid)
        self.report.crashes += 1
        self._capacity(-mesh.slots[nid])

    def _crash_coordinator(self) -> None:
        if self.done_flag:
            return
        lead = self.mesh.coordinator_of(self.task)
        if lead is None or self._last_copy(lead):
            self.mesh.at(self.mesh.now + self.p.detect_s, self._crash_coordinator)  # try again later
            return
        self._crash(lead, forced=True)

    def _random_crash(self) -> None:
        if self.done_flag:
            return
        mesh = self.mesh
        live = sorted(mesh.alive)
        if len(live) > 2:
            victim = self.rng.choice(live)
            spare = self._last_copy(victim)
            if spare:
                self.report.spared += 1
                others = [n for n in live if self.task not in mesh.engines[n].records]
                victim = self.rng.choice(others) if others else victim
            if not spare or victim not in self.mesh.holders(self.task):
                self._crash(victim)
        self._next(self._random_crash, self.p.crash_rate)

    def _last_copy(self, victim: bytes) -> bool:
        """No live node but ``victim`` holds every result committed so far (by any holder,
        crashed ones included): crashing it would lose them whatever the engines do."""
        holders = self.mesh.holders(self.task, crashed=True)
        if victim not in holders:
            return False
        committed = max(self.mesh.engines[n].records[self.task].committed for n in holders)
        return not any(n != victim and n in self.mesh.alive
                       and len(self.mesh.engines[n].records[self.task].log) >= committed for n in holders)

    def _join(self) -> None:
        if self.done_flag:
            return
        mesh = self.mesh
        nid = mesh.add_node(self.next_join, at=mesh.now)
        self.next_join += 1
        self.report.joins += 1
        self.marks["join"].append(mesh.now)
        self._capacity(mesh.slots[nid])
        self._next(self._join, self.p.join_rate)

    def _capacity(self, delta: int) -> None:
        self.capacity.append((self.mesh.now, self.capacity[-1][1] + delta))

    # ---- the report ---------------------------------------------------------------------

    def _offered(self, until: float) -> float:
        """Slot-seconds the live nodes offered from 0 to ``until``."""
        total = 0.0
        for (since, slots), (nxt, _) in zip(self.capacity, [*self.capacity[1:], (math.inf, 0)], strict=True):
            if since >= until:
                break
            total += slots * (min(nxt, until) - since)
        return total

    def _ideal_finish(self) -> float:
        """When ``work`` slot-seconds would have been offered."""
        left = self.work
        for (since, slots), (nxt, _) in zip(self.capacity, [*self.capacity[1:], (math.inf, 0)], strict=True):
            if slots > 0 and slots * (nxt - since) >= left:
                return since + left / slots
            left -= slots * (nxt - since)
        return math.inf

    def _finish(self, wall_s: float) -> None:
        mesh, r, n = self.mesh, self.report, self.p.subtasks
        r.finished = self.done_flag and mesh.finished(self.task)
        summary = mesh.summary(self.task)
        r.state = summary.state.name.lower() if summary is not None else "no coordinator"
        if summary is not None:
            r.done, r.failed = summary.done, summary.failed
        r.problems = mesh.check_exactly_once(self.task)
        r.duplicates = mesh.duplicates(self.task)
        if r.duplicates:
            r.problems.append(f"{r.duplicates} subtasks recorded twice with different outcomes")
        if not r.finished:
            r.problems.append(f"not finished by {mesh.now:.1f} s (state {r.state})")
        elif summary is not None and summary.state is not TaskState.DONE:
            r.problems.append(f"task ended {r.state}: {r.failed} subtasks failed")
        r.log_duplicates = mesh.log_duplicates(self.task) if mesh.coordinator_of(self.task) else 0
        r.ok = not r.problems
        r.finish_s = self.finish_s if self.finish_s is not None else mesh.now
        r.ideal_s = self._ideal_finish()
        offered = self._offered(r.finish_s)
        r.throughput = n / r.finish_s if r.finish_s > 0 else 0.0
        r.ideal_throughput = offered / r.finish_s / (self.p.duration_ms / 1000.0) if r.finish_s > 0 else 0.0
        r.throughput_ratio = self.work / offered if offered > 0 else 0.0
        r.executions = sum(mesh.executions.values())
        r.nodes_end = len(mesh.alive)
        r.takeovers = sum(e.counters["takeovers"] for e in mesh.engines.values())
        r.messages, r.bytes = mesh.messages, mesh.bytes
        r.messages_per_subtask = mesh.messages / n
        r.bytes_per_subtask = mesh.bytes / n
        r.wire_bytes_per_subtask = (mesh.bytes + FRAME_OVERHEAD * mesh.messages) / n
        r.by_type = {name: {"messages": count, "bytes": mesh.bytes_by_type[name],
                            "per_subtask": count / n, "bytes_per_subtask": mesh.bytes_by_type[name] / n}
                     for name, count in sorted(mesh.by_type.items(), key=lambda kv: -mesh.bytes_by_type[kv[0]])}
        r.wall_s = wall_s
        r.series = {"t": [t for t, _ in self.progress], "done": [d for _, d in self.progress],
                    "capacity": [list(c) for c in self.capacity], **self.marks}


def simulate(p: Params) -> Report:
    """Run one scenario (module docstring); ``ValueError`` for impossible knobs."""
    return _Run(p).run()


# ------------------------------------------------------------------- output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Params()
    parser.add_argument("--nodes", type=int, default=d.nodes, help=f"nodes at the start (default {d.nodes})")
    parser.add_argument("--subtasks", type=int, default=d.subtasks, help=f"subtasks of the one map task (default {d.subtasks})")
    parser.add_argument("--crash-rate", type=float, default=d.crash_rate,
                        help="random crashes per virtual minute; above 0 the coordinator is also "
                             f"crashed once half way (default {d.crash_rate:g})")
    parser.add_argument("--join-rate", type=float, default=d.join_rate, help=f"joins per virtual minute (default {d.join_rate:g})")
    parser.add_argument("--loss", type=float, default=d.loss, help=f"message loss probability (default {d.loss:g})")
    parser.add_argument("--latency-ms", type=float, default=d.latency_ms,
                        help=f"one-way delay, ms, plus up to half again of jitter (default {d.latency_ms:g})")
    parser.add_argument("--detect-s", type=float, default=d.detect_s,
                        help=f"seconds until the others see a crash or a join (default {d.detect_s:g})")
    parser.add_argument("--slots", type=int, default=d.slots, help=f"worker slots per node (default {d.slots})")
    parser.add_argument("--duration-ms", type=float, default=d.duration_ms,
                        help=f"virtual run time of one subtask (default {d.duration_ms:g})")
    parser.add_argument("--batch", type=int, default=d.batch, help="subtasks per assignment (default 0: the coordinator chooses)")
    parser.add_argument("--lease-s", type=float, default=d.lease_s, help=f"attempt lease (default {d.lease_s:g})")
    parser.add_argument("--seed", type=int, default=d.seed, help="simulation seed")
    parser.add_argument("--limit-s", type=float, default=0.0, help="virtual-time cap (default 20 x ideal + 120)")
    parser.add_argument("--plot", metavar="PATH", default="tasks_sim.png", help="PNG plot (default tasks_sim.png; '' for none)")
    parser.add_argument("--json", action="store_true", help="print a final JSON line")


def _params(args: argparse.Namespace) -> Params:
    return Params(nodes=args.nodes, subtasks=args.subtasks, crash_rate=args.crash_rate, join_rate=args.join_rate,
                  loss=args.loss, latency_ms=args.latency_ms, detect_s=args.detect_s, slots=args.slots,
                  duration_ms=args.duration_ms, batch=args.batch, lease_s=args.lease_s, seed=args.seed,
                  limit_s=args.limit_s)


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def print_report(r: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    p = r.params
    table = Table(title=f"tasks: {p['nodes']} nodes x {p['slots']} slots, {p['subtasks']} subtasks of "
                        f"{p['duration_ms']:g} ms, loss {p['loss']:g}, seed {p['seed']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows: list[tuple[str, str]] = [
        ("exactly once", "yes" if r.ok else "NO: " + "; ".join(r.problems[:3])),
        ("state / done / failed", f"{r.state} / {r.done} / {r.failed}"),
        ("recorded twice (different outcomes)", str(r.duplicates)),
        ("repeated results ignored (log)", str(r.log_duplicates)),
        ("finish / ideal (virtual s)", f"{r.finish_s:.2f} / {r.ideal_s:.2f}"),
        ("subtasks/s / ideal", f"{r.throughput:.1f} / {r.ideal_throughput:.1f}"),
        ("throughput vs ideal", f"{r.throughput_ratio:.1%}"),
        ("executions per subtask", f"{r.executions / max(1, p['subtasks']):.3f}"),
        ("crashes (spared holders) / joins", f"{r.crashes} ({r.spared}) / {r.joins}"),
        ("nodes at the end", str(r.nodes_end)),
        ("coordinator failovers / takeovers", f"{len(r.failovers)} / {r.takeovers}"),
    ]
    for k, f in enumerate(r.failovers, 1):
        rows.append((f"  #{k} at {f.at:.2f} s{' (forced)' if f.forced else ''}",
                     f"takeover {_s(f.takeover_s)} s, dispatch {_s(f.dispatch_s)} s, resume {_s(f.resume_s)} s"))
    rows += [
        ("messages / subtask", f"{r.messages_per_subtask:.2f}"),
        ("bytes / subtask (bodies; +framing)", f"{r.bytes_per_subtask:.0f} ({r.wire_bytes_per_subtask:.0f})"),
    ]
    for name, t in r.by_type.items():
        rows.append((f"  {name}", f"{t['per_subtask']:.3f} msgs, {t['bytes_per_subtask']:.0f} B"))
    rows.append(("wall time", f"{r.wall_s:.1f} s"))
    for label, value in rows:
        table.add_row(label, value)
    Console(width=120).print(table)


def plot(r: Report, path: str) -> bool:
    """Done subtasks vs virtual time with the fault marks; False if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, p = r.series, r.params
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.step(s["t"], s["done"], where="post", label="results counted (coordinator)")
    work, duration = p["subtasks"] * p["duration_ms"] / 1000.0, p["duration_ms"] / 1000.0
    ts, ideal, acc = [0.0], [0.0], 0.0
    cap = s["capacity"]
    for (since, slots), (nxt, _) in zip(cap, [*cap[1:], (r.ideal_s, 0)], strict=True):
        end = min(nxt, r.ideal_s)
        if end > since:
            acc += slots * (end - since)
            ts.append(end)
            ideal.append(min(acc, work) / duration)
    ax.plot(ts, ideal, "--", color="grey", label="ideal (every live slot busy)")
    styles = {"crash": ("red", ":"), "coordinator crash": ("red", "-"), "join": ("green", ":"),
              "takeover": ("orange", "--"), "resume": ("purple", "-.")}
    for name, (color, style) in styles.items():
        for k, t in enumerate(s.get(name, [])):
            ax.axvline(t, color=color, linestyle=style, linewidth=1, label=name if k == 0 else None)
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("subtasks done")
    ax.set_title(f"tasks: {p['nodes']} nodes, {p['subtasks']} subtasks, crash {p['crash_rate']:g}/min, "
                 f"join {p['join_rate']:g}/min, loss {p['loss']:g}: {r.throughput_ratio:.0%} of ideal")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def summary(r: Report) -> dict[str, Any]:
    """The report without its series, for the JSON line."""
    out = asdict(r)
    out.pop("series")
    for f in out["failovers"]:
        f.pop("_replayed", None)
    return out


def run(args: argparse.Namespace) -> int:
    try:
        report = simulate(_params(args))
    except ValueError as exc:
        print(f"tasks: {exc}")
        return 2
    print_report(report)
    if args.plot:
        print(f"plot written to {args.plot}" if plot(report, args.plot)
              else "plot skipped: matplotlib is not installed")
    if args.json:
        print(json.dumps(summary(report), sort_keys=True))
    return 0 if report.ok else 1
