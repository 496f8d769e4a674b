"""The "train" kind of task: one model trained data-parallel by a group of workers.

Theory of operation
-------------------
A training job is a task (``node.tasks.coordinator.TaskRecord`` does the ballots, the
replicated log, leases and takeover); this module is what its work is. The job's steps are cut
into *segments* of ``JobSpec.seg`` consecutive steps (DiLoCo: one outer step of H inner steps).
A segment is trained by one *group*: the coordinator commits the group when it dispatches the
segment (every ``Seat`` carries it, in rank order), and every round of the segment all-reduces
over exactly that group with a key derived from (job, epoch, plan, step). A worker that dies
mid-segment is dropped from the rounds in flight by the all-reduce itself (the survivors get
the exact mean of who remained); the group changes only at segment boundaries.

Per segment the coordinator

1. *plans* (``plan``): once at least ``workers_min`` able members are live, it admits them by
   ``node.training.elastic.admit``: the previous segment's finishers that are still live (the
   *incumbents*, who hold the state in memory) keep their ranks; other able members, in
   rendezvous order of (job, node), enter as *listeners* (no share of the batch: they fetch the
   state while the segment runs and replay its rounds) while the incumbents alone are at least
   ``workers_min``, else with a share; at most ``min(workers_max, shards, batch)`` in all. The
   active ranks split the global batch (``elastic.shares``) and the ``shards`` virtual data
   shards (shard k to active rank k mod W), each continuing from its committed cursor;
2. hands each member its seat (``take``), which starts from the *state blob* committed at the
   end of the previous segment (model + optimizer as safetensors, identical on every worker);
3. *closes* the segment when every seat has reported or been lost: the reports that agree on
   the end state make a ``SegmentRecord`` (the share-weighted mean loss per step, every shard's
   next position, the state blob, the group that finished, the shares, the group's changes)
   which is the job's log entry. A rank that did not report moved its shards by exactly the
   micro-batches of the rounds it contributed to (the survivors' ``rounds_of``), so nothing
   that went into a committed update is read again. Only a committed record moves the job:
   ``apply`` advances the step, the cursors and the state. A successor coordinator replans
   the segment in flight from the last committed record.

Group changes (``GroupEvent``, in the record of the segment they happen in): ``JOINED`` for a
listener, ``ACTIVE`` for a member's first share after the job's first segment (``seconds``:
since this coordinator first saw it able: join -> first contribution), ``GONE`` for a rank lost
mid-segment or an incumbent not live at the boundary, ``FAILED`` for a failed or disagreeing seat.

A segment with no usable report (every seat failed or was lost) is tried again, from the same
committed state, after a backoff; after ``Submission.retries`` such failures in a row the job
fails for good with the last failure. Data accounting: a shard's cursor only advances with a
committed record, so a segment that is replayed re-reads the same batches, never new ones, and
no batch is skipped.

Soft state (not replicated): the plan in flight, the workers' latest ``SeatProgress`` (from
heartbeats), for the live view of ``jobs`` and ``train``, and when each newcomer was first seen
able (a successor counts from its takeover).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from node.placement import rank
from node.training import elastic
from protocol.errors import RemoteProtocolError
from protocol.messages.tasks import (
    Failure,
    Outcome,
    Submission,
    SubtaskReport,
    SubtaskState,
    WorkItem,
    decode_struct,
    encode_struct,
)
from protocol.messages.training import (
    MAX_EVENTS,
    MAX_GROUP,
    PROGRESS_EVENTS,
    SUMMARY_WORKERS,
    GroupChange,
    GroupEvent,
    JobProgress,
    JobSpec,
    Seat,
    SeatProgress,
    SeatReport,
    SegmentRecord,
    ShardCursor,
)

#: A log entry's first byte (after the coordinator's own kind byte).
SEGMENT_ENTRY = 0x01
FAILED_ENTRY = 0x02
#: First retry delay of a failed segment; doubles per failure.
BASE_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
#: Group changes kept for ``progress()`` (the records hold them all).
KEEP_EVENTS = 64
#: A seat's index is (plan number mod 2**23, rank); a plan number is (epoch mod 2**EPOCH_BITS,
#: plans of that epoch), so a successor's seats never take a deposed plan's late reports.
EPOCH_BITS, PLAN_BITS = 11, 12
#: Most workers remembered in ``workers_seen``.
MAX_SEEN = 4 * MAX_GROUP


def decode_spec(inputs: Sequence[bytes]) -> JobSpec:
    """The job's spec from its task inputs (``RemoteProtocolError`` unless exactly one valid)."""
    if len(inputs) != 1:
        raise RemoteProtocolError(f"a train task has one input (its JobSpec), got {len(inputs)}")
    return decode_struct(JobSpec, inputs[0], what="JobSpec")


