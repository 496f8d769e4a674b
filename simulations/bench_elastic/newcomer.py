"""``bench elastic --part newcomer``: a node joins a running char-GPT job on WAN-shaped links.

For each mode of ``--modes``, an ``EmulatedCluster`` of ``--k`` + 1 machines, each node capped
to ``--cap`` cores (its own cgroup: node, task and training processes) behind a ``--shape``
tbf link (default 100 Mbit/s both ways: the rate of ``bench train --shape wan``; its 50 ms
round trip is NOT emulated, tc here has no netem), and the submitter on a machine of its own.
``python -m node train --workers K-(K+1) --global-batch G`` starts on the first ``k`` nodes;
once ``--join-after`` segments are committed the last node starts and joins the mesh. Per
PROTOCOL.md §15 the coordinator plans it into the next segment as a *listener* (share 0): it
fetches that segment's state blob from the others while they train, replays the round means
and has a share from the segment after. Measured, all from outside the nodes:

state bytes, download seconds
    the newcomer's blob store directory, polled every 10 ms (``follow.BlobWatch``): from the
    moment the fetch's ``partial/<id>/`` folder appears (the store makes it right before the
    first chunk request, so this counts from the first state-chunk request as the bar does) to
    the moment the verified blob is renamed into place; its size is the state's bytes. The blob
    is checked to be the listener segment's ``state`` (the record before it). Bar: at most
    ``1.2 x state bytes / link bytes per second``. (``SeatReport.fetch_s``, the node's own
    figure, counts from the seat's start and reaches only the coordinator: no output carries
    it.)
join -> listener, join -> first contribution
    the ``JOINED`` and ``ACTIVE`` events of the job's records (``records.py``): seconds from
    the coordinator first seeing the newcomer able to planning the segment it listens in, and
    the one it has its first share in (its first round with a share follows that dispatch by
    one step); also on this process's clock, from starting the newcomer's process to the commit
    of its listener segment (the ``train`` progress lines, ~1 s resolution). Checked: ``ACTIVE``
    in the segment right after the listener segment (the first boundary after its download),
    no ``FAILED`` for it (its state digest agreed with the others').
the others' step time, before vs during the join
    seconds per step of each committed segment (``SegmentRecord.wall_s`` / steps: the
    coordinator's clock from dispatch to the last report), the mean of the segments before the
    listener segment (the first excluded: it starts the training processes) against the
    listener segment. A listener reports last (it loads the state and replays after the
    others' last round), so its lag is inside the "during" figure: it errs against the bar.
    Also commit to commit on this process's clock. Goal: during <= 1.1 x before.

Prints a table and, with ``--json``, a JSON line per run and a final JSON line. Skips (exit 0)
without root unless ``--cap 0 --shape loopback``. Exit 1 when a job failed or the newcomer never
became active (the bars are reported, not enforced).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulations.bench_elastic.cluster import CgroupWatch, EmulatedCluster
from simulations.bench_elastic.common import link_rate, parse_modes, skipped, workspace
from simulations.bench_elastic.follow import BlobWatch, Fetch, TrainRun, job_records
from simulations.bench_train import MODEL_SIZES
from simulations.netshape import rate_bytes_per_s
from simulations.nodeprocs import wait_for

DOWNLOAD_FACTOR = 1.2
"""The bar: the state arrives within 1.2 x state bytes / bandwidth."""
STEP_GOAL = 0.10
"""The bar: the others' step time during the join within 10 % of before."""
WAN_RTT_S = 0.050
"""The round trip of a real WAN link (``bench train --shape wan``): not emulated here."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=int, default=2, help="newcomer: workers the job starts on (2)")
    parser.add_argument("--newcomer-steps", type=int, default=0,
                        help="newcomer: optimizer steps of the job (0: --join-after + 6 segments)")
    parser.add_argument("--join-after", type=int, default=2,
                        help="newcomer: committed segments before the newcomer starts (2)")


# ------------------------------------------------------------------------------ pure parts


def job_options(args: argparse.Namespace) -> dict[str, str]:
    """charlm's options: the ``--model-size`` preset, then every ``--job-arg``."""
    options = dict(MODEL_SIZES[args.model_size])
    for item in args.job_arg:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"--job-arg {item!r}: expected KEY=VALUE")
        options[k] = v
    return options


