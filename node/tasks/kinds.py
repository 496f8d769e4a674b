"""What a coordinator needs of a kind of task, and the kinds there are.

The coordinator (``node.tasks.coordinator.TaskRecord``) owns everything every kind shares:
ballots, the replicated log and its commit point, leases renewed by heartbeats, workers and
their load. A *kind* owns what its work is: how it splits into units, which are ready, what an
outcome means, and what goes into the log (opaque bytes to the coordinator, replayed by
``apply`` on a successor). The "map" kind (``node.tasks.mapkind``) is independent subtasks;
the "train" kind (``node.training.trainkind``) is a training job: segments of steps, each
trained by a group the coordinator commits (``plan``) and whose workers report live figures
on their heartbeats (``on_progress``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from node.tasks.mapkind import MapKind
from node.training.trainkind import TrainKind
from protocol.messages.tasks import Outcome, Submission, SubtaskReport, WorkItem


class Kind(Protocol):
    """One task's kind-specific state (see the module docstring)."""

    @property
    def total(self) -> int: ...

    done: int
    failed: int
    running: int
    retried: int
    retried_recorded: int
    outcomes: dict[int, Outcome]
    stale_outcomes: bool
    """Whether outcomes of attempts this coordinator did not hand out (an earlier ballot's) are
    taken: yes for independent subtasks, no for a training job's seats (a deposed plan's)."""

    def finished(self) -> bool: ...

    def batch_size(self, worker_slots: int) -> int: ...

    def next_ready(self) -> float | None: ...

    def take(self, n: int, *, worker: bytes, now: float, others: bool = False) -> list[WorkItem]: ...

    def on_outcomes(self, outcomes: Iterable[Outcome], *, worker: bytes, now: float) -> list[bytes]: ...

    def on_lost(self, indices: Iterable[int], *, worker: bytes, reason: str, now: float) -> None: ...

    def take_lost_entries(self) -> list[bytes]: ...

    def requeue_running(self, *, now: float) -> None: ...

    def apply(self, entry: bytes) -> bool: ...

    def cancel(self) -> None: ...

    def report(self, index: int) -> SubtaskReport: ...

    def plan(self, able: Sequence[bytes], *, task_id: bytes, epoch: int, now: float) -> str:
        """Before handing out work: ``able`` are the members that may take it. Returns why the
        kind waits ("" when it does not)."""
        ...

    def on_progress(self, worker: bytes, data: bytes) -> bool:
        """A worker's heartbeat figures (soft state); whether they were taken."""
        ...

    def summary_progress(self) -> bytes:
        """The live figures for ``TaskSummary.progress`` (at most ``MAX_PROGRESS_BYTES``)."""
        ...


#: Kind name (``Submission.kind``) -> how to build its state from the signed submission and inputs.
KINDS: dict[str, Callable[[Submission, Sequence[bytes]], Kind]] = {"map": MapKind, "train": TrainKind}