@dataclass(slots=True)
class _Plan:
    """The segment in flight (coordinator only)."""

    number: int
    """Plans made by this coordinator (part of the round keys: a retry never meets a stale try)."""
    segment: int
    start: int
    end: int
    group: tuple[bytes, ...]
    seats: dict[int, Seat]
    started: float
    shares: tuple[int, ...] = ()
    events: list[GroupEvent] = field(default_factory=list)
    handed: set[int] = field(default_factory=set)
    reports: dict[int, SeatReport] = field(default_factory=dict)
    failed: dict[int, Failure] = field(default_factory=dict)
    lost: dict[int, str] = field(default_factory=dict)

    def resolved(self) -> bool:
        return len(self.reports) + len(self.failed) + len(self.lost) >= len(self.group)


@dataclass(slots=True)
class TrainKind:
    """A training job's state (module docstring)."""

    submission: Submission
    inputs: Sequence[bytes]
    spec: JobSpec = field(init=False)
    records: list[SegmentRecord] = field(default_factory=list)
    step: int = 0
    state: bytes | None = None
    cursors: dict[int, int] = field(default_factory=dict)
    checkpoint: bytes | None = None
    checkpoint_step: int = 0
    seen: dict[bytes, None] = field(default_factory=dict)
    failure: Failure | None = None
    done: int = 0
    failed: int = 0
    running: int = 0
    retried: int = 0
    retried_recorded: int = 0
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    stale_outcomes: bool = False  # a seat belongs to the plan that handed it out
    _epoch: int = -1  # the ballot epoch of the last plan
    epoch: int = 0
    _plan: _Plan | None = None
    _plans: int = 0
    _held: bool = False  # a record of the plan is being replicated
    _failures: int = 0  # segment tries failed in a row
    _retry_at: float = 0.0
    _closed: list[bytes] = field(default_factory=list)  # entries made by a loss, not yet taken
    _progress: dict[bytes, SeatProgress] = field(default_factory=dict)
    _first_seen: dict[bytes, float] = field(default_factory=dict)  # newcomer -> when first able
    _events: list[GroupEvent] = field(default_factory=list)  # the newest committed changes
    waiting: str = ""

    def __post_init__(self) -> None:
        self.spec = decode_spec(self.inputs)
        self.step = self.spec.resume_step
        self.state = self.spec.resume_state
        self.cursors = {c.shard: c.position for c in self.spec.resume_cursors if c.shard < self.spec.shards}

    # ---- what the coordinator asks ---------------------------------------------------

    @property
    def total(self) -> int:
        """Segments of the whole job."""
        return max(1, math.ceil((self.spec.steps - self.spec.resume_step) / self.spec.seg))

    def finished(self) -> bool:
        return self.failed > 0 or self.step >= self.spec.steps

    def batch_size(self, worker_slots: int) -> int:
        return 1

    def next_ready(self) -> float | None:
        if self.finished() or self._held:
            return None
        if self._plan is None:
            return self._retry_at
        return 0.0 if len(self._plan.handed) < len(self._plan.group) else None

    def plan(self, able: Sequence[bytes], *, task_id: bytes, epoch: int, now: float) -> str:
        """Plan the next segment if none is in flight; the reason it waits ("" when not)."""
        self.epoch = epoch
        live = set(able)
        p = self._plan
        if p is not None:  # a member that left before its seat was handed out is lost too
            self._note_able(live.difference(p.group), now)  # a newcomer's clock starts when first able
            gone = [r for r in range(len(p.group)) if r not in p.handed and p.group[r] not in live]
            if gone:
                p.handed.update(gone)
                p.lost.update((r, "left the mesh before its seat was handed out") for r in gone)
                self._closed.extend(self._maybe_close(now))
            return ""
        if self._held or self.finished() or now < self._retry_at:
            return ""
        s = self.spec
        last = self.records[-1] if self.records else None
        previous = last.finished if last else ()
        listened = {n for n, share in zip(last.group, last.shares, strict=False) if share == 0} if last else set()
        incumbents = [n for n in previous if n in live]
        others = rank(task_id, [n for n in able if n not in set(incumbents)])
        self._note_able(others, now)
        cap = min(s.workers_max, s.shards, s.batch or MAX_GROUP)
        if self.records and min(s.steps, self.step + s.seg) >= s.steps:
            # the last segment: a listener would have no segment left to train in; only the
            # newcomers the segment cannot run without enter
            others = others[:max(0, s.workers_min - len(incumbents))]
        admission = elastic.admit(incumbents, others, workers_min=s.workers_min, cap=cap, batch=s.batch,
                                  listen=bool(self.records))
        if admission is None:
            self.waiting = (f"waiting for {s.workers_min} workers with {self.submission.resources.gpus} "
                            f"gpus ({min(len(able), cap)} live)")
            return self.waiting
        self.waiting = ""
        group, shares = admission.group, admission.shares
        active = len(admission.active)
        segment = len(self.records)
        start = self.step
        end = min(s.steps, start + s.seg)
        holders = tuple(previous[:MAX_GROUP])
        final = end >= s.steps
        checkpoint = final or (end // s.checkpoint_every > start // s.checkpoint_every)
        evaluate = final or (end // s.eval_every > start // s.eval_every)
        if epoch != self._epoch:  # plan numbers (and seat indices) do not repeat across epochs
            self._epoch = epoch
            self._plans = max(self._plans, (epoch % (1 << EPOCH_BITS)) << PLAN_BITS)
        self._plans += 1
        dealt = elastic.deal(s.shards, active)
        seats = {}
        for r in range(len(group)):
            mine = dealt[r] if r < active else []
            cursors = tuple(ShardCursor(shard=k, position=self.cursors.get(k, 0)) for k in mine)
            seats[r] = Seat(job=task_id, epoch=epoch, segment=segment, plan=self._plans, start=start,
                            end=end, group=group, rank=r, state=self.state, holders=holders,
                            cursors=cursors, evaluate=evaluate and r == 0, checkpoint=checkpoint,
                            final=final, job_spec=s, shares=shares)
        events = [GroupEvent(change=GroupChange.JOINED, node=n, step=start,
                             seconds=max(0.0, now - self._first_seen.get(n, now)))
                  for n in admission.listeners]
        # join -> first contribution; for last segment's listeners at least their JOINED seconds
        # plus that segment's wall time, which the records keep (a successor saw them just now)
        joined = {e.node: e.seconds + last.wall_s for e in last.events if e.change is GroupChange.JOINED} if last else {}
        events += [GroupEvent(change=GroupChange.ACTIVE, node=n, step=start,
                              seconds=max(0.0, now - self._first_seen.pop(n, now), joined.get(n, 0.0)))
                   for n in admission.active if self.records and (n not in set(previous) or n in listened)]
        events += [GroupEvent(change=GroupChange.GONE, node=n, step=start, reason="not live at the segment boundary")
                   for n in previous if n not in live]
        for n in admission.active:  # a member that trains is no newcomer (a returning one starts anew)
            self._first_seen.pop(n, None)
        for n in admission.listeners:
            self._first_seen.setdefault(n, now)
        self._plan = _Plan(self._plans, segment, start, end, group, seats, now, shares=shares,
                           events=events)
        self._progress.clear()
        return ""

    def take(self, n: int, *, worker: bytes, now: float, others: bool = False) -> list[WorkItem]:
        p = self._plan
        if p is None or worker not in p.group:
            return []
        r = p.group.index(worker)
        if r in p.handed:
            return []
        p.handed.add(r)
        self.running += 1
        return [WorkItem(index=self._index(p, r), input=encode_struct(p.seats[r]))]

    @staticmethod
    def _index(p: _Plan, r: int) -> int:
        return (p.number % (1 << 23)) * MAX_GROUP + r

    def _seat_of(self, index: int, worker: bytes) -> int | None:
        """The rank of the current plan's seat ``index`` if ``worker`` holds it, unresolved."""
        p = self._plan
        if p is None or index // MAX_GROUP != p.number % (1 << 23):
            return None
        r = index % MAX_GROUP
        if r >= len(p.group) or p.group[r] != worker or r not in p.handed:
            return None
        if r in p.reports or r in p.failed or r in p.lost:
            return None
        return r

    def on_outcomes(self, outcomes: Iterable[Outcome], *, worker: bytes, now: float) -> list[bytes]:
        p = self._plan
        for outcome in outcomes:
            r = self._seat_of(outcome.index, worker)
            if p is None or r is None:
                continue
            self.running -= 1
            if outcome.ok:
                try:
                    report = decode_struct(SeatReport, outcome.value, what="SeatReport")
                except RemoteProtocolError as exc:
                    p.failed[r] = Failure(type="BadReport", message=str(exc)[:4096])
                    continue
                if report.end != p.end or len(report.losses) != p.end - p.start:
                    p.failed[r] = Failure(type="BadReport", message=(
                        f"report covers steps to {report.end} with {len(report.losses)} losses, "
                        f"the seat was {p.start}..{p.end}"))
                    continue
                p.reports[r] = report
            else:
                p.failed[r] = outcome.failure or Failure(type="Error", message="seat failed")
        return self._maybe_close(now)

    def on_lost(self, indices: Iterable[int], *, worker: bytes, reason: str, now: float) -> None:
        p = self._plan
        for index in indices:
            r = self._seat_of(index, worker)
            if p is None or r is None:
                continue
            self.running -= 1
            p.lost[r] = reason
        self._closed.extend(self._maybe_close(now))

    def take_lost_entries(self) -> list[bytes]:
        entries, self._closed = self._closed, []
        return entries

    def _maybe_close(self, now: float) -> list[bytes]:
        """The segment's log entry once every seat is resolved (module docstring, step 3)."""
        p = self._plan
        if p is None or not p.resolved():
            return []
        share = self._share_of(p)
        by_state: dict[bytes, list[int]] = {}
        for r, report in p.reports.items():
            by_state.setdefault(report.state, []).append(r)
        if not any(share(r) > 0 for r in p.reports):  # listeners alone cannot vouch for a segment
            self._plan = None
            self._failures += 1
            self.retried += 1
            last = next(iter(p.failed.values()), None) or Failure(
                type="WorkerLost", message="every worker of the segment was lost")
            if self._failures > self.submission.retries:
                self._held = True
                return [bytes([FAILED_ENTRY]) + encode_struct(last)]
            self._retry_at = now + min(MAX_BACKOFF_S, BASE_BACKOFF_S * 2 ** (self._failures - 1))
            self.failure = last
            return []
        # The reports that agree with the most active ranks, then the most others (with rank 0
        # first among equals): a listener's replay confirms the state, it cannot outvote it.
        ranks = max(by_state.values(), key=lambda rs: (sum(share(r) > 0 for r in rs), len(rs), -min(rs)))
        reports = [p.reports[r] for r in sorted(ranks)]
        trained = [(p.reports[r], share(r)) for r in sorted(ranks) if share(r) > 0]
        weight = sum(w for _, w in trained)
        steps = p.end - p.start
        losses = tuple(sum(rep.losses[i] * w for rep, w in trained) / weight for i in range(steps))
        cursors = dict(self.cursors)
        for rep in reports:
            cursors.update((c.shard, c.position) for c in rep.cursors)
        for r in range(len(p.group)):  # a rank that did not report moved by what it contributed
            if r not in ranks and share(r) > 0:
                cursors.update(self._contributed_reads(p, r, reports))
        val = next((rep.val_loss for rep in reports if rep.val_loss is not None), None)
        export = next((rep.export for rep in reports if rep.export is not None), None)
        seat0 = p.seats[0]
        events = list(p.events)
        events += [GroupEvent(change=GroupChange.GONE, node=p.group[r], step=p.start, reason=why[:200])
                   for r, why in sorted(p.lost.items())]
        events += [GroupEvent(change=GroupChange.FAILED, node=p.group[r], step=p.start,
                              reason=f"{f.type}: {(f.message.splitlines() or [''])[0]}"[:200])
                   for r, f in sorted(p.failed.items())]
        events += [GroupEvent(change=GroupChange.FAILED, node=p.group[r], step=p.start,
                              reason="its state disagreed with the group's")
                   for r in sorted(p.reports) if r not in ranks]
        record = SegmentRecord(
            segment=p.segment, start=p.start, end=p.end, group=p.group,
            finished=tuple(p.group[r] for r in sorted(ranks)), losses=losses,
            cursors=tuple(ShardCursor(shard=k, position=v) for k, v in sorted(cursors.items())),
            state=reports[0].state, val_loss=val, tokens=sum(rep.tokens for rep in reports),
            bytes_sent=sum(rep.bytes_sent for rep in reports), wall_s=max(0.0, now - p.started),
            compute_s=sum(rep.compute_s for rep, _ in trained) / len(trained),
            comm_s=sum(rep.comm_s for rep, _ in trained) / len(trained),
            checkpoint=seat0.checkpoint, export=export, shares=p.shares,
            events=tuple(events[:MAX_EVENTS]))
        self._held = True
        self._failures = 0
        self.failure = None
        return [bytes([SEGMENT_ENTRY]) + encode_struct(record)]

    def _note_able(self, nodes: Iterable[bytes], now: float) -> None:
        """When each newcomer was first seen able (bounded: the oldest are forgotten)."""
        for n in nodes:
            self._first_seen.setdefault(n, now)
        while len(self._first_seen) > MAX_SEEN:
            del self._first_seen[next(iter(self._first_seen))]

    @staticmethod
    def _share_of(p: _Plan) -> Callable[[int], int]:
        shares = elastic.group_shares(p.shares, len(p.group))
        return lambda r: shares[r]

    def _contributed_reads(self, p: _Plan, r: int, reports: Sequence[SeatReport]) -> dict[int, int]:
        """Where rank ``r``'s shards continue, by the rounds its contribution went into (the
        survivors' ``rounds_of``; sync: one round per step, DiLoCo: one for all its steps)."""
        rounds = max((rep.rounds_of[r] for rep in reports if r < len(rep.rounds_of)), default=0)
        steps = rounds if self.spec.mode == "sync" else (p.end - p.start if rounds > 0 else 0)
        seat = p.seats[r]
        order = [c.shard for c in seat.cursors]
        start = {c.shard: c.position for c in seat.cursors}
        return elastic.advance(order, start, self._share_of(p)(r), min(steps, p.end - p.start))

    def on_progress(self, worker: bytes, data: bytes) -> bool:
        """A worker's heartbeat progress; whether it was taken (soft state)."""
        p = self._plan
        if p is None or worker not in p.group or not data:
            return False
        try:
            prog = decode_struct(SeatProgress, data, what="SeatProgress")
        except RemoteProtocolError:
            return False
        if prog.segment != p.segment:
            return False
        self._progress[worker] = prog
        return True

    def requeue_running(self, *, now: float) -> None:
        """After a takeover: the segment in flight is planned again from the committed record."""
        self._plan = None
        self._held = False
        self.running = 0
        self._progress.clear()

    def cancel(self) -> None:
        self._plan = None
        self.running = 0

    # ---- the log ----------------------------------------------------------------------

    def apply(self, entry: bytes) -> bool:
        if not entry:
            return False
        try:
            if entry[0] == FAILED_ENTRY:
                if self.failed:
                    return False
                self.failure = decode_struct(Failure, entry[1:], what="Failure")
                self.failed = 1
                self._plan, self._held = None, False
                return True
            if entry[0] != SEGMENT_ENTRY:
                return False
            record = decode_struct(SegmentRecord, entry[1:], what="SegmentRecord")
        except RemoteProtocolError:
            return False
        if record.start != self.step or record.end <= self.step:
            return False  # a replay of a record already applied
        index = len(self.records)
        self.records.append(record)
        self.step = record.end
        self.state = record.state
        self.cursors.update((c.shard, c.position) for c in record.cursors)
        if record.checkpoint:
            self.checkpoint, self.checkpoint_step = record.state, record.end
        self._events = (self._events + list(record.events))[-KEEP_EVENTS:]
        for node in record.group:
            self.seen[node] = None
        while len(self.seen) > MAX_SEEN:
            del self.seen[next(iter(self.seen))]
        self.done = len(self.records)
        self.outcomes[index] = Outcome(index=index, ok=True, value=entry[1:])
        if self._plan is not None and self._plan.segment <= record.segment:
            self._plan = None
        self._held = False
        return True

    # ---- reports ----------------------------------------------------------------------

    def report(self, index: int) -> SubtaskReport:
        if index < len(self.records):
            return SubtaskReport(index=index, state=SubtaskState.DONE, attempts=1)
        state = SubtaskState.RUNNING if self._plan is not None and index == self._plan.segment \
            else SubtaskState.PENDING
        if self.failed and index == len(self.records):
            return SubtaskReport(index=index, state=SubtaskState.FAILED, attempts=1, failure=self.failure)
        return SubtaskReport(index=index, state=state, attempts=1)

    def progress(self) -> JobProgress:
        """The job for ``jobs`` and ``train``'s live view (committed state plus live steps)."""
        last = self.records[-1] if self.records else None
        live = list(self._progress.values())
        loss = (sum(p.loss for p in live) / len(live)) if live else (last.losses[-1] if last and last.losses else None)
        val = next((r.val_loss for r in reversed(self.records) if r.val_loss is not None), None)
        window = self.records[-5:]
        wall = sum(r.wall_s for r in window)
        tokens_s = sum(p.tokens_s for p in live) if live else (
            sum(r.tokens for r in window) / wall if wall > 0 else 0.0)
        if self._plan is not None:
            group, shares = self._plan.group, self._plan.shares
        else:
            group, shares = (last.finished, ()) if last else ((), ())
        return JobProgress(
            function=self.submission.function, mode=self.spec.mode, step=self.step, steps=self.spec.steps,
            live_step=max([self.step, *(p.step for p in live)]), loss=loss, val_loss=val,
            workers=tuple(group), workers_seen=tuple(self.seen), tokens_s=tokens_s,
            bytes_sent=sum(r.bytes_sent for r in self.records) + sum(p.bytes_sent for p in live),
            state=self.state, checkpoint=self.checkpoint, checkpoint_step=self.checkpoint_step,
            waiting=self.waiting[:300], export=last.export if last else None, segments=len(self.records),
            group_size=len(group), seen=len(self.seen), events=tuple(self._events),
            listeners=tuple(n for n, sh in zip(group, shares, strict=False) if sh == 0),
            batch=sum(shares) if shares else len(group))

    def summary_progress(self) -> bytes:
        """``progress()`` cut to fit a ``TaskSummary`` (lists shortened, the export's sample and
        report left out: the whole export is in the last ``SegmentRecord``)."""
        p = self.progress()
        export = p.export and replace(p.export, sample="", report=b"")
        return encode_struct(replace(p, workers=p.workers[:SUMMARY_WORKERS],
                                     workers_seen=p.workers_seen[-SUMMARY_WORKERS:], export=export,
                                     events=p.events[-PROGRESS_EVENTS:],
                                     listeners=p.listeners[:SUMMARY_WORKERS]))