def job_flags(args: argparse.Namespace, *, mode: str, steps: int, workers: str, eval_every: int,
              key: Path, out: Path, progress: bool = True) -> list[str]:
    """``python -m node train`` flags of a part's job (``--workers MIN-MAX``, one checkpoint)."""
    flags = ["train", "--model", "charlm", "--steps", str(steps), "--workers", workers, "--mode", mode,
             "--inner-steps", str(args.inner_steps), "--codec", args.codec, "--segment-steps",
             str(args.segment_steps), "--threads", "1", "--eval-every", str(eval_every),
             "--checkpoint-every", str(steps), "--segment-timeout", str(args.timeout), "--key", str(key),
             "--global-batch", str(args.global_batch), "--out", str(out), "--json", "--timeout", "60"]
    if not progress:
        flags.append("--no-progress")
    for k, v in sorted(job_options(args).items()):
        flags += ["--job-arg", f"{k}={v}"]
    return flags


def segment_steps(args: argparse.Namespace, mode: str) -> int:
    """Steps of one segment: ``--segment-steps`` (sync) or ``--inner-steps`` (DiLoCo)."""
    return int(args.segment_steps if mode == "sync" else args.inner_steps)


def events_of(records: Sequence[Mapping[str, Any]], node: str) -> list[dict[str, Any]]:
    """``node``'s group events over the records, each with the record's ``segment``."""
    return [{**e, "segment": r["segment"]} for r in records for e in r.get("events") or [] if e["node"] == node]


def seconds_per_step(record: Mapping[str, Any]) -> float | None:
    steps = int(record["end"]) - int(record["start"])
    return float(record["wall_s"]) / steps if steps > 0 and record.get("wall_s") else None


