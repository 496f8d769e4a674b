"""``python -m simulations chaos --nodes 6 --minutes 10 --seed 1``: real processes under faults and attack.

What runs (all on loopback, one mesh key):

* ``--nodes`` honest ``python -m node`` processes (``simulations.nodeprocs``), each with its
  own data dir and a fixed port, so a restart keeps its identity and address;
* ``--trainers`` honest members running all-reduce rounds among themselves on a shared clock
  (``simulations.chaos_trainer_worker``: one round every ``--period`` seconds, codecs
  ``none`` / ``fp16`` / ``int8`` in turn, each result checked against the exact mean);
* one hostile member with the key and its strangers without it
  (``simulations.hostile_worker``: bad frames, lies, incarnation extremes, fake-member
  floods, PING_REQs to closed ports, AR_REPORT floods; idle and half-open connections, from
  other loopback addresses than the members' 127.0.0.1 unless ``--stranger-ips 0``).

The run: start and converge; a baseline (``--warmup`` seconds later); the chaos phase, a
seeded schedule of ``kill -9`` + restart after 1-3 s (``--kills-per-min``, spread evenly, among the upper
half of the nodes: the lower half, the seed included, and the trainers are never killed, so
their whole run is measured) and SIGSTOP freezes of 1-3 s (``--freezes-per-min``, any node
or trainer), at most one of each at a time, while the hostile member attacks; then a quiet
phase (``--settle`` s: the hostile member stops, every node runs); a heal phase (until one
view and every rejoin done, ``--heal-timeout`` at most); a final check; SIGTERM to everyone.
``--minutes`` is the chaos and quiet phases together.

Observed throughout: every honest member's status over one persistent CLIENT link per
member (``nodeprocs.Observer``, every ``--poll`` s: members, incarnations, the metrics
``connections``, queue sizes, ``loop_lag_seconds``), a freshly dialed status connection
every 5 s (a node that keeps old links but refuses new ones is locked out), and ``/proc`` for
open fds and RSS every 2 s. Afterwards the node logs (every ``member dead`` line, every
ERROR), the hostile member's acts and the trainers' rounds. ``simulations.chaos_report``
says how deaths are classified and what counts as a leak, lock-out or crash; any of those
makes the exit status 1. Progress lines and a table (rich); with ``--json`` a final JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from node.config import parse_address
from node.status import StatusClient
from protocol.errors import StarmeshError
from simulations.allreduce_procs import child_env, free_port
from simulations.chaos_report import (
    GRACE_S,
    STOP_TIMEOUT_S,
    Kill,
    MemberRecord,
    RunRecord,
    analyze,
    load_jsonl,
    metric_sample,
    render,
)
from simulations.nodeprocs import REPO_ROOT, LocalMesh, NodeProcess, Observer, View, states

PAGE = os.sysconf("SC_PAGE_SIZE")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=6, help="honest python -m node processes (>= 3)")
    parser.add_argument("--trainers", type=int, default=3, help="honest members running all-reduce rounds (0: none)")
    parser.add_argument("--minutes", type=float, default=10.0, help="chaos plus quiet phase, minutes")
    parser.add_argument("--seed", type=int, default=1, help="seeds the fault schedule and the hostile member")
    parser.add_argument("--preset", default="local", help="SWIM preset of every member (default local)")
    parser.add_argument("--kills-per-min", type=float, default=2.0, help="kill -9 + restart per minute")
    parser.add_argument("--freezes-per-min", type=float, default=3.0, help="SIGSTOP freezes per minute")
    parser.add_argument("--attacks", default="",
                        help="comma-separated hostile acts to use (default all: bad_frame, suspect_lie, dead_lie, "
                             "self_max, others_max, fake_flood, closed_dials, ar_flood)")
    parser.add_argument("--attack-every", type=float, default=1.0, help="mean seconds between hostile acts")
    parser.add_argument("--strangers", type=int, default=80,
                        help="keyless connections the hostile process keeps to every member (half idle, half half-open)")
    parser.add_argument("--stranger-ips", type=int, default=4,
                        help="loopback source addresses the strangers use (127.0.1.1...; 0: 127.0.0.1, "
                             "the honest members' own, so they share its per-address handshake quota)")
    parser.add_argument("--no-hostile", action="store_true", help="faults only, no hostile member or strangers")
    parser.add_argument("--period", type=float, default=3.0, help="seconds per all-reduce slot")
    parser.add_argument("--size", type=int, default=1 << 16, help="elements per all-reduce round")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds from convergence to the baseline")
    parser.add_argument("--settle", type=float, default=None,
                        help="quiet phase, seconds (default: 10%% of the run, 15..45)")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between status polls")
    parser.add_argument("--lockout-s", type=float, default=10.0,
                        help="seconds without any status answer that count as a lock-out")
    parser.add_argument("--rejoin-timeout", type=float, default=30.0,
                        help="seconds after which a restarted node not yet alive in every honest view "
                             "counts as a slow rejoin (a failed one if it never gets there)")
    parser.add_argument("--heal-timeout", type=float, default=60.0,
                        help="seconds after the quiet phase to wait for one view and every rejoin")
    parser.add_argument("--dir", type=Path, default=None, help="keep data dirs and logs here (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (printed at the end)")
    parser.add_argument("--json", action="store_true", help="print a final JSON line")


# --------------------------------------------------------------------------- processes


@dataclass
class WorkerProcess(NodeProcess):
    """A member that is not ``python -m node`` but a worker module running a ``Node`` with the
    same flags (``simulations.worker_node``); everything else as ``NodeProcess``."""

    module: str = ""
    worker_args: Sequence[str] = ()

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        args = [sys.executable, "-m", self.module, "--data-dir", str(self.data_dir),
                "--mesh-key-file", str(self.mesh_key), "--preset", self.preset,
                "--ready-file", str(self.ready_file), *self.extra_args, *self.worker_args]
        for seed in self.seeds:
            args += ["--join", seed]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, cwd=REPO_ROOT, env=child_env(), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)


@dataclass
class Member:
    """One honest member: its process and what is recorded about it."""

    proc: NodeProcess
    record: MemberRecord
    killable: bool
    down_until: float | None = None
    """Killed at the schedule's word: restart due at this time."""
    frozen_until: float | None = None
    ready_seen: float = 0.0
    thawed: float = 0.0
    last_view: View | None = None
    pending_rejoin: Kill | None = None

    @property
    def name(self) -> str:
        return self.record.name

    def running(self) -> bool:
        return self.proc.proc is not None and self.proc.proc.poll() is None and self.down_until is None

    def answerable(self, now: float) -> bool:
        """Running, not frozen, listening, and past the grace after a start or a thaw."""
        return (self.running() and self.frozen_until is None and bool(self.proc.address)
                and now >= self.ready_seen + GRACE_S and now >= self.thawed + GRACE_S)

    def pid(self) -> int | None:
        return self.proc.proc.pid if self.proc.proc is not None else None


