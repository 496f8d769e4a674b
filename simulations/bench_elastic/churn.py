"""``bench elastic --part churn``: a job of ``--churn-workers`` workers under kill -9 and joins.

For each mode of ``--modes``, two runs of the same char-GPT job (``--churn-steps`` steps, global
batch ``--global-batch``, ``--workers MIN-W``), each on a fresh ``EmulatedCluster`` of W
machines (every node capped to ``--cap`` cores in its own cgroup, ``--shape`` tbf links, the
submitter on a machine of its own so it keeps its connections whichever node dies):

churn
    once the first segment is committed, every ``--period`` seconds one machine dies and, half
    a period later, a fresh one starts and joins the mesh (through a live node), until the job
    ends or ``--max-events`` deaths. A death is ``EmulatedCluster.kill_machine``: SIGKILL to
    every process in the node's cgroup (node, task and training processes), then its link goes
    down. The victim is a worker of the job's current group with a share, found with ``python -m
    node jobs --json`` (``workers`` less ``listeners``; asked of the last known coordinator
    first; a listener only when no active worker is left), never the coordinator, except at
    death number ``--coordinator-kill`` (default 2), which is the job's coordinator (that row's
    ``coordinator``); the others are drawn with ``--churn-seed``.
baseline
    the same job on W machines that nobody touches (``--no-baseline``: skipped).

Reported: whether the churn job finished (every step committed, exit 0), its validation loss
against the baseline's (goal: within 3 %), the records' group events (``GONE``, ``JOINED``,
``ACTIVE``, ``FAILED``), the micro-batches read (the final record's shard cursors, against
steps x global batch: a loss mid-segment leaves the rounds after it with the survivors' share
only) and the time lost: (churn wall - baseline wall) / events, both on the submitter's clock
(the train CLI's ``wall_s``), an event being a death or a join; split into what the committed
segments with a group event took beyond the baseline's median seconds per step (``in
segments``) and the rest (plans that failed and ran again, waits for able members, gaps). Part
of the loss is capacity, not overhead: between a death and the next join the group is one
worker short and, at a fixed global batch, each survivor computes more per step.

Prints a table, with ``--json`` a JSON line per run and a final JSON line. Skips (exit 0)
without root unless ``--cap 0 --shape loopback``; exit 1 when a job failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulations.bench_elastic.cluster import CgroupWatch, EmulatedCluster
from simulations.bench_elastic.common import link_rate, parse_modes, skipped, workspace
from simulations.bench_elastic.follow import Stalled, TrainRun, job_records, jobs
from simulations.bench_elastic.newcomer import (
    job_flags,
    job_options,
    seconds_per_step,
    segment_steps,
)
from simulations.nodeprocs import wait_for

LOSS_GOAL = 0.03
"""The bar: the validation loss under churn within 3 % of the run without churn."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--period", type=float, default=30.0, help="churn: seconds between deaths (and joins) (30)")
    parser.add_argument("--churn-workers", type=int, default=6, help="churn: workers W of the job (6)")
    parser.add_argument("--churn-min", type=int, default=2,
                        help="churn: the job's MIN workers (rounds with fewer contributors fail) (2)")
    parser.add_argument("--churn-steps", type=int, default=600, help="churn: optimizer steps of the job (600)")
    parser.add_argument("--coordinator-kill", type=int, default=2,
                        help="churn: the death (1, 2, ...) that takes the job's coordinator (2)")
    parser.add_argument("--max-events", type=int, default=12, help="churn: deaths at most (12)")
    parser.add_argument("--churn-seed", type=int, default=0, help="churn: seed of the victims' draw (0)")
    parser.add_argument("--no-baseline", action="store_true", help="churn: skip the run without churn")


# ------------------------------------------------------------------------------ pure parts