def segment_rows(records: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """[segment, start, end, seconds per step, shares] of each record."""
    return [[r["segment"], r["start"], r["end"], seconds_per_step(r), list(r.get("shares") or [])] for r in records]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


@dataclass
class Join:
    """What the records say of one newcomer (``join_figures``)."""

    listened: int | None = None
    """Index (in step order) of the record it listened in (``JOINED``), if any."""
    active: int | None = None
    """Index of the record it had its first share in (``ACTIVE``)."""
    joined_s: float | None = None
    active_s: float | None = None
    failed: list[str] = field(default_factory=list)
    state: str | None = None
    """The state blob its listener segment started from (the record before it)."""
    before_s: float | None = None
    """Mean seconds per step of the records before ``listened`` (the first excluded)."""
    during_s: float | None = None
    before_segments: list[int] = field(default_factory=list)

    @property
    def change(self) -> float | None:
        return self.during_s / self.before_s - 1 if self.during_s is not None and self.before_s else None

    @property
    def next_boundary(self) -> bool:
        """Active in the segment right after the one it listened in."""
        return self.listened is not None and self.active == self.listened + 1


def join_figures(records: Sequence[Mapping[str, Any]], node: str) -> Join:
    """The newcomer ``node``'s figures from the job's records (step order; module docstring)."""
    out = Join()
    for i, r in enumerate(records):
        for e in r.get("events") or []:
            if e["node"] != node:
                continue
            if e["change"] == "joined" and out.listened is None:
                out.listened, out.joined_s = i, float(e["seconds"])
            elif e["change"] == "active" and out.active is None:
                out.active, out.active_s = i, float(e["seconds"])
            elif e["change"] in ("failed", "gone"):
                out.failed.append(f"{e['change']} at step {e['step']}: {e.get('reason', '')}")
    if out.listened is None:
        return out
    if out.listened > 0:
        out.state = records[out.listened - 1]["state"]
    before = [(i, s) for i, r in enumerate(records[:out.listened]) if i > 0 and (s := seconds_per_step(r))]
    out.before_segments = [int(records[i]["segment"]) for i, _ in before]
    out.before_s = _mean([s for _, s in before])
    out.during_s = seconds_per_step(records[out.listened])
    return out


def download_bound(state_bytes: int, bytes_per_s: float | None, factor: float = DOWNLOAD_FACTOR) -> float | None:
    """``factor x state_bytes / bytes_per_s`` (None without a shaped link)."""
    return factor * state_bytes / bytes_per_s if bytes_per_s else None


def commit_rate(commits: Sequence[tuple[float, int]], start: int, end: int) -> float | None:
    """Seconds per step between the commits of step ``start`` and ``end`` on the bench clock."""
    t0 = next((t for t, s in commits if s >= start), None)
    t1 = next((t for t, s in commits if s >= end), None)
    return (t1 - t0) / (end - start) if t0 is not None and t1 is not None and end > start else None


# ------------------------------------------------------------------------------ one run


@dataclass
class Run:
    mode: str
    k: int
    steps: int = 0
    state_bytes: int | None = None
    bytes_per_s: float | None = None
    download_s: float | None = None
    first_chunk_s: float | None = None
    blob_matches: bool | None = None
    join: Join = field(default_factory=Join)
    started_at: float | None = None
    """Bench seconds (from submission) when the newcomer's process started."""
    listen_commit_at: float | None = None
    """... when its listener segment was seen committed."""
    download_done_at: float | None = None
    commit_before_s: float | None = None
    commit_during_s: float | None = None
    val_loss: float | None = None
    wall_s: float = 0.0
    cpu: dict[str, Any] = field(default_factory=dict)
    cgroups: dict[str, Any] = field(default_factory=dict)
    fetches: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    segments: list[list[Any]] = field(default_factory=list)
    """Per record: [segment, start, end, seconds per step, shares]."""
    error: str = ""

    @property
    def bound_s(self) -> float | None:
        return download_bound(self.state_bytes or 0, self.bytes_per_s) if self.state_bytes else None

    @property
    def start_to_active_s(self) -> float | None:
        """Bench clock: the newcomer's process started -> its listener segment committed (the
        next one, its first with a share, is dispatched right after)."""
        if self.listen_commit_at is None or self.started_at is None:
            return None
        return self.listen_commit_at - self.started_at

    def checks(self) -> list[dict[str, Any]]:
        out = []
        if self.bound_s is not None and self.download_s is not None:
            out.append({"mode": self.mode, "what": "state download vs 1.2 x state bytes / bandwidth",
                        "value": round(self.download_s, 3), "goal": f"<= {self.bound_s:.3f} s",
                        "pass": self.download_s <= self.bound_s})
        if self.join.listened is not None:
            out.append({"mode": self.mode, "what": "active at the first boundary after listening",
                        "value": self.join.next_boundary, "goal": "true", "pass": self.join.next_boundary})
        if (change := self.join.change) is not None:
            out.append({"mode": self.mode, "what": "others' step time during the join vs before",
                        "value": round(change, 4), "goal": f"<= +{STEP_GOAL:.0%}", "pass": change <= STEP_GOAL})
        return out

    def as_json(self) -> dict[str, Any]:
        j = self.join
        return {"mode": self.mode, "k": self.k, "steps": self.steps, "state_bytes": self.state_bytes,
                "link_bytes_per_s": self.bytes_per_s, "bound_s": self.bound_s, "download_s": self.download_s,
                "first_chunk_s": self.first_chunk_s, "blob_is_listener_state": self.blob_matches,
                "joined_s": j.joined_s, "active_s": j.active_s, "listened_segment": j.listened,
                "active_segment": j.active, "next_boundary": j.next_boundary if j.listened is not None else None,
                "newcomer_failed": j.failed, "step_s_before": j.before_s, "step_s_during": j.during_s,
                "step_change": j.change, "before_segments": j.before_segments,
                "commit_step_s_before": self.commit_before_s, "commit_step_s_during": self.commit_during_s,
                "newcomer_started_s": self.started_at, "download_done_s": self.download_done_at,
                "listener_commit_s": self.listen_commit_at, "start_to_active_s": self.start_to_active_s,
                "val_loss": self.val_loss, "wall_s": self.wall_s,
                "cpu": self.cpu, "cgroups": self.cgroups, "fetches": self.fetches, "events": self.events,
                "segments": self.segments,
                "checks": self.checks(), "error": self.error}


def _fetch_json(f: Fetch) -> dict[str, Any]:
    return {"blob": f.blob, "began_s": f.began, "first_chunk_s": f.first_chunk, "done_s": f.done,
            "seconds": f.seconds, "bytes": f.size}


def run_one(args: argparse.Namespace, work: Path, mode: str, rate: str | None) -> Run:
    run = Run(mode, args.k, bytes_per_s=rate_bytes_per_s(rate) if rate else None)
    seg = segment_steps(args, mode)
    run.steps = args.newcomer_steps or seg * (args.join_after + 6)
    root = work / f"newcomer-{mode}-k{args.k}"
    print(f"  newcomer {mode} k={args.k}: starting {args.k} node(s) ...", file=sys.stderr, flush=True)
    try:
        with EmulatedCluster(root / "mesh", n=args.k, cap=args.cap, rate=rate, preset=args.preset,
                             spare=1, client=True) as cluster:
            cluster.wait_converged(timeout=180.0, observers=[0])
            flags = job_flags(args, mode=mode, steps=run.steps, workers=f"{args.k}-{args.k + 1}",
                              eval_every=run.steps, key=cluster.submitter, out=root / "out")
            print(f"  newcomer {mode}: {' '.join(flags)}", file=sys.stderr, flush=True)
            train = TrainRun(cluster, 0, flags).start()
            try:
                with CgroupWatch(cluster) as cgroups:
                    blobs = _run_join(args, cluster, train, run, seg)
                    code = train.wait(timeout=args.timeout, stall=args.stall)
                run.wall_s = time.monotonic() - train.began
                run.cpu = cluster.cpu(run.wall_s)
                run.cgroups = cgroups.result()
            finally:
                train.kill()
                (root / "train.log").write_text(train.log())
            summary = train.summary()
            if code != 0 or summary is None or train.job is None:
                run.error = f"train exit {code}: {train.log()[-1500:]}"
                return run
            run.val_loss = summary.get("val_loss")
            history = job_records(cluster, 0, train.job)
            newcomer = cluster.node_id(args.k)
            records = history["records"]
            run.events = [{**e, "segment": r["segment"]} for r in records for e in r.get("events") or []]
            run.segments = segment_rows(records)
            run.join = join_figures(records, newcomer)
            _figures(run, train, blobs, records)
            if run.join.active is None:
                run.error = "the newcomer never became active"
    except (RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired, ValueError) as exc:
        run.error = f"{type(exc).__name__}: {str(exc)[-1500:]}"
    return run


def _run_join(args: argparse.Namespace, cluster: EmulatedCluster, train: TrainRun, run: Run,
              seg: int) -> BlobWatch | None:
    """Wait for ``--join-after`` committed segments, start the newcomer and watch its blob store
    until the job ends."""
    wait_for(lambda: train.step >= args.join_after * seg or not train.running(), args.timeout,
             what=f"{args.join_after} committed segments", interval=0.2, detail=train.log)
    if not train.running():
        return None
    i = cluster.start_next()
    run.started_at = time.monotonic() - train.began
    print(f"  newcomer: node {i} started at {run.started_at:.1f} s (step {train.step})", file=sys.stderr, flush=True)
    with BlobWatch(cluster.root / f"n{i}" / "data" / "blobs", origin=train.began) as watch:
        while train.running() and train.stalled_s() <= args.stall:
            time.sleep(0.2)
    run.fetches = [_fetch_json(f) for f in watch.fetches.values() if f.began is not None]  # not its own puts
    return watch


def _figures(run: Run, train: TrainRun, watch: BlobWatch | None, records: Sequence[Mapping[str, Any]]) -> None:
    """The download and the bench-clock figures, once the records said which blob and segment."""
    j = run.join
    fetched = {k: f for k, f in (watch.fetches.items() if watch is not None else ()) if f.began is not None}
    if fetched:
        f = fetched.get(j.state) if j.state else None
        run.blob_matches = f is not None
        if f is None:  # not the blob expected: report the first one fetched, flagged
            f = min(fetched.values(), key=lambda x: x.began or 0.0)
        run.state_bytes, run.download_s = f.size or None, f.seconds
        run.first_chunk_s = f.first_chunk - f.began if f.first_chunk is not None and f.began is not None else None
        run.download_done_at = f.done
    if j.listened is not None and j.listened > 1:
        listened = records[j.listened]
        run.listen_commit_at = train.committed_at(int(listened["end"]))
        run.commit_before_s = commit_rate(train.commits, int(records[1]["start"]), int(listened["start"]))
        run.commit_during_s = commit_rate(train.commits, int(listened["start"]), int(listened["end"]))


# ------------------------------------------------------------------------------ reporting


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def print_table(runs: Sequence[Run]) -> None:
    print(f"{'mode':<7}{'k':>2}{'state MB':>9}{'bound s':>8}{'fetch s':>8}{'joined s':>9}{'active s':>9}"
          f"{'next bnd':>9}{'step s before':>14}{'during':>8}{'change':>8}{'commit before':>14}{'during':>8}"
          f"{'val':>7}{'wall s':>7}")
    for r in runs:
        j = r.join
        print(f"{r.mode:<7}{r.k:>2}{_f(r.state_bytes / 1e6 if r.state_bytes else None, '.2f'):>9}"
              f"{_f(r.bound_s, '.2f'):>8}{_f(r.download_s, '.2f'):>8}{_f(j.joined_s, '.1f'):>9}"
              f"{_f(j.active_s, '.1f'):>9}{('yes' if j.next_boundary else 'no') if j.listened is not None else '-':>9}"
              f"{_f(j.before_s, '.3f'):>14}{_f(j.during_s, '.3f'):>8}{_f(j.change, '+.1%'):>8}"
              f"{_f(r.commit_before_s, '.3f'):>14}{_f(r.commit_during_s, '.3f'):>8}"
              f"{_f(r.val_loss, '.3f'):>7}{r.wall_s:>7.0f}")
        if r.started_at is not None:
            print(f"    bench clock: newcomer started {r.started_at:.1f} s, state in place "
                  f"{_f(r.download_done_at, '.1f')} s, its listener segment committed {_f(r.listen_commit_at, '.1f')} s "
                  f"(start -> active {_f(r.start_to_active_s, '.1f')} s); first chunk {_f(r.first_chunk_s, '.2f')} s "
                  f"after the fetch began")
        if r.error:
            print(f"    ERROR {r.error}")
        if j.failed:
            print(f"    newcomer events: {j.failed}")
        if r.blob_matches is False:
            print("    the blob the newcomer fetched is not its listener segment's state (or none was seen)")
        strays = r.cgroups.get("strays")
        if strays:
            print(f"    processes outside their node's cgroup: {strays[:3]}")
    print("fetch s: the newcomer's store, first chunk request (partial/<id>/ made) to the verified blob in "
          "place; bound: 1.2 x state bytes / link rate; joined/active s: the JOINED/ACTIVE events' seconds "
          "(coordinator: first seen able -> the listener segment / the first segment with a share planned); "
          "next bnd: active right after its listener segment; step s: segment wall_s / steps, before (segments "
          "1.. before the listener one) vs during (the listener segment; its report lag included); commit: "
          "the same from the train CLI's progress lines (bench clock, ~1 s resolution)")


def run(args: argparse.Namespace) -> int:
    try:
        modes, rate = parse_modes(args.modes), link_rate(args.shape)
        if args.k < 1 or args.join_after < 1:
            raise ValueError("--k and --join-after >= 1")
        if args.global_batch <= args.k:  # the group never outgrows the global batch (node.training.elastic)
            raise ValueError(f"--global-batch {args.global_batch}: the newcomer needs a micro-batch of its own, "
                             f"so at least --k + 1 = {args.k + 1}")
        job_options(args)
    except ValueError as exc:
        print(f"bench elastic: {exc}", file=sys.stderr)
        return 2
    if skipped(args, "newcomer", rate):
        return 0
    load_start = os.getloadavg()
    runs: list[Run] = []
    with workspace(args) as work:
        for mode in modes:
            runs.append(r := run_one(args, work, mode, rate))
            if args.json:
                print(json.dumps({"bench": "elastic", "part": "newcomer", "run": r.as_json()}), flush=True)
    load_end = os.getloadavg()
    link = (f"{rate} per link both ways (tc tbf); the 50 ms round trip of a WAN (bench train --shape wan) is "
            f"NOT emulated (no netem)" if rate else "loopback, no shaping")
    caps = f"{args.cap:g} core per node (one cgroup each)" if args.cap else "no CPU caps"
    print(f"bench elastic newcomer: charlm {args.model_size}, {args.k} workers + 1 newcomer after "
          f"{args.join_after} segments, global batch {args.global_batch} micro-batches, {caps}, {link}")
    print(f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end, {os.cpu_count()} CPUs")
    print_table(runs)
    checks = [c for r in runs for c in r.checks()]
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'FAIL'} {c['mode']}: {c['what']}: {c['value']} (goal {c['goal']})")
    failures = [f"{r.mode}: {r.error}" for r in runs if r.error]
    if args.json:
        print(json.dumps({"bench": "elastic", "part": "newcomer", "k": args.k, "cap": args.cap,
                          "link": {"rate": rate or "loopback", "bytes_per_s": rate_bytes_per_s(rate) if rate else None,
                                   "rtt_s": WAN_RTT_S if rate else None, "delay_emulated": False},
                          "global_batch": args.global_batch, "modes": modes, "runs": [r.as_json() for r in runs],
                          "checks": checks, "failures": failures,
                          "load_avg": {"start": list(load_start), "end": list(load_end)}}, sort_keys=True))
    return 1 if failures else 0