@dataclass
class Fault:
    at: float
    """Seconds after the chaos phase starts."""
    kind: str
    """``kill`` or ``freeze``."""
    length: float
    """Seconds down before the restart, or frozen."""


def schedule(seed: int, length: float, kills_per_min: float, freezes_per_min: float) -> list[Fault]:
    """The seeded faults of a chaos phase of ``length`` seconds: ``rate x length`` of each kind
    (at least one when the rate is not 0), one at a random point of each equal share of the
    phase, each 1-3 s long."""
    rng = random.Random(f"chaos:{seed}")
    out: list[Fault] = []
    for kind, rate in (("kill", kills_per_min), ("freeze", freezes_per_min)):
        n = max(1, round(rate * length / 60.0)) if rate > 0 and length > 0 else 0
        share = length / n if n else 0.0
        out += [Fault(at=(i + rng.uniform(0.15, 0.85)) * share, kind=kind, length=rng.uniform(1.0, 3.0))
                for i in range(n)]
    return sorted(out, key=lambda f: f.at)


def proc_sample(pid: int) -> tuple[int, int] | None:
    """(open fds, RSS bytes) of ``pid`` from ``/proc``; None if it is gone."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return None
    return fds, rss


# --------------------------------------------------------------------------- the run


@dataclass
class Chaos:
    args: argparse.Namespace
    root: Path
    mesh: LocalMesh
    members: list[Member] = field(default_factory=list)
    hostile: WorkerProcess | None = None
    rng: random.Random = field(default_factory=random.Random)
    skipped: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    # ---- start ------------------------------------------------------------------------

    def _node(self, name: str, *, seeds: Sequence[str], killable: bool) -> Member:
        port = free_port()
        proc = self.mesh.add(seeds=seeds, extra_args=("--listen", f"127.0.0.1:{port}", "--log-level", "INFO"))
        return Member(proc, MemberRecord(name, "node", log_path=proc.log_path), killable)

    def _worker(self, name: str, module: str, worker_args: Sequence[str], seeds: Sequence[str]) -> WorkerProcess:
        port = free_port()
        proc = WorkerProcess(data_dir=self.root / name, mesh_key=self.mesh.mesh_key, seeds=seeds,
                             preset=self.args.preset, extra_args=("--listen", f"127.0.0.1:{port}",
                                                                  "--log-level", "INFO"),
                             module=module, worker_args=worker_args)
        self.mesh.nodes.append(proc)
        proc.start()
        return proc

    async def start(self) -> float:
        """Start everyone, wait for one view; the time of slot 0 of the trainers."""
        a = self.args
        first = self._node("n0", seeds=(), killable=False)
        self.members.append(first)
        await self._ready([first.proc])
        seeds = (first.proc.address,)
        for i in range(1, a.nodes):
            self.members.append(self._node(f"n{i}", seeds=seeds, killable=i >= (a.nodes + 1) // 2))
        t0 = time.time() + 15.0
        for i in range(a.trainers):
            proc = self._worker(f"t{i}", "simulations.chaos_trainer_worker", (
                "--group-size", str(a.trainers), "--t0", str(t0), "--period", str(a.period),
                "--size", str(a.size), "--out", str(self.root / f"t{i}" / "rounds.jsonl")), seeds)
            self.members.append(Member(proc, MemberRecord(f"t{i}", "trainer", log_path=proc.log_path), False))
        await self._ready([m.proc for m in self.members], timeout=60.0)
        now = time.time()
        for m in self.members:
            m.record.node_id, m.ready_seen = m.proc.node_id, now
            m.record.starts.append(now)
        (self.root / "targets.json").write_text(json.dumps(
            [{"id": m.proc.node_id, "address": m.proc.address} for m in self.members]))
        return t0

    def start_hostile(self) -> None:
        a = self.args
        self.hostile = self._worker("hostile", "simulations.hostile_worker", (
            "--targets", str(self.root / "targets.json"), "--acts", str(self.root / "hostile" / "acts.jsonl"),
            "--seed", str(a.seed), "--every", str(a.attack_every), "--strangers", str(a.strangers),
            "--attacks", a.attacks,
            "--stranger-ips", ",".join(f"127.0.1.{i + 1}" for i in range(a.stranger_ips))),
            (self.members[0].proc.address,))

    async def _ready(self, procs: Sequence[NodeProcess], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(p.poll_ready() for p in procs):
            dead = [p for p in procs if p.proc is not None and p.proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(p.log_text()[-2000:] for p in procs if not p.poll_ready())
                raise RuntimeError(f"member processes did not start:\n{logs}")
            await asyncio.sleep(0.05)

    def one_view(self) -> bool:
        """Every member's last view shows every honest member alive."""
        return not self.disagreements()

    def disagreements(self) -> list[str]:
        """``"n2 sees n1 dead@3"`` for every honest member some member's view does not show alive."""
        out = []
        for m in self.members:
            if m.last_view is None:
                out.append(f"{m.name} has no view")
                continue
            seen = states(m.last_view)
            for o in self.members:
                state, inc = seen.get(o.proc.node_id, ("unknown", -1))
                if state != "alive":
                    out.append(f"{m.name} sees {o.name} {state}@{inc}")
        return out

    # ---- faults -----------------------------------------------------------------------

    def _busy(self) -> tuple[bool, bool]:
        """(a kill in progress: down, or rejoining and not yet slow; a freeze in progress)."""
        rejoining = [m.pending_rejoin for m in self.members if m.pending_rejoin is not None]
        return (any(m.down_until is not None for m in self.members) or any(not k.slow for k in rejoining),
                any(m.frozen_until is not None for m in self.members))

    def apply(self, fault: Fault, now: float) -> None:
        killing, freezing = self._busy()
        if fault.kind == "kill":
            pool = [m for m in self.members if m.killable and m.running() and m.frozen_until is None]
            if killing or not pool:
                self.skipped += 1
                return
            victim = self.rng.choice(pool)
            inc = _own_incarnation(victim.last_view)
            victim.proc.kill()
            victim.down_until = now + fault.length
            victim.pending_rejoin = Kill(at=now, incarnation_before=inc)
            victim.record.kills.append(victim.pending_rejoin)
        else:
            pool = [m for m in self.members if m.running() and m.frozen_until is None and m.pending_rejoin is None]
            if freezing or not pool:
                self.skipped += 1
                return
            victim = self.rng.choice(pool)
            victim.proc.signal(signal.SIGSTOP)
            victim.frozen_until = now + fault.length
            victim.record.freezes.append((now, now + fault.length))

    def tick_faults(self, now: float) -> None:
        """Restarts and thaws that are due; crashes noticed (recorded, then restarted)."""
        for m in self.members:
            if m.frozen_until is not None and now >= m.frozen_until:
                m.proc.signal(signal.SIGCONT)
                m.frozen_until, m.thawed = None, now
            if m.down_until is not None and now >= m.down_until:
                m.down_until = None
                assert m.pending_rejoin is not None
                m.pending_rejoin.restarted = now
                m.proc.restart()
            elif m.down_until is None and m.proc.proc is not None and m.proc.proc.poll() is not None:
                rc = m.proc.proc.returncode
                m.record.crashes.append({"t": now, "rc": rc, "log": m.proc.log_text()[-1500:]})
                kill = Kill(at=now, cause="crash", incarnation_before=_own_incarnation(m.last_view),
                            restarted=now)
                m.record.kills.append(kill)
                m.pending_rejoin = kill
                m.frozen_until = None
                m.proc.restart()
            rejoin = m.pending_rejoin
            if rejoin is not None and rejoin.ready is None and not m.proc.address and m.proc.poll_ready():
                rejoin.ready = m.ready_seen = now
                m.record.starts.append(now)
            self._check_rejoin(m, now)

    def _check_rejoin(self, m: Member, now: float) -> None:
        kill = m.pending_rejoin
        if kill is None or kill.restarted is None:
            return
        if kill.ready is None:
            if now - kill.restarted > 20.0:
                kill.failed = "did not listen within 20 s"
                m.pending_rejoin = None
            return
        others = [o for o in self.members if o is not m and o.answerable(now) and o.last_view is not None]
        before = kill.incarnation_before if kill.incarnation_before is not None else -1
        seen = [states(o.last_view).get(m.proc.node_id, ("unknown", -1)) for o in others]
        if others and all(s == "alive" and inc > before for s, inc in seen):
            kill.rejoined, kill.failed = now, ""
            m.pending_rejoin = None
        elif now - kill.ready > self.args.rejoin_timeout:
            kill.slow = True
            kill.failed = ("not alive with a new incarnation in every honest view by the end: "
                           + ", ".join(f"{o.name} {s}@{inc}" for o, (s, inc) in zip(others, seen, strict=True)))

    def healed(self) -> bool:
        """One view, and no rejoin pending."""
        return self.one_view() and all(m.pending_rejoin is None for m in self.members)

    # ---- observation ------------------------------------------------------------------

    async def observe(self, obs: Observer, now: float, *, sample_proc: bool, fresh: bool) -> None:
        targets = [m for m in self.members if m.answerable(now)]
        views = await obs.views([m.proc for m in targets], timeout=1.0)
        stamp = time.time()
        for m in targets:
            view = views.get(m.proc.node_id)
            m.record.answers.append((stamp, "poll", view is not None))
            if view is not None:
                m.last_view = view
                pid = m.pid()
                m.record.metrics.append((stamp, pid or 0, metric_sample(view.get("metrics", {}))))
        if fresh:
            oks = await asyncio.gather(*(self.fresh_status(m) for m in targets))
            for m, ok in zip(targets, oks, strict=True):
                m.record.answers.append((time.time(), "fresh", ok))
        if sample_proc:
            for m in self.members:
                pid = m.pid()
                got = proc_sample(pid) if pid is not None and m.running() else None
                if pid is not None and got is not None:
                    m.record.proc.append((stamp, pid, got[0], got[1]))

    async def fresh_status(self, m: Member, timeout: float = 3.0) -> bool:
        """Whether ``m`` answers a status request on a connection dialed just now."""
        try:
            client = await StatusClient.connect(parse_address(m.proc.address), mesh_secret=self.mesh.secret,
                                                spawn=self._spawn, timeout=timeout)
        except (StarmeshError, TimeoutError, OSError):
            return False
        try:
            await client.request(timeout=timeout)
            return True
        except (StarmeshError, TimeoutError, OSError):
            return False
        finally:
            client.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def loop(self, obs: Observer, until: float, faults: list[Fault], chaos_start: float,
                   done: Callable[[], bool] | None = None) -> None:
        """Poll, apply due faults, restart and thaw, until ``until`` (unix time) or ``done()``."""
        next_proc = next_fresh = 0.0
        pending = list(faults)
        while True:
            now = time.time()
            if now >= until or (done is not None and done()):
                return
            while pending and chaos_start + pending[0].at <= now:
                self.apply(pending.pop(0), now)
            self.tick_faults(now)
            sample, fresh = now >= next_proc, now >= next_fresh
            if sample:
                next_proc = now + 2.0
            if fresh:
                next_fresh = now + 5.0
            await self.observe(obs, now, sample_proc=sample, fresh=fresh)
            self.tick_faults(time.time())
            await asyncio.sleep(max(0.0, now + self.args.poll - time.time()))

    def quiet(self, now: float) -> int | None:
        """End the chaos: stop the hostile member, thaw and restart everyone; its exit code."""
        rc = None
        if self.hostile is not None:
            rc = self.hostile.stop(timeout=10.0)
        for m in self.members:
            if m.frozen_until is not None:
                m.frozen_until = now
            if m.down_until is not None:
                m.down_until = now
        self.tick_faults(now)
        return rc

    async def stop_all(self) -> None:
        """SIGTERM every member at once; record how each ended."""
        for m in self.members:
            if m.frozen_until is not None:
                m.proc.signal(signal.SIGCONT)
        start = time.monotonic()
        for m in self.members:
            m.proc.signal(signal.SIGTERM)
        left = {id(m): m for m in self.members if m.proc.proc is not None}
        while left and time.monotonic() - start < 3 * STOP_TIMEOUT_S:
            for key, m in list(left.items()):
                assert m.proc.proc is not None
                rc = m.proc.proc.poll()
                if rc is not None:
                    m.record.stop = {"rc": rc, "seconds": round(time.monotonic() - start, 2)}
                    del left[key]
            await asyncio.sleep(0.05)
        for m in left.values():
            m.record.stop = {"rc": None, "seconds": round(time.monotonic() - start, 2)}
            m.proc.kill()