@dataclass(frozen=True)
class Event:
    """One death or join the bench caused (seconds since the train command started)."""

    t: float
    kind: str
    """``kill`` or ``join``."""
    node: int
    node_id: str
    step: int
    """The committed step the train CLI showed then (stale while its progress view is cut off,
    e.g. after the node it asks died)."""
    coordinator: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"t_s": round(self.t, 2), "kind": self.kind, "node": self.node, "node_id": self.node_id,
                "step": self.step, "coordinator": self.coordinator}


def pick_victim(*, number: int, coordinator_kill: int, coordinator: str | None, group: Sequence[str],
                alive: Mapping[str, int], rng: random.Random,
                listeners: Sequence[str] = ()) -> tuple[int, bool] | None:
    """Death ``number`` (1-based): (node index, is the coordinator). The coordinator at
    ``coordinator_kill``, else a live member of ``group`` that is not the coordinator and not
    one of its ``listeners`` (then a listener; then any live node but the coordinator); None if
    there is nobody to kill."""
    if number == coordinator_kill and coordinator is not None and coordinator in alive:
        return alive[coordinator], True
    members = [alive[n] for n in group if n in alive and n != coordinator and n not in listeners]
    if not members:
        members = [alive[n] for n in group if n in alive and n != coordinator]
    if not members:
        members = sorted(i for n, i in alive.items() if n != coordinator)
    if not members:
        return None
    return rng.choice(sorted(members)), False


def event_counts(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many group events of each change the records list."""
    out = {"joined": 0, "active": 0, "gone": 0, "failed": 0}
    for r in records:
        for e in r.get("events") or []:
            out[e["change"]] = out.get(e["change"], 0) + 1
    return out


def data_read(records: Sequence[Mapping[str, Any]]) -> int | None:
    """Micro-batches read: the sum of the final record's shard positions."""
    if not records:
        return None
    return sum(int(c["position"]) for c in records[-1].get("cursors") or [])


def in_segment_loss(records: Sequence[Mapping[str, Any]], clean_s_per_step: float | None) -> float | None:
    """Seconds the records with a group event took beyond ``clean_s_per_step`` per step."""
    if clean_s_per_step is None:
        return None
    extra = 0.0
    for r in records:
        if r.get("events"):
            extra += float(r["wall_s"]) - clean_s_per_step * (int(r["end"]) - int(r["start"]))
    return extra


def median_step_s(records: Sequence[Mapping[str, Any]]) -> float | None:
    """The median seconds per step of the records after the first (which starts the processes)."""
    xs = [s for r in records[1:] if (s := seconds_per_step(r)) is not None]
    return statistics.median(xs) if xs else None


@dataclass
class Run:
    mode: str
    label: str
    """``churn`` or ``baseline``."""
    workers: int
    steps: int = 0
    steps_done: int = 0
    state: str = ""
    val_loss: float | None = None
    wall_s: float = 0.0
    train_s: float = 0.0
    events: list[Event] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    cpu: dict[str, Any] = field(default_factory=dict)
    cgroups: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def finished(self) -> bool:
        return self.state == "done" and self.steps_done == self.steps and not self.error

    def as_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "run": self.label, "workers": self.workers, "steps": self.steps,
                "steps_done": self.steps_done, "state": self.state, "finished": self.finished,
                "val_loss": self.val_loss, "wall_s": self.wall_s, "train_s": self.train_s,
                "deaths": sum(e.kind == "kill" for e in self.events),
                "joins": sum(e.kind == "join" for e in self.events),
                "coordinator_killed": any(e.coordinator for e in self.events),
                "bench_events": [e.as_json() for e in self.events], "group_events": event_counts(self.records),
                "data_read": data_read(self.records), "segments": len(self.records),
                "median_step_s": median_step_s(self.records),
                "gone": [{"step": e["step"], "node": e["node"], "reason": e.get("reason", "")}
                         for r in self.records for e in r.get("events") or [] if e["change"] == "gone"],
                "cpu": self.cpu, "cgroups": self.cgroups, "error": self.error}


