"""One task as a node holds it: as its coordinator, or as one of its replicas.

Theory of operation
-------------------
A task's *chain* is the rendezvous order (``node.placement.rank``) of its id over the live
members that may coordinate: the first is the coordinator, the next ``replicas`` hold copies
of its log. Every holder keeps the same ``TaskRecord``: the signed seed (submission, inputs,
bundle), the *log* (opaque per-kind entries, e.g. the map kind's encoded outcomes) and how
far it is *committed*, and the *ballot* (epoch, node) it follows.

The coordinator appends entries and copies them to every replica with ``TaskReplicate``; a
replica answers ``TaskReplicateAck(through=n)``. An entry is committed once every current
replica holds it (at once when there is none), and only then does the kind ``apply`` it: a
result counts as done only when a successor would have it too. Replicas apply committed
entries to their own kind state, so any holder can answer status and results.

Work goes out as *attempts*: a batch of subtasks leased to one worker with a deadline of
``lease_s``; the worker renews the lease with heartbeats while it runs them. A lease that runs
out, or a worker that refuses or dies, gives the attempt's unfinished subtasks back to the
kind, which retries them (elsewhere when it can). Workers get at most ``pipeline`` attempts
per slot, so none idles while its results travel.

Takeover: when the coordinator is gone, the live replica ranked highest takes over with the
ballot ``(epoch + 1, itself)``; it replays its whole log (entries it holds but that were not
known committed are results too: they simply commit again), forgets the attempts (all
running subtasks run again: at-least-once execution), fills the replica set from the chain
and copies the log to newcomers. Ballots order by ``(epoch, rendezvous weight)``: a replica
refuses a ``TaskReplicate`` of a lower ballot than the one it follows, a worker an assignment
of a lower ballot; a coordinator told of a higher ballot is *deposed* and becomes a replica
of the new one. Two nodes that both believed they should take over during churn thus agree
without luck, as soon as one hears of the other.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from node.core import Send
from node.placement import ballot_key
from node.tasks.kinds import KINDS, Kind
from protocol.connection import Channel
from protocol.messages.tasks import (
    MAX_LOG_BATCH,
    TERMINAL_STATES,
    Ballot,
    Outcome,
    Submission,
    TaskAbort,
    TaskAssign,
    TaskReplicate,
    TaskReplicateAck,
    TaskSeed,
    TaskState,
    TaskSummary,
)
from protocol.schema import Message

#: Bytes of log entries in one ``TaskReplicate``.
MAX_REPLICATE_BYTES = 4 * 1024 * 1024
#: A log entry's first byte: what it is.
KIND_ENTRY = 0x00
CANCEL_ENTRY = 0x01


class Role(enum.Enum):
    COORDINATOR = "coordinator"
    REPLICA = "replica"


@dataclass(frozen=True, slots=True)
class Worker:
    """A live member as the coordinator sees it: what it offers."""

    node_id: bytes
    cpus: float
    gpus: int
    memory_mb: int
    coordinates: bool = True


@dataclass(slots=True)
class Attempt:
    attempt: int
    worker: bytes
    indices: set[int]
    deadline: float


@dataclass(frozen=True, slots=True)
class CoordinatorSettings:
    replicas: int = 2
    lease_s: float = 5.0
    """An attempt with no heartbeat for this long is presumed lost."""
    pipeline: int = 2
    """Attempts in flight per worker slot."""
    replicate_retry_s: float = 1.0
    """Re-send log entries a replica has not acknowledged after this long."""


def ballot_order(task_id: bytes, ballot: Ballot) -> tuple[int, int, bytes]:
    return ballot_key(task_id, ballot.epoch, ballot.node)


@dataclass(slots=True)
class _Copy:
    """What the coordinator knows of one replica's copy."""

    acked: int = 0
    """It holds every entry before this index."""
    has_seed: bool = False
    seed_sent: bool = False
    sent: int = 0
    """Entries before this index were sent (acknowledged or in flight)."""
    told: int = 0
    """The commit point it was last told."""
    waiting_since: float | None = None
    """Since when something sent is unacknowledged with no progress (None: nothing is)."""

    @property
    def unacked(self) -> bool:
        return self.sent > self.acked or (self.seed_sent and not self.has_seed)


