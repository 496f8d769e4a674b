"""The "map" kind of task: one function over independent inputs, one subtask per input.

Theory of operation. A map task's state is, per subtask index, one of PENDING (waiting to be
dispatched, maybe after a retry backoff), RUNNING (in an attempt leased to a worker), DONE
(a result recorded) or FAILED (failed for good). The coordinator (``node.tasks.coordinator``)
asks ``take`` for a batch of ready subtasks when a worker has room, tells ``on_outcomes`` what
an attempt produced and ``on_lost`` when an attempt's lease ran out or was refused. A success,
or a failure with no retries left, becomes a *log entry* (an encoded ``Outcome``) that the
coordinator replicates; only ``apply`` of a committed (or replayed) entry records it, so a
result counts once it is on every replica. A failure with retries left goes back to PENDING
after an exponential backoff, preferring another worker.

Exactly-once results: ``apply`` records the first entry per index and ignores later ones (a
duplicate from a slow worker, a replay after a takeover); at-least-once execution: an attempt
whose worker went quiet runs again elsewhere.

Batching: ``take`` hands out up to ``batch`` subtasks per attempt, ``batch`` chosen from the
task's size and the workers' slots when the submission leaves it 0, so tiny subtasks cost one
message per batch, not per item.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from protocol.messages.tasks import (
    MAX_BATCH,
    Failure,
    Outcome,
    Submission,
    SubtaskReport,
    SubtaskState,
    WorkItem,
    decode_struct,
    encode_struct,
)

#: First retry delay; doubles per attempt up to ``MAX_BACKOFF_S``.
BASE_BACKOFF_S = 0.05
MAX_BACKOFF_S = 5.0


@dataclass(slots=True)
class Subtask:
    index: int
    state: SubtaskState = SubtaskState.PENDING
    attempts: int = 0
    """Attempts started."""
    lost: int = 0
    """Attempts lost with their worker (not the function's fault)."""
    worker: bytes | None = None
    failure: Failure | None = None
    avoid: bytes | None = None
    """The worker whose attempt failed last: retry elsewhere when we can."""


@dataclass(slots=True)
class MapKind:
    """A map task's subtasks (module docstring). ``inputs`` are the encoded inputs."""

    submission: Submission
    inputs: Sequence[bytes]
    subtasks: list[Subtask] = field(init=False)
    _pending: list[tuple[float, int]] = field(init=False)  # (ready at, index), a heap
    done: int = 0
    """Subtasks recorded as succeeded; ``failed``: recorded as failed for good."""
    failed: int = 0
    retried: int = 0
    """Attempts that failed and were tried again (as dispatched here)."""
    retried_recorded: int = 0
    """The same, counted from the recorded outcomes' attempts (what a replica knows)."""
    running: int = 0
    outcomes: dict[int, Outcome] = field(init=False)
    stale_outcomes: bool = True  # a subtask's result is its result, whichever ballot handed it out
    """Recorded (committed) outcomes, by index."""
    _held: set[int] = field(init=False)  # an entry is being replicated: never dispatch again
    _lost_for_good: list[bytes] = field(init=False)
    _made: dict[bytes, Outcome] = field(init=False)  # entries made here, not yet applied

    def __post_init__(self) -> None:
        self.subtasks = [Subtask(i) for i in range(len(self.inputs))]
        self._pending = [(0.0, i) for i in range(len(self.inputs))]
        self.outcomes = {}
        self._held = set()
        self._made = {}
        self._lost_for_good = []

    # ---- what the coordinator asks --------------------------------------------------

    @property
    def total(self) -> int:
        return len(self.subtasks)

    def finished(self) -> bool:
        return self.done + self.failed >= self.total

    def batch_size(self, worker_slots: int) -> int:
        """Subtasks per attempt: the submission's ``batch``, or about a 32nd of a worker's
        fair share, at least 1 and at most ``MAX_BATCH``."""
        if self.submission.batch:
            return min(MAX_BATCH, self.submission.batch)
        share = self.total // max(1, worker_slots)
        return max(1, min(MAX_BATCH, 64, share // 32))

    def next_ready(self) -> float | None:
        """When the next pending subtask may be dispatched (None: none pending)."""
        self._drop_stale()
        return self._pending[0][0] if self._pending else None

    def take(self, n: int, *, worker: bytes, now: float, others: bool = False) -> list[WorkItem]:
        """Up to ``n`` ready subtasks for ``worker``, now RUNNING there. With ``others`` (other
        workers have room) a subtask whose last attempt failed on ``worker`` is left for them."""
        items: list[WorkItem] = []
        skipped: list[tuple[float, int]] = []
        while self._pending and len(items) < n:
            ready_at, index = self._pending[0]
            if ready_at > now:
                break
            heapq.heappop(self._pending)
            sub = self.subtasks[index]
            if sub.state is not SubtaskState.PENDING or index in self._held:
                continue
            if others and sub.avoid == worker and len(skipped) < n:
                skipped.append((ready_at, index))
                continue
            self._set(sub, SubtaskState.RUNNING)
            sub.attempts += 1
            sub.worker = worker
            items.append(WorkItem(index=index, input=self.inputs[index]))
        for entry in skipped:
            heapq.heappush(self._pending, entry)
        return items

    def on_outcomes(self, outcomes: Iterable[Outcome], *, worker: bytes, now: float) -> list[bytes]:
        """An attempt's outcomes: the log entries to replicate (successes, final failures);
        retryable failures go back to PENDING. The first result of an index wins: later ones
        (a slow worker's duplicate) are dropped."""
        entries: list[bytes] = []
        for outcome in outcomes:
            if not 0 <= outcome.index < self.total or outcome.index in self._held:
                continue
            sub = self.subtasks[outcome.index]
            if sub.state in (SubtaskState.DONE, SubtaskState.FAILED):
                continue
            mine = sub.state is SubtaskState.RUNNING and sub.worker == worker
            if outcome.ok or not (mine and self._retry(sub, outcome.failure, worker=worker, now=now)):
                if not outcome.ok and not mine:
                    continue  # a stale attempt's failure: the current attempt decides
                self._held.add(outcome.index)  # until its entry commits: never dispatched again
                recorded = Outcome(index=outcome.index, ok=outcome.ok, value=outcome.value,
                                   failure=outcome.failure, attempts=min(max(1, sub.attempts), 0xFFFF),
                                   worker=worker)
                entry = encode_struct(recorded)
                self._made[entry] = recorded  # apply() needs no decode of our own entries
                entries.append(entry)
        return entries

    def on_lost(self, indices: Iterable[int], *, worker: bytes, reason: str, now: float) -> None:
        """An attempt whose lease ran out, or that its worker refused: its unfinished subtasks
        run again (a lost attempt spends a retry only after the first loss)."""
        failure = Failure(type="WorkerLost", message=reason[:4096])
        for index in indices:
            if not 0 <= index < self.total or index in self._held:
                continue
            sub = self.subtasks[index]
            if sub.state is not SubtaskState.RUNNING or sub.worker != worker:
                continue
            sub.lost += 1
            if not self._retry(sub, failure, worker=worker, now=now, lost=True):
                self._held.add(index)
                self._lost_for_good.append(encode_struct(Outcome(
                    index=index, ok=False, failure=failure, attempts=min(sub.attempts, 0xFFFF),
                    worker=worker)))

    def take_lost_entries(self) -> list[bytes]:
        """Log entries for subtasks ``on_lost`` failed for good (their retries spent)."""
        entries, self._lost_for_good = self._lost_for_good, []
        return entries

    def _retry(self, sub: Subtask, failure: Failure | None, *, worker: bytes, now: float,
               lost: bool = False) -> bool:
        """``sub`` back to PENDING after a backoff if it has an attempt left."""
        spent = sub.attempts - (1 if lost and sub.lost == 1 else 0)
        if spent > self.submission.retries:
            return False
        self._set(sub, SubtaskState.PENDING)
        sub.failure = failure
        sub.avoid = worker
        self.retried += 1
        delay = 0.0 if lost else min(MAX_BACKOFF_S, BASE_BACKOFF_S * 2 ** max(0, sub.attempts - 1))
        heapq.heappush(self._pending, (now + delay, sub.index))
        return True

    def requeue_running(self, *, now: float) -> None:
        """After a takeover: every RUNNING subtask (of attempts the new coordinator does not
        know) runs again; entries not committed are forgotten (they were never counted)."""
        self._held.clear()
        self._made.clear()
        for sub in self.subtasks:
            if sub.state is SubtaskState.RUNNING:
                self._set(sub, SubtaskState.PENDING)
                heapq.heappush(self._pending, (now, sub.index))

    def _set(self, sub: Subtask, state: SubtaskState) -> None:
        """Change a subtask's state, keeping the counters true."""
        for s, delta in ((sub.state, -1), (state, 1)):
            if s is SubtaskState.RUNNING:
                self.running += delta
            elif s is SubtaskState.DONE:
                self.done += delta
            elif s is SubtaskState.FAILED:
                self.failed += delta
        sub.state = state

    # ---- the log ----------------------------------------------------------------------

    def apply(self, entry: bytes) -> bool:
        """Record a committed (or replayed) entry; False if its index was recorded already."""
        outcome = self._made.pop(entry, None) or decode_struct(Outcome, entry, what="map log entry")
        if not 0 <= outcome.index < self.total or outcome.index in self.outcomes:
            return False
        sub = self.subtasks[outcome.index]
        self._held.discard(outcome.index)
        self.outcomes[outcome.index] = outcome
        self.retried_recorded += max(0, outcome.attempts - 1)
        self._set(sub, SubtaskState.DONE if outcome.ok else SubtaskState.FAILED)
        sub.worker = outcome.worker
        sub.failure = outcome.failure
        sub.attempts = max(sub.attempts, outcome.attempts)
        return True

    def cancel(self) -> None:
        """Every subtask not recorded fails for good as Cancelled (nothing more is logged)."""
        failure = Failure(type="Cancelled", message="the task was cancelled")
        for sub in self.subtasks:
            if sub.index not in self.outcomes:
                self._set(sub, SubtaskState.FAILED)
                sub.failure = failure
                self.outcomes[sub.index] = Outcome(index=sub.index, ok=False, failure=failure,
                                                   attempts=min(sub.attempts, 0xFFFF))
        self._pending.clear()
        self._held.clear()
        self._made.clear()

    def plan(self, able: Sequence[bytes], *, task_id: bytes, epoch: int, now: float) -> str:
        return ""  # independent subtasks: any able worker takes any ready one

    def on_progress(self, worker: bytes, data: bytes) -> bool:
        return False

    def summary_progress(self) -> bytes:
        return b""

    def report(self, index: int) -> SubtaskReport:
        sub = self.subtasks[index]
        return SubtaskReport(index=index, state=sub.state, attempts=min(sub.attempts, 0xFFFF),
                             worker=sub.worker, failure=sub.failure)

    def _drop_stale(self) -> None:
        while self._pending and self.subtasks[self._pending[0][1]].state is not SubtaskState.PENDING:
            heapq.heappop(self._pending)