def compare(churn: Run, base: Run | None, global_batch: int) -> dict[str, Any]:
    """The churn run against the baseline: loss, time lost per event, data read, the checks."""
    events = len(churn.events)
    deaths = sum(e.kind == "kill" for e in churn.events)
    out: dict[str, Any] = {"mode": churn.mode, "events": events, "deaths": deaths,
                           "data_expected": churn.steps * global_batch, "data_read": data_read(churn.records)}
    checks = [{"mode": churn.mode, "what": "the job under churn finished", "value": churn.finished,
               "goal": "true", "pass": churn.finished},
              {"mode": churn.mode, "what": "the coordinator among the victims",
               "value": any(e.coordinator for e in churn.events), "goal": "true",
               "pass": any(e.coordinator for e in churn.events)}]
    if base is not None and base.val_loss and churn.val_loss is not None:
        rel = churn.val_loss / base.val_loss - 1
        out["val_loss_change"] = rel
        checks.append({"mode": churn.mode, "what": "val loss under churn vs without", "value": round(rel, 4),
                       "goal": f"within {LOSS_GOAL:.0%}", "pass": abs(rel) <= LOSS_GOAL})
    if base is not None and base.finished and churn.finished:
        lost = churn.wall_s - base.wall_s
        inside = in_segment_loss(churn.records, median_step_s(base.records))
        out.update(lost_s=lost, lost_per_event_s=lost / events if events else None,
                   lost_per_death_s=lost / deaths if deaths else None, lost_in_segments_s=inside,
                   lost_outside_segments_s=lost - inside if inside is not None else None)
    out["checks"] = checks
    return out


# ------------------------------------------------------------------------------ running


def _coordinator_row(cluster: EmulatedCluster, job: str | None, order: Sequence[int]) -> dict[str, Any] | None:
    """The job's ``jobs --json`` row from the first of ``order`` that lists it running."""
    for i in order:
        for row in jobs(cluster, i):
            if (job is None or row.get("id") == job) and row.get("state") not in ("done", "failed", "cancelled"):
                return row
    return None


def _jobs_evidence(cluster: EmulatedCluster, run: Run) -> list[dict[str, Any]]:
    """What ``jobs --json`` says on every live node (a stalled job's evidence)."""
    dead = {e.node for e in run.events if e.kind == "kill"}
    return [{"node": i, "rows": jobs(cluster, i)} for i in range(len(cluster.nodes)) if i not in dead]


def _churn(args: argparse.Namespace, cluster: EmulatedCluster, train: TrainRun, run: Run, seg: int) -> None:
    wait_for(lambda: train.step >= seg or not train.running(), args.timeout, what="the first committed segment",
             interval=0.2, detail=train.log)
    rng = random.Random(args.churn_seed)
    alive = {cluster.node_id(i): i for i in range(len(cluster.nodes))}
    coordinator: str | None = None
    t0 = time.monotonic()
    for number in range(1, args.max_events + 1):
        for kind, at in (("kill", (number - 0.5) * args.period), ("join", number * args.period)):
            while train.running() and time.monotonic() - t0 < at and train.stalled_s() <= args.stall:
                time.sleep(0.1)
            if not train.running() or train.stalled_s() > args.stall:
                return
            if kind == "kill":
                order = ([alive[coordinator]] if coordinator in alive else []) + sorted(alive.values())
                row = _coordinator_row(cluster, train.job, list(dict.fromkeys(order)))
                if row is not None:
                    coordinator = row["coordinator"]
                victim = pick_victim(number=number, coordinator_kill=args.coordinator_kill, coordinator=coordinator,
                                     group=row["workers"] if row else [], alive=alive, rng=rng,
                                     listeners=row.get("listeners") or [] if row else [])
                if victim is None or not train.running():
                    continue
                i, is_coordinator = victim
                node_id = next(n for n, j in alive.items() if j == i)
                cluster.kill_machine(i)
                del alive[node_id]
            else:
                i = cluster.start_next(join=min(alive.values()) if alive else None)
                node_id = cluster.node_id(i)
                alive[node_id] = i
                is_coordinator = False
            run.events.append(ev := Event(time.monotonic() - train.began, kind, i, node_id, train.step, is_coordinator))
            print(f"  churn: {ev.t:.1f} s {kind} node {i}{' (coordinator)' if is_coordinator else ''} "
                  f"at step {ev.step}", file=sys.stderr, flush=True)


