"""Everything one node does for tasks, as one sans-I/O core: the node and the simulator run it.

Theory of operation
-------------------
A node plays three parts for any number of tasks at once:

* **holder** of the tasks it coordinates or replicates: one ``TaskRecord`` each
  (``node.tasks.coordinator``), created by ``create`` (we are the chosen coordinator) or by
  the first ``TaskReplicate`` that carries a seed;
* **worker**: it accepts ``TaskAssign`` from the coordinator of the highest ballot it knows for
  the task, emits ``RunAttempt`` for its adapter to run, renews each running attempt's lease
  with a ``TaskHeartbeat`` every third of the lease, and sends the ``TaskResult`` the adapter
  reports back (``attempt_done``);
* **directory**: the summaries coordinators announce (``TaskAnnounce``), bounded, so that any
  node can list the mesh's tasks.

Membership comes in as ``set_members`` (the live members and what they offer). The *chain* of
a task is the rendezvous order of its id over the live members that coordinate; when a
record's coordinator leaves, the live holder ranked first in the chain takes over with the
next epoch; when a replica leaves, the coordinator adds the next member of the chain.

Messages a record addresses to this node itself (an assignment to the coordinator's own
worker) are delivered inside the core, never through the network. One timer: the earliest of
the records' deadlines, the heartbeats due, the next announcement and the next expiry.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from node.core import Send
from node.placement import rank
from node.tasks.coordinator import (
    Attempt,
    CoordinatorSettings,
    Role,
    TaskRecord,
    Worker,
    ballot_order,
)
from node.tasks.kinds import KINDS
from protocol.connection import Channel
from protocol.errors import RemoteProtocolError
from protocol.messages.tasks import (
    MAX_BATCH,
    MAX_HEARTBEAT_PROGRESS,
    MAX_REPLICAS,
    TERMINAL_STATES,
    Ballot,
    Outcome,
    Submission,
    TaskAbort,
    TaskAnnounce,
    TaskAssign,
    TaskHeartbeat,
    TaskReject,
    TaskReplicate,
    TaskReplicateAck,
    TaskResult,
    TaskSeed,
    TaskSummary,
    decode_struct,
)
from protocol.schema import Message

#: A running attempt's live figures reach its coordinator within this many seconds.
PROGRESS_S = 1.0

__all__ = ["AbortAttempts", "Attempt", "RunAttempt", "TaskChanged", "TaskEngine", "TaskSettings"]


@dataclass(frozen=True, slots=True)
class TaskSettings:
    coordinator: CoordinatorSettings = field(default_factory=CoordinatorSettings)
    max_tasks: int = 1024
    """Records (coordinated or replicated) one node holds; finished ones are dropped first."""
    retain_s: float = 3600.0
    """A finished task's results stay this long (then only its summary, in the directory)."""
    retain_bytes: int = 512 * 1024 * 1024
    """Total encoded inputs and results of the finished tasks kept."""
    max_attempts: int = 4096
    """Attempts this node runs or queues as a worker; more are refused."""
    announce_s: float = 2.0
    """A running task's summary is announced at most this often."""
    directory_size: int = 1024
    max_ballots: int = 8192


@dataclass(frozen=True, slots=True)
class RunAttempt:
    """Run ``assign``'s items (the adapter reports back with ``attempt_done``)."""

    task_id: bytes
    coordinator: bytes
    assign: TaskAssign


@dataclass(frozen=True, slots=True)
class AbortAttempts:
    """Stop these attempts of ``task_id`` (empty: all of them)."""

    task_id: bytes
    attempts: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TaskChanged:
    """A task's summary moved on (waiters may wake), or it became ours to serve."""

    task_id: bytes


Event = RunAttempt | AbortAttempts | TaskChanged


@dataclass(slots=True)
class _Running:
    ballot: Ballot
    lease_s: float
    beat_at: float


