"""What a coordinator needs of a kind of task, and the kinds there are.

The coordinator (``node.tasks.coordinator.TaskRecord``) owns everything every kind shares:
ballots, the replicated log and its commit point, leases renewed by heartbeats, workers and
their load. A *kind* owns what its work is: how it splits into units, which are ready, what an
outcome means, and what goes into the log (opaque bytes to the coordinator, replayed by
``apply`` on a successor). The "map" kind (``node.tasks.mapkind``) is independent subtasks; a
training job will be another kind on the same coordinator (long-lived workers scheduled
together, per-round commits), registered in ``KINDS``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from node.tasks.mapkind import MapKind
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


#: Kind name (``Submission.kind``) -> how to build its state from the signed submission and inputs.
KINDS: dict[str, Callable[[Submission, Sequence[bytes]], Kind]] = {"map": MapKind}