def _own_incarnation(view: View | None) -> int | None:
    return None if view is None else int(view["self"]["incarnation"])


async def _run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    total = args.minutes * 60.0
    settle = args.settle if args.settle is not None else max(15.0, min(45.0, 0.1 * total))
    chaos_len = max(0.0, total - settle)
    mesh = LocalMesh(root, preset=args.preset)
    run = Chaos(args, root, mesh, rng=random.Random(f"victims:{args.seed}"))
    try:
        started = time.time()
        _progress(args, f"starting {args.nodes} nodes and {args.trainers} trainers in {root}")
        await run.start()
        async with Observer(mesh.secret) as obs:
            deadline = time.time() + 60.0
            while not run.one_view():
                if time.time() > deadline:
                    raise RuntimeError("the honest members did not converge within 60 s")
                await run.observe(obs, time.time() + GRACE_S, sample_proc=False, fresh=False)
                await asyncio.sleep(0.2)
            _progress(args, f"converged after {time.time() - started:.1f}s; warming up {args.warmup:g}s")
            await run.loop(obs, time.time() + args.warmup, [], 0.0)
            baseline = time.time()
            if not args.no_hostile:
                run.start_hostile()
            faults = schedule(args.seed, chaos_len, args.kills_per_min, args.freezes_per_min)
            _progress(args, f"chaos for {chaos_len:.0f}s ({sum(f.kind == 'kill' for f in faults)} kills, "
                            f"{sum(f.kind == 'freeze' for f in faults)} freezes scheduled), then {settle:.0f}s quiet")
            await run.loop(obs, baseline + chaos_len, faults, baseline)
            chaos_end = time.time()
            hostile_rc = run.quiet(chaos_end)
            await run.loop(obs, chaos_end + settle, [], 0.0)
            quiet_end = time.time()
            await run.loop(obs, quiet_end + args.heal_timeout, [], 0.0, done=run.healed)
            final = time.time()
            heal = round(final - quiet_end, 1) if run.healed() else None
            await run.observe(obs, final + GRACE_S, sample_proc=True, fresh=False)
            disagreements = run.disagreements()
            for m in run.members:
                m.record.final_fresh = await run.fresh_status(m)
        await run.stop_all()
        record = RunRecord(
            args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")},
            members=[m.record for m in run.members], started=started, baseline=baseline,
            chaos_end=chaos_end, final=final,
            acts=load_jsonl(root / "hostile" / "acts.jsonl"),
            rounds={m.name: load_jsonl(root / m.name / "rounds.jsonl") for m in run.members
                    if m.record.kind == "trainer"},
            final_view_ok=not disagreements, final_view=disagreements, heal_seconds=heal, skipped_faults=run.skipped, hostile_rc=hostile_rc,
            peers=len(run.members) - 1)
        (root / "record.json").write_text(json.dumps(asdict(record), default=str))
        (root / "final_views.json").write_text(json.dumps({m.name: m.last_view for m in run.members}))
        return analyze(record, lockout_s=args.lockout_s)
    finally:
        mesh.close()


def _progress(args: argparse.Namespace, line: str) -> None:
    print(line, flush=True)


def run(args: argparse.Namespace) -> int:
    if args.nodes < 3:
        raise SystemExit("--nodes must be >= 3")
    if args.trainers == 1:
        raise SystemExit("--trainers must be 0 or >= 2 (a round needs two contributors)")
    root = args.dir or Path(tempfile.mkdtemp(prefix="starmesh-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        report = asyncio.run(_run(args, root))
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"logs and records kept in {root}")
    render(report)
    if args.json:
        with contextlib.suppress(BrokenPipeError):
            print(json.dumps(report, sort_keys=True, default=str), flush=True)
    return 0 if report["ok"] else 1