def run_one(args: argparse.Namespace, work: Path, mode: str, rate: str | None, *, churn: bool) -> Run:
    w = args.churn_workers
    run = Run(mode, "churn" if churn else "baseline", w, steps=args.churn_steps)
    root = work / f"churn-{mode}-{run.label}"
    print(f"  churn {mode} {run.label}: starting {w} nodes ...", file=sys.stderr, flush=True)
    try:
        with EmulatedCluster(root / "mesh", n=w, cap=args.cap, rate=rate, preset=args.preset,
                             spare=args.max_events if churn else 0, client=True) as cluster:
            cluster.wait_converged(timeout=180.0, observers=[0])
            flags = job_flags(args, mode=mode, steps=run.steps, workers=f"{args.churn_min}-{w}",
                              eval_every=run.steps, key=cluster.submitter, out=root / "out")
            print(f"  churn {mode} {run.label}: {' '.join(flags)}", file=sys.stderr, flush=True)
            train = TrainRun(cluster, 0, flags).start()
            try:
                with CgroupWatch(cluster) as cgroups:
                    if churn:
                        _churn(args, cluster, train, run, segment_steps(args, mode))
                    try:
                        code = train.wait(timeout=args.timeout, stall=args.stall)
                    except Stalled as exc:
                        run.error = f"{exc}; jobs --json: {_jobs_evidence(cluster, run)}"
                        raise
                run.wall_s = time.monotonic() - train.began
                run.cpu = cluster.cpu(run.wall_s)
                run.cgroups = cgroups.result()
            finally:
                train.kill()
                (root / "train.log").write_text(train.log())
            summary = train.summary()
            if summary is None or train.job is None:
                run.error = f"train exit {code}, no summary: {train.log()[-1500:]}"
                return run
            run.state, run.steps_done = str(summary.get("state")), int(summary.get("steps") or 0)
            run.val_loss, run.train_s = summary.get("val_loss"), float(summary.get("train_s") or 0.0)
            run.wall_s = float(summary.get("wall_s") or run.wall_s)
            if code != 0:
                run.error = f"train exit {code}: {summary.get('error')}"
            dead = {e.node for e in run.events if e.kind == "kill"}
            live = [i for i in range(len(cluster.nodes)) if i not in dead]
            run.records = job_records(cluster, live[0], train.job)["records"]
    except (RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired, ValueError) as exc:
        run.error = run.error or f"{type(exc).__name__}: {str(exc)[-1500:]}"
    return run


