"""Task engines in one process on virtual time: the harness of the task tests and of
``python -m simulations tasks``. N real ``TaskEngine`` cores (the node's code path), the real
message codecs (every message is encoded and decoded on its way), a seeded network with
latency, jitter and loss, simulated workers, and scripted crashes and joins.

Workers: a ``RunAttempt`` runs its items one after another on one of the node's ``slots``,
each taking ``duration(index)`` virtual seconds, with a seeded chance ``fail_rate`` of raising;
the function is ``x -> 2x`` on integer inputs. A crashed node stops: its engine gets nothing
more and its messages in flight are dropped; the others see it gone after ``detect_s``
(``set_members``). A joining node gets every member view ``detect_s`` after it starts.

``check_exactly_once`` verifies, on the task's final coordinator, that every subtask has
exactly one recorded outcome and every success is right; ``recorded`` counts the records
that ``apply`` accepted per index across the run (a second acceptance would be a duplicate).
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from node.tasks.coordinator import CoordinatorSettings, TaskRecord, Worker
from node.tasks.engine import AbortAttempts, RunAttempt, TaskChanged, TaskEngine, TaskSettings
from protocol.messages.tasks import (
    TERMINAL_STATES,
    Failure,
    Outcome,
    Submission,
    TaskSeed,
    TaskSummary,
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
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._busy: dict[bytes, int] = {}  # slots in use per node
        self._queue: dict[bytes, list[RunAttempt]] = {}
        self.aborted: set[tuple[bytes, int]] = set()
        self.messages = 0
        self.bytes = 0
        self.by_type: dict[str, int] = {}
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
        times = [self._heap[0][0]] if self._heap else []
        times.extend(d for n in self.alive if (d := self.engines[n].next_deadline()) is not None)
        return min(times) if times else None

    def _fire_due(self) -> None:
        while self._heap and self._heap[0][0] <= self.now:
            _, _, action = heapq.heappop(self._heap)
            action()
        for n in list(self.alive):
            engine = self.engines[n]
            d = engine.next_deadline()
            if d is not None and d <= self.now:
                engine.handle_timer(now=self.now)
                self._drain(n)

    # ---- nodes ------------------------------------------------------------------------

    def add_node(self, i: int, *, at: float, announce: bool = True, slots: int | None = None) -> bytes:
        """Start node ``i`` (with ``slots`` worker slots, default the config's) at ``at``."""
        nid = node_id(i)
        self.slots[nid] = self.config.slots if slots is None else slots
        engine = TaskEngine(self_id=nid, rng=random.Random(self.rng.random()), settings=self.config.settings)
        self.engines[nid] = engine
        self.alive.add(nid)
        if announce:
            for other in list(self.alive):
                self.at(at + self.config.detect_s, self._refresher(other))
        return nid

    def crash(self, nid: bytes) -> None:
        """Stop ``nid`` now (nothing if it is not running)."""
        if nid not in self.alive:
            return
        self.alive.discard(nid)
        self._queue.pop(nid, None)
        self._busy.pop(nid, None)
        for other in list(self.alive):
            self.at(self.now + self.config.detect_s, self._refresher(other))

    def _refresher(self, nid: bytes) -> Callable[[], None]:
        return lambda: self._refresh(nid)

    def _refresh(self, nid: bytes) -> None:
        if nid in self.alive:
            self._views(self.engines[nid])
            self._drain(nid)

    def _views(self, engine: TaskEngine) -> None:
        workers = [Worker(node_id=n, cpus=float(self.slots[n]), gpus=0, memory_mb=0)
                   for n in sorted(self.alive)]
        engine.set_members(workers, now=self.now)

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
        self._start_work(nid)

    def _transmit(self, src: bytes, dst: bytes, msg: Message) -> None:
        body = encode_body(msg)
        self.messages += 1
        self.bytes += len(body)
        self.by_type[type(msg).__name__] = self.by_type.get(type(msg).__name__, 0) + 1
        if self.config.loss and self.rng.random() < self.config.loss:
            return
        delay = self.config.latency_s + self.rng.random() * self.config.jitter_s

        def deliver() -> None:
            if src in self.alive and dst in self.alive:
                self.engines[dst].on_message(src, decode_body(body), now=self.now)
                self._drain(dst)

        self.at(self.now + delay, deliver)

    def _start_work(self, nid: bytes) -> None:
        queue = self._queue.get(nid, [])
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
        for n in self.alive:
            rec = self.engines[n].records.get(task_id)
            if rec is not None and rec.is_coordinator and (best is None or rec.outranks(
                    self.engines[best].records[task_id].ballot)):
                best = n
        return best

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