class TaskEngine:
    """One node's task layer (module docstring)."""

    def __init__(self, *, self_id: bytes, rng: random.Random, settings: TaskSettings | None = None,
                 wall_offset: float = 0.0, coordinates: bool = True) -> None:
        self.self_id = self_id
        self.settings = settings or TaskSettings()
        self.rng = rng
        self.wall_offset = wall_offset
        """Unix time minus ``now`` (summaries carry Unix times)."""
        self.coordinates = coordinates
        self.records: dict[bytes, TaskRecord] = {}
        self.directory: OrderedDict[bytes, TaskSummary] = OrderedDict()
        self._workers: dict[bytes, Worker] = {}
        self._worker_list: list[Worker] = []
        self._ballots: OrderedDict[bytes, Ballot] = OrderedDict()  # highest seen, as a worker
        self._running: dict[tuple[bytes, int], _Running] = {}
        self._outbox: list[Send[Message]] = []
        self._local: deque[tuple[bytes, Message]] = deque()
        self._events: deque[Event] = deque()
        self._announced: dict[bytes, tuple[int, float]] = {}  # task -> (version, when)
        self._finished_at: dict[bytes, float] = {}  # in finishing order: oldest first
        self._finished_bytes: dict[bytes, int] = {}
        self._retained = 0
        self._live: set[bytes] = set()  # records that may act (see _settle)
        self._progress: dict[bytes, bytes] = {}  # task -> figures for its next heartbeat
        self.counters = {"tasks_created": 0, "takeovers": 0, "deposed": 0, "attempts_run": 0,
                         "attempts_refused": 0, "results_sent": 0}

    # ---- membership -----------------------------------------------------------------

    def set_members(self, workers: Iterable[Worker], *, now: float) -> None:
        """The live members (ourselves included) and what they offer."""
        fresh = {w.node_id: w for w in workers}
        gone = [n for n in self._workers if n not in fresh]
        self._workers = fresh
        self._worker_list = list(fresh.values())  # one list per view: records cache what they derive
        for node in gone:
            self._member_gone(node, now=now)
        self._step(now)

    def chain(self, task_id: bytes) -> list[bytes]:
        """The task's rendezvous order over the live members that coordinate."""
        return rank(task_id, (w.node_id for w in self._workers.values() if w.coordinates))

    def _member_gone(self, node: bytes, *, now: float) -> None:
        for rec in list(self.records.values()):
            if rec.is_coordinator:
                rec.on_worker_gone(node, now=now)
                if node in rec.replicas:
                    rec.on_replica_gone(node, self._replacement(rec), now=now)
            else:  # its coordinator, or a replica ahead of us in line, may be what left
                self._maybe_take_over(rec, now=now)

    def _replacement(self, rec: TaskRecord) -> bytes | None:
        held = {self.self_id, *rec.replicas, *rec.refused}
        return next((n for n in self.chain(rec.task_id) if n not in held), None)

    def _maybe_take_over(self, rec: TaskRecord, *, now: float) -> None:
        """Our record's coordinator is gone: the live holder ranked first takes over."""
        if rec.coordinator in self._workers:
            return
        holders = {self.self_id, *rec.replicas}
        # the coordinator's own list: older copies first (a replacement is appended, so it
        # takes over only when every replica that held the log longer is gone)
        order = [n for n in rec.replicas if n in self._workers or n == self.self_id]
        if not order or order[0] != self.self_id:
            return
        epoch = max(rec.ballot.epoch, self._ballots.get(rec.task_id, rec.ballot).epoch) + 1
        others = order[1:]
        fill = [n for n in self.chain(rec.task_id) if n not in holders]
        want = min(self.settings.coordinator.replicas, MAX_REPLICAS)
        rec.lead(ballot=Ballot(epoch=epoch, node=self.self_id), replicas=(others + fill)[:want], now=now)
        self._note_ballot(rec.task_id, rec.ballot)
        self._live.add(rec.task_id)
        self._unfinish(rec.task_id)
        self.counters["takeovers"] += 1
        self._changed(rec.task_id)

    # ---- holder -----------------------------------------------------------------------

    def create(self, seed: TaskSeed, submission: Submission, task_id: bytes, *, now: float) -> None:
        """Coordinate a new task (the caller checked the seed and chose us). Idempotent."""
        if task_id in self.records:
            return
        self._make_room(now)
        chain = [n for n in self.chain(task_id) if n != self.self_id]
        rec = TaskRecord(task_id=task_id, seed=seed, submission=submission, self_id=self.self_id,
                         ballot=Ballot(epoch=0, node=self.self_id), role=Role.COORDINATOR,
                         settings=self.settings.coordinator)
        self.records[task_id] = rec
        self._live.add(task_id)
        rec.lead(ballot=rec.ballot, replicas=chain[: min(self.settings.coordinator.replicas, MAX_REPLICAS)],
                 now=now)
        self._note_ballot(task_id, rec.ballot)
        self.counters["tasks_created"] += 1
        self._changed(task_id)
        self._step(now)

    def full(self) -> bool:
        """No room for another record: every one held is still running."""
        return len(self.records) >= self.settings.max_tasks and all(
            r.state not in TERMINAL_STATES for r in self.records.values())

    def _unfinish(self, task_id: bytes) -> None:
        """A record whose state may go back (takeover, deposed): retention starts over."""
        if self._finished_at.pop(task_id, None) is not None:
            self._retained -= self._finished_bytes.pop(task_id, 0)

    def cancel(self, task_id: bytes, *, now: float) -> bool:
        """Cancel a task we coordinate (False: we do not)."""
        rec = self.records.get(task_id)
        if rec is None or not rec.is_coordinator:
            return False
        self._live.add(task_id)
        rec.cancel(now=now)
        self._step(now)
        return True

    # ---- messages ---------------------------------------------------------------------

    def on_message(self, sender: bytes, msg: Message, *, now: float) -> None:
        self._dispatch(sender, msg, now=now)
        self._step(now)

    def _dispatch(self, sender: bytes, msg: Message, *, now: float) -> None:
        task_id = getattr(msg, "task_id", None)
        if task_id in self.records:
            self._live.add(task_id)
        if isinstance(msg, TaskReplicate):
            self._on_replicate(sender, msg, now=now)
        elif isinstance(msg, TaskReplicateAck):
            rec = self.records.get(msg.task_id)
            if rec is not None and not msg.ok and msg.ballot == rec.ballot and rec.is_coordinator:
                rec.refused.add(sender)  # it cannot hold the task: replace it
                rec.on_replica_gone(sender, self._replacement(rec), now=now)
            elif rec is not None:
                was = rec.is_coordinator
                rec.on_ack(sender, msg, now=now)
                self._after_role(rec, was, now)
        elif isinstance(msg, TaskAssign):
            self._on_assign(sender, msg, now=now)
        elif isinstance(msg, TaskHeartbeat):
            rec = self.records.get(msg.task_id)
            if rec is not None and rec.is_coordinator:
                rec.on_heartbeat(sender, msg.attempts, now=now, progress=msg.progress)
        elif isinstance(msg, TaskResult):
            rec = self.records.get(msg.task_id)
            if rec is not None and rec.is_coordinator:
                rec.on_outcomes(sender, msg.attempt, msg.outcomes, now=now)
                if rec.version != self._announced.get(rec.task_id, (0, 0.0))[0]:
                    self._changed(rec.task_id)
        elif isinstance(msg, TaskReject):
            rec = self.records.get(msg.task_id)
            if rec is not None:
                was = rec.is_coordinator
                rec.on_reject(sender, msg.attempt, msg.ballot, msg.reason, now=now)
                self._after_role(rec, was, now)
        elif isinstance(msg, TaskAbort):
            self._on_abort(msg)
        elif isinstance(msg, TaskAnnounce):
            self._remember(msg.summary)

    def _after_role(self, rec: TaskRecord, was_coordinator: bool, now: float) -> None:
        if was_coordinator and not rec.is_coordinator:
            self._live.add(rec.task_id)
            self._unfinish(rec.task_id)  # it rebuilt from its committed prefix
            self.counters["deposed"] += 1
            self._note_ballot(rec.task_id, rec.ballot)
            self._changed(rec.task_id)

    def _on_replicate(self, sender: bytes, msg: TaskReplicate, *, now: float) -> None:
        rec = self.records.get(msg.task_id)
        if rec is None:
            if msg.seed is None:
                self._send(sender, TaskReplicateAck(task_id=msg.task_id, ballot=msg.ballot, ok=True,
                                                    through=0, has_seed=False))
                return
            try:
                submission: Submission | None = decode_struct(Submission, msg.seed.body, what="submission")
            except RemoteProtocolError:  # a coordinator's garbage: refuse to hold it
                submission = None
            if submission is None or submission.kind not in KINDS or self.full():  # another replica, please
                self._send(sender, TaskReplicateAck(task_id=msg.task_id, ballot=msg.ballot, ok=False,
                                                    through=0, has_seed=False))
                return
            self._make_room(now)
            rec = TaskRecord(task_id=msg.task_id, seed=msg.seed, submission=submission,
                             self_id=self.self_id, ballot=msg.ballot, role=Role.REPLICA,
                             settings=self.settings.coordinator)
            self.records[msg.task_id] = rec
            self._live.add(msg.task_id)
            self._changed(msg.task_id)
        was = rec.is_coordinator
        version = rec.version
        ack = rec.on_replicate(msg, now=now)
        self._after_role(rec, was, now)
        if ack.ok:
            self._note_ballot(rec.task_id, rec.ballot)
        self._send(sender, ack)
        if rec.version != version:
            self._changed(rec.task_id)

    # ---- worker -----------------------------------------------------------------------

    def _note_ballot(self, task_id: bytes, ballot: Ballot) -> None:
        known = self._ballots.get(task_id)
        if known is None or ballot_order(task_id, ballot) > ballot_order(task_id, known):
            self._ballots[task_id] = ballot
        self._ballots.move_to_end(task_id)
        while len(self._ballots) > self.settings.max_ballots:
            self._ballots.popitem(last=False)

    def _on_assign(self, sender: bytes, msg: TaskAssign, *, now: float) -> None:
        known = self._ballots.get(msg.task_id)
        if known is not None and ballot_order(msg.task_id, known) > ballot_order(msg.task_id, msg.ballot):
            self.counters["attempts_refused"] += 1
            self._send(sender, TaskReject(task_id=msg.task_id, ballot=known, attempt=msg.attempt,
                                          reason="assignment from a lower ballot"))
            return
        if len(self._running) >= self.settings.max_attempts:
            self.counters["attempts_refused"] += 1
            self._send(sender, TaskReject(task_id=msg.task_id, ballot=msg.ballot, attempt=msg.attempt,
                                          reason=f"worker busy ({len(self._running)} attempts)"))
            return
        self._note_ballot(msg.task_id, msg.ballot)
        key = (msg.task_id, msg.attempt)
        if key in self._running:
            return  # a duplicate
        self._running[key] = _Running(msg.ballot, msg.lease_s, now + msg.lease_s / 3)
        self.counters["attempts_run"] += 1
        self._events.append(RunAttempt(task_id=msg.task_id, coordinator=sender, assign=msg))

    def attempt_done(self, task_id: bytes, attempt: int, outcomes: Sequence[Outcome], *,
                     now: float) -> None:
        """The adapter ran an attempt (all its items' outcomes): report to its coordinator."""
        run = self._running.pop((task_id, attempt), None)
        self._progress.pop(task_id, None)
        if run is None:
            return  # aborted
        dest = self._ballots.get(task_id, run.ballot)
        for part in _pages(outcomes):
            self._send(dest.node, TaskResult(task_id=task_id, ballot=run.ballot, attempt=attempt,
                                             outcomes=tuple(part)))
        self.counters["results_sent"] += len(outcomes)
        self._step(now)

    def _on_abort(self, msg: TaskAbort) -> None:
        keys = [k for k in self._running if k[0] == msg.task_id and (not msg.attempts or k[1] in msg.attempts)]
        for key in keys:
            del self._running[key]
        self._progress.pop(msg.task_id, None)
        if keys:
            self._events.append(AbortAttempts(task_id=msg.task_id, attempts=tuple(k[1] for k in keys)))

    def set_progress(self, task_id: bytes, data: bytes, *, now: float) -> None:
        """A running attempt's live figures: they ride on its next heartbeat, sent within
        ``PROGRESS_S`` (sooner than the lease needs)."""
        runs = [run for (t, _), run in self._running.items() if t == task_id]
        if not runs or len(data) > MAX_HEARTBEAT_PROGRESS:
            return
        self._progress[task_id] = data
        for run in runs:
            run.beat_at = min(run.beat_at, now + PROGRESS_S)

    @property
    def running_attempts(self) -> int:
        return len(self._running)

    # ---- directory --------------------------------------------------------------------

    def _remember(self, summary: TaskSummary) -> None:
        old = self.directory.get(summary.task_id)
        if old is not None and (old.epoch, old.version) > (summary.epoch, summary.version):
            return
        self.directory[summary.task_id] = summary
        self.directory.move_to_end(summary.task_id)
        while len(self.directory) > self.settings.directory_size:
            self.directory.popitem(last=False)

    def summaries(self) -> list[TaskSummary]:
        """Every task this node knows: its own records' live summaries, then announcements."""
        out = {t: s for t, s in self.directory.items()}
        for task_id, rec in self.records.items():
            out[task_id] = rec.summary(wall_offset=self.wall_offset)
        return sorted(out.values(), key=lambda s: s.task_id)

    def summary(self, task_id: bytes) -> TaskSummary | None:
        rec = self.records.get(task_id)
        if rec is not None:
            return rec.summary(wall_offset=self.wall_offset)
        return self.directory.get(task_id)

    # ---- outputs, timer ---------------------------------------------------------------

    def messages_to_send(self) -> list[Send[Message]]:
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def next_deadline(self) -> float | None:
        times = [r.beat_at for r in self._running.values()]
        for task_id in self._live:
            rec = self.records.get(task_id)
            if rec is None or not rec.is_coordinator:
                continue
            deadline = rec.next_deadline()
            if deadline is not None:
                times.append(deadline)
            version, when = self._announced.get(task_id, (0, -1e18))
            if rec.version != version:
                times.append(when + self.settings.announce_s)
        if self._finished_at:
            times.append(next(iter(self._finished_at.values())) + self.settings.retain_s)
        return min(times) if times else None

    def handle_timer(self, *, now: float) -> None:
        for task_id in list(self._live):
            rec = self.records.get(task_id)
            if rec is not None:
                rec.handle_timer(now=now)
        self._heartbeats(now)
        self._step(now)

    def _heartbeats(self, now: float) -> None:
        due: dict[tuple[bytes, Ballot], list[int]] = {}
        for (task_id, attempt), run in self._running.items():
            if run.beat_at <= now:
                run.beat_at = now + run.lease_s / 3
                due.setdefault((task_id, self._ballots.get(task_id, run.ballot)), []).append(attempt)
        for (task_id, ballot), attempts in due.items():
            progress = self._progress.pop(task_id, b"")
            for start in range(0, len(attempts), MAX_BATCH):
                self._send(ballot.node, TaskHeartbeat(task_id=task_id, ballot=ballot,
                                                      attempts=tuple(attempts[start:start + MAX_BATCH]),
                                                      progress=progress))
                progress = b""

    def _step(self, now: float) -> None:
        """After any input: dispatch work, collect the records' output, deliver our own
        messages to ourselves, announce, expire."""
        workers = self._worker_list
        for _ in range(64):
            for task_id in list(self._live):
                rec = self.records.get(task_id)
                if rec is None:
                    continue
                if rec.is_coordinator:
                    rec.dispatch(workers, now=now)
                for send in rec.messages_to_send():
                    self._send(send.dest, send.message)
            if not self._local:
                break
            while self._local:
                sender, msg = self._local.popleft()
                self._dispatch(sender, msg, now=now)
        self._announce(now)
        self._settle(now)
        self._expire(now)

    def _send(self, dest: bytes, msg: Message) -> None:
        if dest == self.self_id:
            self._local.append((self.self_id, msg))
        else:
            self._outbox.append(Send(dest=dest, channel=Channel.CONTROL, message=msg))

    def _changed(self, task_id: bytes) -> None:
        self._events.append(TaskChanged(task_id))

    def _announce(self, now: float) -> None:
        for task_id in self._live:
            rec = self.records.get(task_id)
            if rec is None or not rec.is_coordinator:
                continue
            version, when = self._announced.get(task_id, (0, -1e18))
            terminal = rec.state in TERMINAL_STATES
            if rec.version == version or (not terminal and now < when + self.settings.announce_s
                                          and version != 0):
                continue
            summary = rec.summary(wall_offset=self.wall_offset)
            self._announced[task_id] = (rec.version, now)
            self._remember(summary)
            self._changed(task_id)
            for node in self._workers:
                if node != self.self_id:
                    self._outbox.append(Send(dest=node, channel=Channel.CONTROL,
                                             message=TaskAnnounce(summary=summary)))

    def _settle(self, now: float) -> None:
        """Finished records start their retention; quiet ones leave ``_live`` (the records
        every step and timer look at), so a node's cost per message does not grow with the
        finished tasks it keeps."""
        for task_id in list(self._live):
            rec = self.records.get(task_id)
            if rec is None:
                self._live.discard(task_id)
                continue
            if rec.state not in TERMINAL_STATES:
                continue
            if task_id not in self._finished_at:
                self._finished_at[task_id] = now
                self._finished_bytes[task_id] = _size(rec)
                self._retained += self._finished_bytes[task_id]
            announced = not rec.is_coordinator or self._announced.get(task_id, (0, 0.0))[0] == rec.version
            if announced and rec.quiet():
                self._live.discard(task_id)

    def _expire(self, now: float) -> None:
        """Drop finished records past ``retain_s``, oldest first while over ``retain_bytes``."""
        while self._finished_at:
            task_id, at = next(iter(self._finished_at.items()))
            if now < at + self.settings.retain_s and self._retained <= self.settings.retain_bytes:
                break
            self._drop(task_id)

    def _make_room(self, now: float) -> None:
        while len(self.records) >= self.settings.max_tasks and self._finished_at:
            self._drop(min(self._finished_at, key=self._finished_at.__getitem__))

    def _drop(self, task_id: bytes) -> None:
        self.records.pop(task_id, None)
        self._finished_at.pop(task_id, None)
        self._retained -= self._finished_bytes.pop(task_id, 0)
        self._announced.pop(task_id, None)
        self._live.discard(task_id)

    def stats(self) -> dict[str, float]:
        coordinating = sum(r.is_coordinator for r in self.records.values())
        return {
            "tasks_coordinating": float(coordinating),
            "tasks_replicating": float(len(self.records) - coordinating),
            "tasks_worker_attempts": float(len(self._running)),
            **{f"tasks_{k}_total" if not k.startswith("tasks_") else f"{k}_total": float(v)
               for k, v in self.counters.items()},
        }


#: Bytes of outcomes in one ``TaskResult`` (a frame holds 8 MiB).
MAX_RESULT_BYTES = 4 * 1024 * 1024


def outcome_size(outcome: Outcome) -> int:
    """An upper bound of an outcome's encoded size."""
    f = outcome.failure
    text = 0 if f is None else len(f.type) + 4 * (len(f.message) + len(f.traceback) + len(f.stdout) + len(f.stderr))
    return len(outcome.value) + text + 128


def _pages(outcomes: Sequence[Outcome]) -> list[list[Outcome]]:
    """``outcomes`` cut into messages of at most ``MAX_BATCH`` items and ``MAX_RESULT_BYTES``."""
    pages: list[list[Outcome]] = [[]]
    size = 0
    for outcome in outcomes:
        weight = outcome_size(outcome)
        if pages[-1] and (size + weight > MAX_RESULT_BYTES or len(pages[-1]) >= MAX_BATCH):
            pages.append([])
            size = 0
        pages[-1].append(outcome)
        size += weight
    return pages


def _size(rec: TaskRecord) -> int:
    return sum(map(len, rec.seed.inputs)) + len(rec.seed.bundle) + sum(map(len, rec.log))
