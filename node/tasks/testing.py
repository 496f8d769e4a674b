"""Task engines in one process on virtual time: the harness of the task tests and of
``python -m simulations tasks``. N real ``TaskEngine`` cores (the node's code path), the real
message codecs (every message is encoded and decoded on its way), a seeded network with
latency, jitter and loss, simulated workers, and scripted crashes and joins.

Workers: a ``RunAttempt`` runs its items one after another on one of the node's ``slots``,
each taking ``duration(index)`` virtual seconds, with a seeded chance ``fail_rate`` of raising;
the function is ``x -> 2x`` on integer inputs. A crashed node stops: its engine gets nothing
more and its messages in flight are dropped. Membership (``set_members``) changes for every
running node at once ``detect_s`` after a crash or a start, and only then: until its news
arrives a crashed node stays in every view, and a joining node has none and is in none.

``check_exactly_once`` verifies, on the task's final coordinator, that every subtask has
exactly one recorded outcome and every success is right; ``duplicates`` counts the subtasks
that two holders of the task (live or crashed, coordinators or replicas, at any epoch)
recorded with different outcomes: a result recorded twice.

Scheduling is one event heap plus one timer heap of ``(deadline, node)``: after every input to
a node (``_drain``) its engine's ``next_deadline`` is read once and re-armed when it moved, so
a step costs the nodes it touches, not all of them. Timers due at the same instant fire in
node start order after the events of that instant. ``after_input`` (if set) is called with the
node after each of its inputs, so a scenario can watch a record without polling every node.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from node.tasks.coordinator import KIND_ENTRY, CoordinatorSettings, TaskRecord, Worker
from node.tasks.engine import AbortAttempts, RunAttempt, TaskChanged, TaskEngine, TaskSettings
from protocol.messages.tasks import (
    TERMINAL_STATES,
    Failure,
    Outcome,
    Submission,
    TaskSeed,
    TaskSummary,
    decode_struct,
    encode_struct,
    inputs_digest,
    pack_value,
    task_id_of,
    unpack_value,
)
from protocol.schema import Message, decode_body, encode_body


@dataclass
class SimConfig:
    nodes: int = 5
    slots: int = 2
    latency_s: float = 0.001
    jitter_s: float = 0.0005
    loss: float = 0.0
    detect_s: float = 1.0
    duration: Callable[[int], float] = lambda index: 0.01
    fail_rate: float = 0.0
    seed: int = 1
    settings: TaskSettings = field(default_factory=lambda: TaskSettings(
        coordinator=CoordinatorSettings(lease_s=2.0, replicate_retry_s=0.5)))


def node_id(i: int) -> bytes:
    return hashlib.sha256(b"sim node %d" % i).digest()


def make_seed(count: int, **fields: Any) -> tuple[TaskSeed, Submission, bytes]:
    """A map task of ``sim:double`` over inputs ``0..count-1``; ``fields`` override the
    submission's (retries, batch, resources, nonce as an int...). Engines do not check the
    signature (the service does), so it is zeros."""
    inputs = tuple(pack_value(i) for i in range(count))
    nonce = int(fields.pop("nonce", 0)).to_bytes(16, "big")
    fields.setdefault("created", 1.0)
    submission = Submission(function="sim:double", inputs_digest=inputs_digest(inputs), count=count,
                            submitter=b"\x01" * 32, nonce=nonce, **fields)
    body = encode_struct(submission)
    return TaskSeed(body=body, signature=b"\x00" * 64, inputs=inputs), submission, task_id_of(body)


class TaskMesh:
    """The simulated mesh (module docstring)."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.now = 0.0
        self.engines: dict[bytes, TaskEngine] = {}
        self.alive: set[bytes] = set()
        self.visible: set[bytes] = set()
        """The members the views show: started ``detect_s`` ago and not seen crashed."""
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._timers: list[tuple[float, int, bytes]] = []  # (deadline, start order, node)
        self._armed: dict[bytes, float] = {}  # the deadline each node's timer entry holds
        self._order: dict[bytes, int] = {}  # node -> start order (the timers' tie-break)
        self._holders: dict[bytes, dict[bytes, None]] = {}  # task -> nodes that held a record
        self._view: tuple[int, list[Worker]] = (-1, [])
        self._membership = 0  # bumped by every change of ``visible``
        self.after_input: Callable[[bytes], None] | None = None
        self._busy: dict[bytes, int] = {}  # slots in use per node
        self._queue: dict[bytes, list[RunAttempt]] = {}
        self.aborted: set[tuple[bytes, int]] = set()
        self.messages = 0
        self.bytes = 0
        self.by_type: dict[str, int] = {}
        self.bytes_by_type: dict[str, int] = {}
        self.executions: dict[int, int] = {}
        self.changes = 0
        self.slots: dict[bytes, int] = {}
        for i in range(config.nodes):
            self.add_node(i, at=0.0, announce=False)
        for engine in self.engines.values():
            self._views(engine)

    # ---- scheduling -------------------------------------------------------------------

    def at(self, when: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, action))

    def run_until(self, done: Callable[[], bool], *, limit_s: float = 3600.0) -> bool:
        """Advance virtual time until ``done()`` or ``limit_s``; True if done."""
        while not done():
            when = self._next_time()
            if when is None or when > limit_s:
                return False
            self.now = max(self.now, when)
            self._fire_due()
        return True

    def _next_time(self) -> float | None:
        timers = self._timers
        while timers and self._armed.get(timers[0][2]) != timers[0][0]:
            heapq.heappop(timers)  # stale: re-armed since, or crashed
        if not timers:
            return self._heap[0][0] if self._heap else None
        return min(timers[0][0], self._heap[0][0]) if self._heap else timers[0][0]

    def _fire_due(self) -> None:
        while self._heap and self._heap[0][0] <= self.now:
            _, _, action = heapq.heappop(self._heap)
            action()
        due: list[bytes] = []
        timers = self._timers
        while timers and timers[0][0] <= self.now:
            deadline, _, n = heapq.heappop(timers)
            if self._armed.get(n) == deadline:
                del self._armed[n]
                due.append(n)
        for n in due:  # each once per instant, as when every engine was polled
            if n in self.alive:
                self.engines[n].handle_timer(now=self.now)
                self._drain(n)

    def _arm(self, nid: bytes) -> None:
        """Re-read ``nid``'s next deadline after an input; push it when it moved."""
        d = self.engines[nid].next_deadline()
        if d is None:
            self._armed.pop(nid, None)
        elif self._armed.get(nid) != d:
            self._armed[nid] = d
            heapq.heappush(self._timers, (d, self._order[nid], nid))

    # ---- nodes ------------------------------------------------------------------------

    def add_node(self, i: int, *, at: float, announce: bool = True, slots: int | None = None) -> bytes:
        """Start node ``i`` (with ``slots`` worker slots, default the config's) now; every
        member view includes it from ``at + detect_s`` on (from now on without ``announce``)."""
        nid = node_id(i)
        self.slots[nid] = self.config.slots if slots is None else slots
        engine = TaskEngine(self_id=nid, rng=random.Random(self.rng.random()), settings=self.config.settings)
        self.engines[nid] = engine
        self.alive.add(nid)
        self._order.setdefault(nid, len(self._order))
        if announce:
            self.at(at + self.config.detect_s, self._seen(nid, alive=True))
        else:
            self.visible.add(nid)
            self._membership += 1
        return nid

    def crash(self, nid: bytes) -> None:
        """Stop ``nid`` now (nothing if it is not running); the views drop it ``detect_s`` later."""
        if nid not in self.alive:
            return
        self.alive.discard(nid)
        self._armed.pop(nid, None)
        self._queue.pop(nid, None)
        self._busy.pop(nid, None)
        self.at(self.now + self.config.detect_s, self._seen(nid, alive=False))

    def _seen(self, nid: bytes, *, alive: bool) -> Callable[[], None]:
        def seen() -> None:
            """Membership news about ``nid`` reaches every running node at once."""
            if alive and nid in self.alive:
                self.visible.add(nid)
            elif not alive:
                self.visible.discard(nid)
            self._membership += 1
            for other in sorted(self.alive):  # not set order: hashes of bytes vary per process
                self._refresh(other)
        return seen

    def _refresh(self, nid: bytes) -> None:
        if nid in self.alive:
            self._views(self.engines[nid])
            self._drain(nid)

    def _views(self, engine: TaskEngine) -> None:
        """The members as the nodes know them: started and not seen crashed (``visible``),
        one list per membership, shared by every node."""
        if self._view[0] != self._membership:
            self._view = (self._membership, [Worker(node_id=n, cpus=float(self.slots[n]), gpus=0, memory_mb=0)
                                             for n in sorted(self.visible)])
        engine.set_members(self._view[1], now=self.now)

    # ---- traffic ----------------------------------------------------------------------

    def _drain(self, nid: bytes) -> None:
        engine = self.engines[nid]
        for send in engine.messages_to_send():
            self._transmit(nid, send.dest, send.message)
        while (event := engine.next_event()) is not None:
            if isinstance(event, RunAttempt):
                self._queue.setdefault(nid, []).append(event)
            elif isinstance(event, AbortAttempts):
                self.aborted.update((event.task_id, a) for a in event.attempts)
            elif isinstance(event, TaskChanged):
                self.changes += 1
                self._holders.setdefault(event.task_id, {})[nid] = None
        self._start_work(nid)
        self._arm(nid)
        if self.after_input is not None:
            self.after_input(nid)

    def _transmit(self, src: bytes, dst: bytes, msg: Message) -> None:
        body = encode_body(msg)
        name = type(msg).__name__
        self.messages += 1
        self.bytes += len(body)
        self.by_type[name] = self.by_type.get(name, 0) + 1
        self.bytes_by_type[name] = self.bytes_by_type.get(name, 0) + len(body)
        if self.config.loss and self.rng.random() < self.config.loss:
            return
        delay = self.config.latency_s + self.rng.random() * self.config.jitter_s

        def deliver() -> None:
            if src in self.alive and dst in self.alive:
                self.engines[dst].on_message(src, decode_body(body), now=self.now)
                self._drain(dst)

        self.at(self.now + delay, deliver)

    def _start_work(self, nid: bytes) -> None:
        queue = self._queue.get(nid)
        while queue and self._busy.get(nid, 0) < max(1, self.slots[nid]):
            run = queue.pop(0)
            self._busy[nid] = self._busy.get(nid, 0) + 1
            items = run.assign.items
            total = sum(self.config.duration(i.index) for i in items)
            outcomes = []
            for item in items:
                self.executions[item.index] = self.executions.get(item.index, 0) + 1
                if self.config.fail_rate and self.rng.random() < self.config.fail_rate:
                    outcomes.append(Outcome(index=item.index, ok=False,
                                            failure=Failure(type="ValueError", message="injected")))
                else:
                    outcomes.append(Outcome(index=item.index, ok=True,
                                            value=pack_value(2 * unpack_value(item.input))))

            def finish(run: RunAttempt = run, outcomes: list[Outcome] = outcomes) -> None:
                if nid not in self.alive:
                    return
                self._busy[nid] -= 1
                if (run.task_id, run.assign.attempt) not in self.aborted:
                    self.engines[nid].attempt_done(run.task_id, run.assign.attempt, outcomes, now=self.now)
                self._drain(nid)

            self.at(self.now + total, finish)

    # ---- tasks ------------------------------------------------------------------------

    def submit(self, count: int, *, via: bytes | None = None, **kw: Any) -> bytes:
        """Create a task on its rendezvous coordinator (as an entry node would); its id."""
        seed, submission, task_id = make_seed(count, **kw)
        entry = self.engines[via or sorted(self.alive)[0]]
        coordinator = next(n for n in entry.chain(task_id) if n in self.alive)
        self.engines[coordinator].create(seed, submission, task_id, now=self.now)
        self._drain(coordinator)
        return task_id

    def coordinator_of(self, task_id: bytes) -> bytes | None:
        """The live node that coordinates ``task_id`` under the highest ballot."""
        best = None
        for n in self.holders(task_id):
            rec = self.engines[n].records.get(task_id)
            if rec is not None and rec.is_coordinator and (best is None or rec.outranks(
                    self.engines[best].records[task_id].ballot)):
                best = n
        return best

    def holders(self, task_id: bytes, *, crashed: bool = False) -> list[bytes]:
        """The live nodes holding a record of ``task_id`` (with ``crashed``, the crashed
        ones that held one too), in the order they got it."""
        return [n for n in self._holders.get(task_id, ()) if (crashed or n in self.alive)
                and task_id in self.engines[n].records]

    def lead(self, task_id: bytes) -> bytes:
        """``coordinator_of``, which must exist."""
        node = self.coordinator_of(task_id)
        if node is None:
            raise AssertionError("no live coordinator")
        return node

    def record(self, task_id: bytes) -> TaskRecord:
        """The final coordinator's record of ``task_id``."""
        return self.engines[self.lead(task_id)].records[task_id]

    def summary(self, task_id: bytes) -> TaskSummary | None:
        c = self.coordinator_of(task_id)
        return None if c is None else self.engines[c].summary(task_id)

    def finished(self, task_id: bytes) -> bool:
        s = self.summary(task_id)
        return s is not None and s.state in TERMINAL_STATES

    def check_exactly_once(self, task_id: bytes) -> list[str]:
        """What is wrong with the final coordinator's results (empty: nothing)."""
        c = self.coordinator_of(task_id)
        if c is None:
            return ["no live coordinator"]
        kind = self.engines[c].records[task_id].kind
        problems = []
        if len(kind.outcomes) != kind.total:
            problems.append(f"{kind.total - len(kind.outcomes)} subtasks have no recorded outcome")
        for index, outcome in kind.outcomes.items():
            if outcome.index != index:
                problems.append(f"outcome for {outcome.index} recorded at {index}")
            if outcome.ok and unpack_value(outcome.value) != 2 * index:
                problems.append(f"subtask {index}: wrong value {unpack_value(outcome.value)!r}")
        if kind.done + kind.failed != kind.total:
            problems.append(f"counters {kind.done}+{kind.failed} != {kind.total}")
        return problems

    def duplicates(self, task_id: bytes) -> int:
        """Subtasks two holders of ``task_id`` (live or crashed, any role, any epoch) recorded
        with different outcomes: each would be a result recorded twice (0: none)."""
        first: dict[int, Outcome] = {}
        twice: set[int] = set()
        for n in self.holders(task_id, crashed=True):
            for index, outcome in self.engines[n].records[task_id].kind.outcomes.items():
                seen = first.setdefault(index, outcome)
                if seen is not outcome and seen != outcome:
                    twice.add(index)
        return len(twice)

    def log_duplicates(self, task_id: bytes) -> int:
        """Entries of the final coordinator's log for an index that an earlier entry already
        had: late or repeated results that ``apply`` ignored (allowed, not recorded twice)."""
        seen: set[int] = set()
        extra = 0
        for entry in self.record(task_id).log:
            if entry[:1] == bytes([KIND_ENTRY]):
                index = decode_struct(Outcome, entry[1:], what="map log entry").index
                extra += index in seen
                seen.add(index)
        return extra