# ------------------------------------------------------------------------------ reporting


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def print_table(runs: Sequence[Run], comparisons: Sequence[dict[str, Any]]) -> None:
    print(f"{'mode':<7}{'run':<9}{'done':>5}{'steps':>11}{'deaths':>7}{'joins':>6}{'coord':>6}{'gone':>5}"
          f"{'joined':>7}{'active':>7}{'failed':>7}{'data read':>15}{'s/step':>7}{'val':>7}{'wall s':>8}{'train s':>8}")
    for r in runs:
        g, j = event_counts(r.records), r.as_json()
        print(f"{r.mode:<7}{r.label:<9}{'yes' if r.finished else 'no':>5}{f'{r.steps_done}/{r.steps}':>11}"
              f"{j['deaths']:>7}{j['joins']:>6}{'yes' if j['coordinator_killed'] else '-':>6}{g['gone']:>5}"
              f"{g['joined']:>7}{g['active']:>7}{g['failed']:>7}{_f(j['data_read'], 'd'):>15}"
              f"{_f(j['median_step_s'], '.3f'):>7}{_f(r.val_loss, '.3f'):>7}{r.wall_s:>8.0f}{r.train_s:>8.0f}")
        if r.error:
            print(f"    ERROR {r.error}")
    for c in comparisons:
        print(f"{c['mode']}: val loss {_f(c.get('val_loss_change'), '+.2%')} vs no churn; {c['events']} events "
              f"({c['deaths']} deaths); time lost {_f(c.get('lost_s'), '.1f')} s = {_f(c.get('lost_per_event_s'), '.1f')} s "
              f"per event, {_f(c.get('lost_per_death_s'), '.1f')} s per death (in segments with a group change "
              f"{_f(c.get('lost_in_segments_s'), '.1f')} s, outside {_f(c.get('lost_outside_segments_s'), '.1f')} s); "
              f"micro-batches read {c['data_read']} of {c['data_expected']}")
    print("coord: the coordinator among the victims; gone/joined/active/failed: the records' group events; "
          "data read: the final shard cursors' sum (micro-batches); s/step: median segment wall_s / steps; wall: "
          "the submitter's clock; time lost: (churn wall - baseline wall) / events")


def run(args: argparse.Namespace) -> int:
    try:
        modes, rate = parse_modes(args.modes), link_rate(args.shape)
        if args.churn_workers < 2 or not 1 <= args.churn_min < args.churn_workers or args.period <= 0:
            raise ValueError("--churn-workers >= 2, 1 <= --churn-min < --churn-workers, --period > 0")
        if args.churn_steps < 1 or args.max_events < 1:
            raise ValueError("--churn-steps and --max-events >= 1")
        job_options(args)
    except ValueError as exc:
        print(f"bench elastic: {exc}", file=sys.stderr)
        return 2
    if skipped(args, "churn", rate):
        return 0
    load_start = os.getloadavg()
    runs: list[Run] = []
    comparisons = []
    with workspace(args) as work:
        for mode in modes:
            pair = []
            for churn in (True, False) if not args.no_baseline else (True,):
                pair.append(r := run_one(args, work, mode, rate, churn=churn))
                runs.append(r)
                if args.json:
                    print(json.dumps({"bench": "elastic", "part": "churn", "run": r.as_json()}), flush=True)
            comparisons.append(compare(pair[0], pair[1] if len(pair) > 1 else None, args.global_batch))
    load_end = os.getloadavg()
    link = (f"{rate} per link both ways (tc tbf; no delay emulated)" if rate else "loopback, no shaping")
    caps = f"{args.cap:g} core per node (one cgroup each)" if args.cap else "no CPU caps"
    print(f"bench elastic churn: charlm {args.model_size}, {args.churn_workers} workers (MIN {args.churn_min}), "
          f"{args.churn_steps} steps, global batch {args.global_batch}, a death every {args.period:g} s and a join "
          f"{args.period / 2:g} s after each, the coordinator at death {args.coordinator_kill}; {caps}, {link}")
    print(f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end, {os.cpu_count()} CPUs")
    print_table(runs, comparisons)
    checks = [c for comp in comparisons for c in comp["checks"]]
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'FAIL'} {c['mode']}: {c['what']}: {c['value']} (goal {c['goal']})")
    failures = [f"{r.mode} {r.label}: {r.error}" for r in runs if r.error]
    if args.json:
        print(json.dumps({"bench": "elastic", "part": "churn", "workers": args.churn_workers, "period_s": args.period,
                          "steps": args.churn_steps, "cap": args.cap, "link": rate or "loopback",
                          "delay_emulated": False, "global_batch": args.global_batch, "modes": modes,
                          "runs": [r.as_json() for r in runs], "comparisons": comparisons, "checks": checks,
                          "failures": failures, "load_avg": {"start": list(load_start), "end": list(load_end)}},
                         sort_keys=True))
    return 1 if failures else 0