@dataclass(slots=True)
class TaskRecord:
    """One task as this node holds it (module docstring)."""

    task_id: bytes
    seed: TaskSeed
    submission: Submission
    self_id: bytes
    ballot: Ballot
    role: Role
    settings: CoordinatorSettings = field(default_factory=CoordinatorSettings)
    replicas: list[bytes] = field(default_factory=list)
    log: list[bytes] = field(default_factory=list)
    committed: int = 0
    applied: int = 0
    cancelled: bool = False
    version: int = 1
    created: float = 0.0
    updated: float = 0.0
    waiting_reason: str = ""
    kind: Kind = field(init=False)
    attempts: dict[int, Attempt] = field(default_factory=dict)
    _copies: dict[bytes, _Copy] = field(default_factory=dict)
    _outbox: list[Send[Message]] = field(default_factory=list)
    _next_attempt: int = 1
    _load: dict[bytes, int] = field(default_factory=dict)  # attempts in flight per worker
    _wake_at: float | None = None  # a retry's backoff ends: dispatch again
    _leases: list[tuple[float, int]] = field(default_factory=list)  # (deadline, attempt), lazy
    _able_for: object = None  # the worker list _able_cache was made from
    _able_cache: tuple[list[Worker], dict[bytes, int]] = ([], {})
    _capacity: int = 0
    _silent: dict[bytes, float] = field(default_factory=dict)  # worker -> no new work before
    refused: set[bytes] = field(default_factory=set)
    """Members that refused to hold a replica (full): never asked again."""

    def __post_init__(self) -> None:
        self.kind = KINDS[self.submission.kind](self.submission, self.seed.inputs)
        self.created = self.created or self.submission.created

    # ---- roles ------------------------------------------------------------------------

    @property
    def coordinator(self) -> bytes:
        return self.ballot.node

    @property
    def is_coordinator(self) -> bool:
        return self.role is Role.COORDINATOR

    def lead(self, *, ballot: Ballot, replicas: Sequence[bytes], now: float) -> None:
        """Become (or start as) the coordinator under ``ballot``: replay the log, forget
        attempts, copy the log to ``replicas``."""
        self.role = Role.COORDINATOR
        self.ballot = ballot
        self.attempts.clear()
        self._load.clear()
        self._next_attempt = ((ballot.epoch % (1 << 23)) << 40) + 1  # ids do not repeat across epochs
        for entry in self.log[self.applied:]:
            self._apply(entry)
        self.applied = len(self.log)
        self.kind.requeue_running(now=now)
        self.replicas = [r for r in replicas if r != self.self_id][: self.settings.replicas]
        self._copies = {r: _Copy() for r in self.replicas}
        self._advance_commit()
        self._touch(now)
        self._replicate(now)

    def follow(self, ballot: Ballot, *, now: float) -> None:
        """Become a replica under the higher ``ballot`` (deposed, or first contact)."""
        if self.role is Role.COORDINATOR:
            self._outbox.extend(Send(dest=a.worker, channel=Channel.CONTROL,
                                     message=TaskAbort(task_id=self.task_id, ballot=ballot,
                                                       attempts=(a.attempt,)))
                                for a in self.attempts.values())
            self._rebuild(self.committed)  # what we applied past the commit point may differ
        self.role = Role.REPLICA
        self.ballot = ballot
        self.attempts.clear()
        self._load.clear()
        self._copies.clear()
        self._touch(now)

    def _rebuild(self, upto: int) -> None:
        """Keep the log's first ``upto`` entries only, and the kind state they make."""
        del self.log[upto:]
        self.kind = KINDS[self.submission.kind](self.submission, self.seed.inputs)
        self.cancelled = False
        self.committed = self.applied = 0
        self.committed = upto
        self._apply_committed()

    def outranks(self, ballot: Ballot) -> bool:
        """Our ballot is higher than ``ballot``."""
        return ballot_order(self.task_id, self.ballot) > ballot_order(self.task_id, ballot)

    # ---- replica side -----------------------------------------------------------------

    def on_replicate(self, msg: TaskReplicate, *, now: float) -> TaskReplicateAck:
        """A coordinator's log copy; the answer to send back."""
        if self.outranks(msg.ballot):
            return TaskReplicateAck(task_id=self.task_id, ballot=self.ballot, ok=False,
                                    through=len(self.log))
        if msg.ballot != self.ballot or self.role is Role.COORDINATOR:
            self.follow(msg.ballot, now=now)
            del self.log[self.applied:]  # an uncommitted tail may differ from the new coordinator's
        self.replicas = list(msg.replicas)
        if msg.first <= len(self.log):
            self.log.extend(msg.entries[len(self.log) - msg.first:])
        self.committed = max(self.committed, min(msg.committed, len(self.log)))
        changed = self._apply_committed()
        if changed or msg.entries:
            self._touch(now)
        return TaskReplicateAck(task_id=self.task_id, ballot=self.ballot, ok=True,
                                through=len(self.log), has_seed=True)

    # ---- coordinator side -------------------------------------------------------------

    def on_ack(self, sender: bytes, msg: TaskReplicateAck, *, now: float) -> None:
        if not msg.ok:
            if not self.outranks(msg.ballot) and msg.ballot != self.ballot:
                self.follow(msg.ballot, now=now)
            return
        copy = self._copies.get(sender)
        if copy is None or msg.ballot != self.ballot or not self.is_coordinator:
            return
        if not msg.has_seed:  # it lost the task (or never got the seed): start it over
            self._copies[sender] = _Copy()
            self._replicate(now)
            return
        progress = not copy.has_seed or msg.through > copy.acked
        copy.has_seed = True
        copy.acked = max(copy.acked, min(msg.through, len(self.log)))
        copy.sent = max(copy.sent, copy.acked)

        if progress:
            copy.waiting_since = now if copy.unacked else None
        if self._advance_commit():
            self._touch(now)
        self._replicate(now)

    def on_outcomes(self, worker: bytes, attempt: int, outcomes: Sequence[Outcome], *,
                    now: float) -> None:
        """A worker's outcomes of ``attempt`` (perhaps of an earlier ballot's attempt)."""
        if not self.is_coordinator or self.cancelled:
            return
        att = self.attempts.get(attempt)
        mine = att is not None and att.worker == worker
        if not mine and not self.kind.stale_outcomes:
            return
        entries = self.kind.on_outcomes(outcomes, worker=worker, now=now)
        if att is not None and mine:
            att.indices.difference_update(o.index for o in outcomes)
            att.deadline = now + self.settings.lease_s
            heapq.heappush(self._leases, (att.deadline, attempt))
            if not att.indices:
                self._end_attempt(att)
        self._append(entries, now)

    def on_heartbeat(self, worker: bytes, attempts: Iterable[int], *, now: float,
                     progress: bytes = b"") -> None:
        self._silent.pop(worker, None)
        if progress and self.is_coordinator:
            self.kind.on_progress(worker, progress)
        for attempt in attempts:
            att = self.attempts.get(attempt)
            if att is not None and att.worker == worker:
                att.deadline = now + self.settings.lease_s
                heapq.heappush(self._leases, (att.deadline, attempt))

    def on_reject(self, worker: bytes, attempt: int, ballot: Ballot, reason: str, *, now: float) -> None:
        att = self.attempts.get(attempt)
        if att is not None and att.worker == worker:
            self._lose(att, reason=f"refused: {reason}", now=now)
        if not self.outranks(ballot) and ballot != self.ballot:
            self.follow(ballot, now=now)

    def on_worker_gone(self, worker: bytes, *, now: float) -> None:
        for att in [a for a in self.attempts.values() if a.worker == worker]:
            self._lose(att, reason="its worker left the mesh", now=now)

    def on_replica_gone(self, replica: bytes, replacement: bytes | None, *, now: float) -> None:
        if replica not in self._copies:
            return
        del self._copies[replica]
        self.replicas.remove(replica)
        if replacement is not None and replacement not in self._copies and replacement != self.self_id:
            self.replicas.append(replacement)
            self._copies[replacement] = _Copy()
        if self._advance_commit():
            self._touch(now)
        self._replicate(now)

    def cancel(self, *, now: float) -> None:
        if self.cancelled or self.state in TERMINAL_STATES:
            return
        self._log([bytes([CANCEL_ENTRY])], now)

    def dispatch(self, workers: Sequence[Worker], *, now: float) -> None:
        """Hand ready subtasks to workers with room, least loaded first."""
        self._wake_at = None
        if not self.is_coordinator or self.cancelled or self.kind.finished():
            return
        ready = self.kind.next_ready()
        if ready is None or ready > now:  # nothing to hand out now (the usual case): cheap
            self._wake_at = ready
            return
        able, slots = self._able(workers)
        reason = "" if able else (f"no live member offers {self.submission.resources.cpus:g} cpus, "
                                  f"{self.submission.resources.gpus} gpus, "
                                  f"{self.submission.resources.memory_mb} MB")
        if able:
            reason = self.kind.plan([w.node_id for w in able], task_id=self.task_id,
                                    epoch=self.ballot.epoch, now=now)
            if closed := self.kind.take_lost_entries():
                self._log([bytes([KIND_ENTRY]) + e for e in closed], now)
        if reason != self.waiting_reason:
            self.waiting_reason = reason
            self._touch(now)
        capacity = self._capacity * self.settings.pipeline
        if reason or len(self.attempts) >= capacity:
            return
        batch = self.kind.batch_size(self._capacity)
        progress = True
        while progress:
            progress = False
            for w in sorted(able, key=lambda w: self._load.get(w.node_id, 0) / slots[w.node_id]):
                room = slots[w.node_id] * self.settings.pipeline - self._load.get(w.node_id, 0)
                if room <= 0 or (self._silent and self._silent.get(w.node_id, 0.0) > now and len(able) > 1):
                    continue
                items = self.kind.take(batch, worker=w.node_id, now=now, others=len(able) > 1)
                if not items:
                    continue
                progress = True
                attempt = self._next_attempt
                self._next_attempt += 1
                self.attempts[attempt] = Attempt(attempt, w.node_id, {i.index for i in items},
                                                 now + self.settings.lease_s)
                heapq.heappush(self._leases, (now + self.settings.lease_s, attempt))
                self._load[w.node_id] = self._load.get(w.node_id, 0) + 1
                s = self.submission
                self._outbox.append(Send(dest=w.node_id, channel=Channel.CONTROL, message=TaskAssign(
                    task_id=self.task_id, ballot=self.ballot, attempt=attempt, function=s.function,
                    bundle=s.bundle, timeout_s=s.timeout_s, lease_s=self.settings.lease_s,
                    resources=s.resources, items=tuple(items), kind=s.kind)))
        ready = self.kind.next_ready()
        self._wake_at = ready if ready is not None and ready > now else None
        if self.attempts:
            self._touch(now, quiet=True)

    def _able(self, workers: Sequence[Worker]) -> tuple[list[Worker], dict[bytes, int]]:
        """The workers that can run this task's subtasks and their slots (cached per list)."""
        if self._able_for is not workers:
            res = self.submission.resources
            able = [w for w in workers if (w.cpus == 0 or w.cpus >= res.cpus) and w.gpus >= res.gpus
                    and (res.memory_mb == 0 or w.memory_mb == 0 or w.memory_mb >= res.memory_mb)]
            self._able_cache = (able, {w.node_id: max(1, int(w.cpus // res.cpus) if res.cpus > 0 else int(w.cpus))
                                       for w in able})
            self._capacity = sum(self._able_cache[1].values())
            self._able_for = workers
        return self._able_cache

    # ---- timer --------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        times: list[float] = []
        if self.is_coordinator:
            lease = self._next_lease()
            if lease is not None:
                times.append(lease)
            if self._wake_at is not None:
                times.append(self._wake_at)
            times.extend(c.waiting_since + self.settings.replicate_retry_s for c in self._copies.values()
                         if c.unacked and c.waiting_since is not None)
        return min(times) if times else None

    def _next_lease(self) -> float | None:
        """The earliest lease deadline (stale heap entries, of ended or renewed attempts, dropped)."""
        heap = self._leases
        while heap:
            deadline, attempt = heap[0]
            att = self.attempts.get(attempt)
            if att is not None and att.deadline == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def handle_timer(self, *, now: float) -> None:
        if not self.is_coordinator:
            return
        while (lease := self._next_lease()) is not None and lease <= now:
            att = self.attempts[heapq.heappop(self._leases)[1]]
            self._silent[att.worker] = now + self.settings.lease_s  # no new work there for a while
            self._lose(att, reason=f"no heartbeat for {self.settings.lease_s:g}s", now=now)
        for copy in self._copies.values():
            if copy.unacked and copy.waiting_since is not None and \
                    now >= copy.waiting_since + self.settings.replicate_retry_s:
                copy.sent = copy.acked  # no progress for a while: re-send what it lacks
                copy.seed_sent = copy.has_seed
                copy.waiting_since = None
        self._replicate(now)

    def quiet(self) -> bool:
        """Nothing to do until a message comes: no attempts, every copy up to date, nothing to send."""
        return not self.attempts and not self._outbox and all(
            not c.unacked and c.told >= self.committed and c.sent >= len(self.log) and c.has_seed
            for c in self._copies.values())

    def messages_to_send(self) -> list[Send[Message]]:
        out, self._outbox = self._outbox, []
        return out

    # ---- state ------------------------------------------------------------------------

    @property
    def state(self) -> TaskState:
        if self.cancelled:
            return TaskState.CANCELLED
        if self.kind.finished():
            return TaskState.DONE if self.kind.failed == 0 else TaskState.FAILED
        if self.waiting_reason:
            return TaskState.WAITING
        return TaskState.RUNNING

    def summary(self, *, wall_offset: float) -> TaskSummary:
        """The summary, times as Unix time (``wall_offset``: Unix time minus ``now``)."""
        k = self.kind
        return TaskSummary(
            task_id=self.task_id, function=self.submission.function, submitter=self.submission.submitter,
            coordinator=self.coordinator, epoch=self.ballot.epoch, state=self.state, total=k.total,
            done=k.done, failed=k.failed, running=k.running, retried=max(k.retried, k.retried_recorded),
            created=self.created, updated=max(0.0, self.updated + wall_offset),
            version=self.version, waiting_reason=self.waiting_reason[:300], kind=self.submission.kind,
            progress=k.summary_progress())

    # ---- inside -----------------------------------------------------------------------

    def _touch(self, now: float, *, quiet: bool = False) -> None:
        if not quiet:
            self.version += 1
        self.updated = now

    def _append(self, entries: Sequence[bytes], now: float) -> None:
        """Log the kind's ``entries`` (and those its losses produced), then replicate."""
        lost = self.kind.take_lost_entries()
        self._log([bytes([KIND_ENTRY]) + e for e in (*entries, *lost)], now)

    def _log(self, entries: Sequence[bytes], now: float) -> None:
        if not entries:
            return
        self.log.extend(entries)
        if self._advance_commit():
            self._touch(now)
        self._replicate(now)

    def _advance_commit(self) -> bool:
        """Move ``committed`` to what every replica holds; apply what became committed."""
        through = min((c.acked for c in self._copies.values()), default=len(self.log))
        if through > self.committed:
            self.committed = through
        return self._apply_committed()

    def _apply_committed(self) -> bool:
        changed = False
        while self.applied < self.committed:
            changed |= self._apply(self.log[self.applied])
            self.applied += 1
        return changed

    def _apply(self, entry: bytes) -> bool:
        if not entry:
            return False
        if entry[0] == CANCEL_ENTRY:
            if not self.cancelled:
                self.cancelled = True
                self.kind.cancel()
                if self.is_coordinator:
                    self._outbox.extend(Send(dest=w, channel=Channel.CONTROL, message=TaskAbort(
                        task_id=self.task_id, ballot=self.ballot)) for w in {a.worker for a in self.attempts.values()})
                    self.attempts.clear()
                    self._load.clear()
            return True
        return self.kind.apply(entry[1:])

    def _replicate(self, now: float) -> None:
        """Copy to each replica what it lacks: new entries (pipelined), the seed on first
        contact or after a retry, the commit point when it moved and nothing is in flight."""
        if not self.is_coordinator:
            return
        for replica, copy in self._copies.items():
            needs_seed = not copy.has_seed and not copy.seed_sent
            needs_commit = copy.told < self.committed and not copy.unacked
            if not (copy.sent < len(self.log) or needs_seed or needs_commit):
                continue
            entries: list[bytes] = []
            size = 0
            for entry in () if needs_seed else self.log[copy.sent:]:  # a seed travels alone (<= 8 MiB)
                if entries and (size + len(entry) > MAX_REPLICATE_BYTES or len(entries) >= MAX_LOG_BATCH):
                    break
                entries.append(entry)
                size += len(entry)
            self._outbox.append(Send(dest=replica, channel=Channel.CONTROL, message=TaskReplicate(
                task_id=self.task_id, ballot=self.ballot, replicas=tuple(self.replicas),
                seed=self.seed if needs_seed else None, first=copy.sent, entries=tuple(entries),
                committed=self.committed)))
            if not copy.unacked:
                copy.waiting_since = now
            copy.sent += len(entries)
            copy.seed_sent = copy.seed_sent or needs_seed
            copy.told = self.committed
            if not copy.unacked:  # only the commit point went: nothing to wait for
                copy.waiting_since = None

    def _lose(self, att: Attempt, *, reason: str, now: float) -> None:
        self.kind.on_lost(att.indices, worker=att.worker, reason=reason, now=now)
        self._end_attempt(att)
        self._append([], now)
        self._touch(now)

    def _end_attempt(self, att: Attempt) -> None:
        self.attempts.pop(att.attempt, None)
        left = self._load.get(att.worker, 0) - 1
        if left > 0:
            self._load[att.worker] = left
        else:
            self._load.pop(att.worker, None)
