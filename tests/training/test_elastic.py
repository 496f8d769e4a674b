"""Elastic training groups (PROTOCOL.md §15, **Elastic groups**): the pure rules of
``node.training.elastic`` as properties, then the "train" kind (``node.training.trainkind``)
driven to each job's end on virtual time by seeded join, leave, crash and takeover schedules,
with the data behind every committed update counted exactly (``Mesh``)."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.placement import rank
from node.training import elastic
from node.training.trainkind import SEGMENT_ENTRY, TrainKind
from protocol.messages.tasks import Outcome, Submission, decode_struct, encode_struct, inputs_digest
from protocol.messages.training import (
    MAX_GROUP,
    GroupChange,
    JobSpec,
    Seat,
    SeatReport,
    SegmentRecord,
    ShardCursor,
)

TASK = b"e" * 16
DERANDOMIZED = settings(derandomize=True, database=None, deadline=None, max_examples=200)


def node(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(4, "big"), digest_size=32).digest()


def submission(spec: Mapping[str, object], retries: int = 30) -> tuple[Submission, list[bytes]]:
    inputs = [encode_struct(JobSpec(**spec))]  # type: ignore[arg-type]
    sub = Submission(kind="train", function="node.training.runner.charlm:make_job",
                     inputs_digest=inputs_digest(inputs), count=1, retries=retries,
                     submitter=b"k" * 32, created=1.0, nonce=b"n" * 16)
    return sub, inputs


# ---- the pure rules ------------------------------------------------------------------


@DERANDOMIZED
@given(batch=st.integers(0, 300), workers=st.integers(1, 40))
def test_shares_split_the_batch_as_evenly_as_possible(batch: int, workers: int) -> None:
    got = elastic.shares(batch, workers)
    assert len(got) == workers
    if batch == 0:
        assert got == (1,) * workers
    else:
        assert sum(got) == batch and max(got) - min(got) <= 1
        assert list(got) == sorted(got, reverse=True)  # the first batch % W ranks get the extra one


def test_shares_table() -> None:
    assert elastic.shares(8, 3) == (3, 3, 2)
    assert elastic.shares(2, 3) == (1, 1, 0)  # admit's cap keeps W <= batch: no such share is planned
    assert elastic.shares(0, 3) == (1, 1, 1)
    assert elastic.shares(5, 0) == ()


@st.composite
def reading(draw: st.DrawFn) -> tuple[list[int], dict[int, int], int, int]:
    order = draw(st.permutations(range(12)).map(lambda p: list(p[: draw(st.integers(1, 12))])))
    positions = {k: draw(st.integers(0, 50)) for k in order}
    return order, positions, draw(st.integers(0, 7)), draw(st.integers(0, 12))


@DERANDOMIZED
@given(case=reading())
def test_step_reads_iterated_is_advance_in_closed_form(case: tuple[list[int], dict[int, int], int, int]) -> None:
    order, start, share, steps = case
    positions = dict(start)
    reads = [elastic.step_reads(order, positions, share, i) for i in range(steps)]
    assert positions == elastic.advance(order, start, share, steps)
    assert all(len(step) == share for step in reads)
    flat = [mb for step in reads for mb in step]
    assert [shard for shard, _ in flat] == [order[j % len(order)] for j in range(steps * share)]
    for shard in order:  # each shard read on from its start, no position twice, none skipped
        assert [p for k, p in flat if k == shard] == list(range(start[shard], positions[shard]))


def test_advance_of_no_shards_and_of_missing_positions() -> None:
    assert elastic.advance([], {}, 3, 4) == {}
    assert elastic.advance([2, 5], {}, 3, 1) == {2: 2, 5: 1}


@DERANDOMIZED
@given(shards=st.integers(1, 64), active=st.integers(1, 64))
def test_deal_partitions_the_shards_round_robin(shards: int, active: int) -> None:
    dealt = elastic.deal(shards, active)
    assert len(dealt) == active
    assert sorted(k for mine in dealt for k in mine) == list(range(shards))
    assert all(k % active == r for r, mine in enumerate(dealt) for k in mine)
    if active <= shards:
        assert min(map(len, dealt)) >= 1 and max(map(len, dealt)) - min(map(len, dealt)) <= 1


@st.composite
def admissions(draw: st.DrawFn) -> tuple[list[bytes], list[bytes], int, int, int, bool]:
    ids = [node(i) for i in range(draw(st.integers(0, 12)))]
    cut = draw(st.integers(0, len(ids)))
    workers_min = draw(st.integers(1, 6))
    batch = draw(st.integers(0, 20))
    cap = draw(st.integers(0, 10))
    if batch:
        cap = min(cap, batch)  # the caller's cap includes the batch (``TrainKind.plan``)
    return ids[:cut], ids[cut:], workers_min, cap, batch, draw(st.booleans())


@DERANDOMIZED
@given(case=admissions())
def test_admit(case: tuple[list[bytes], list[bytes], int, int, int, bool]) -> None:
    incumbents, newcomers, workers_min, cap, batch, listen = case
    got = elastic.admit(incumbents, newcomers, workers_min=workers_min, cap=cap, batch=batch, listen=listen)
    able = min(cap, len(incumbents) + len(newcomers))
    if able < max(1, workers_min):
        assert got is None
        return
    assert got is not None
    kept = incumbents[:cap]
    room = newcomers[: cap - len(kept)]
    assert len(got.group) <= cap and len(set(got.group)) == len(got.group)
    assert got.group[: len(kept)] == tuple(kept)  # incumbents keep their ranks, in order
    n_active = len(got.active)
    assert got.group[:n_active] == got.active and got.shares[n_active:] == (0,) * len(got.listeners)
    assert got.shares[:n_active] == elastic.shares(batch, n_active) and min(got.shares[:n_active]) > 0
    if not listen:  # the first segment: everyone active
        assert got.active == tuple(kept + room) and not got.listeners and not got.blocking
    elif len(kept) >= workers_min:  # newcomers listen
        assert got.active == tuple(kept) and got.listeners == tuple(room) and not got.blocking
    else:  # just enough newcomers to train enter with a share, blocking; the rest listen
        need = workers_min - len(kept)
        assert got.active == tuple(kept + room[:need]) and got.blocking == frozenset(room[:need])
        assert got.listeners == tuple(room[need:])


def test_admit_table() -> None:
    a, b, c, d = (node(i) for i in range(4))
    got = elastic.admit([a, b], [c, d], workers_min=2, cap=4, batch=6, listen=True)
    assert got is not None and got.group == (a, b, c, d) and got.shares == (3, 3, 0, 0)
    got = elastic.admit([a], [c, d], workers_min=2, cap=4, batch=6, listen=True)
    assert got is not None and got.shares == (3, 3, 0) and got.blocking == {c} and got.listeners == (d,)
    got = elastic.admit([], [c, d], workers_min=2, cap=3, batch=0, listen=False)
    assert got is not None and got.group == (c, d) and got.shares == (1, 1)
    assert elastic.admit([a], [c, d], workers_min=2, cap=1, batch=6, listen=True) is None
    assert elastic.admit([], [], workers_min=1, cap=4, batch=0, listen=True) is None


# ---- the kind over whole runs --------------------------------------------------------


@dataclass
class Try:
    """One plan's seats as the workers ran them."""

    group: tuple[bytes, ...]
    shares: tuple[int, ...]
    start: int
    end: int
    seats: dict[int, tuple[int, Seat]]  # rank -> (work item index, seat), those handed out
    reads: dict[int, list[list[tuple[int, int]]]] = field(default_factory=dict)  # rank -> per step
    rounds: dict[int, int] = field(default_factory=dict)  # rank -> rounds it contributed to
    reported: set[int] = field(default_factory=set)
    lost: set[int] = field(default_factory=set)
    crash: dict[int, int] = field(default_factory=dict)  # rank -> local steps done when it died
    live: tuple[bytes, ...] = ()  # the members live when it was planned

    @property
    def steps(self) -> int:
        return self.end - self.start


class Mesh:
    """One training job's coordinator and its workers, on virtual time (no torch, no I/O).

    Between segments nodes join and leave; during one, group members crash at a local step
    c (0..steps, steps: after its last round, before its report) or leave before taking their
    seat, and at random points the coordinator is replaced: a fresh ``TrainKind`` from the
    same submission replays the committed log, as ``TaskRecord.lead`` does, and replans. At
    least ``workers_min`` nodes stay live throughout.

    A worker runs its seat as ``node/training/runner/seat.py`` does: with share s > 0 it
    reads local step i's micro-batches with ``elastic.step_reads`` (its cursors' shards in
    order) and reports the cursors it reached; a listener reports no cursors and zero losses;
    every finisher of a try reports the same state digest. The node's all-reduce fills
    ``rounds_of``: sync has one round per step, DiLoCo one at the segment's end; a crashed rank
    contributed to the rounds before its crash; a round with fewer sharing contributors than
    ``min(workers_min, active)`` fails every seat still running.

    ``committed`` is the ground truth the kind must agree with: the micro-batches that went
    into committed updates (the finishers' all, a crashed rank's those of its rounds).
    """

    def __init__(self, seed: int, spec: Mapping[str, object], *, takeovers: bool = True) -> None:
        self.rng = random.Random(seed)
        self.takeovers = takeovers
        self.sub, self.inputs = submission(spec)
        self.k = TrainKind(self.sub, self.inputs)
        self.spec = self.k.spec
        self.log: list[bytes] = []
        self.epoch, self.now, self.made = 1, 0.0, 0
        self.live: list[bytes] = []
        for _ in range(self.spec.workers_min + self.rng.randrange(3)):
            self.join()
        self.committed: Counter[tuple[int, int]] = Counter()
        self.tries: list[Try] = []  # every try, in order
        self.trials: list[Try] = []  # the try behind each record
        self.counts: Counter[str] = Counter()  # what the schedule exercised

    def join(self) -> None:
        self.made += 1
        self.live.append(node(self.made))

    def can_lose(self, n: int = 1) -> bool:
        return len(self.live) - n >= self.spec.workers_min

    # ---- the run

    def run(self) -> None:
        while not self.k.finished():
            assert len(self.tries) < 400, "the job does not converge"
            self.churn()
            if self.takeovers and self.rng.random() < 0.15:
                self.takeover()
            ready = self.k.next_ready()
            assert ready is not None
            self.now = max(self.now, ready)
            assert self.k.plan(self.live, task_id=TASK, epoch=self.epoch, now=self.now) == ""
            self.segment(self.hand_out())
        assert self.k.step == self.spec.steps and self.k.failed == 0
        assert [r.end for r in self.k.records][-1] == self.spec.steps

    def churn(self) -> None:
        if self.rng.random() < 0.4 and len(self.live) < 8:
            self.join()
        if self.rng.random() < 0.2 and self.can_lose():
            self.live.remove(self.rng.choice(self.live))
        self.now += self.rng.uniform(0.0, 1.0)

    def takeover(self) -> None:
        """A successor coordinator: the committed log replayed into a fresh kind, then
        ``requeue_running`` (``TaskRecord.lead``)."""
        old = self.k
        self.k = TrainKind(self.sub, self.inputs)
        assert all(self.k.apply(entry) for entry in self.log)
        self.k.requeue_running(now=self.now)
        assert (self.k.step, self.k.cursors, self.k.state) == (old.step, old.cursors, old.state)
        self.epoch += 1
        self.counts["takeover"] += 1

    def hand_out(self) -> Try:
        """Members take their seats (one may leave first: ``plan`` then loses its seat)."""
        group = self.k.progress().workers
        leaver = None
        if len(group) > 1 and self.rng.random() < 0.1 and self.can_lose():
            leaver = self.rng.choice(group)
        seats: dict[int, tuple[int, Seat]] = {}
        for w in self.live:
            for item in [] if w == leaver else self.k.take(1, worker=w, now=self.now):
                seat = decode_struct(Seat, item.input, what="Seat")
                seats[seat.rank] = (item.index, seat)
        some = seats[min(seats)][1]
        t = Try(some.group, some.shares, self.k.step, some.end, seats, live=tuple(self.live))
        self.check_plan(t)
        if leaver is not None:
            self.live.remove(leaver)
            t.lost.add(t.group.index(leaver))
            assert self.k.plan(self.live, task_id=TASK, epoch=self.epoch, now=self.now) == ""
            self.counts["left before its seat"] += 1
        self.tries.append(t)
        return t

    def check_plan(self, t: Try) -> None:
        s, k = self.spec, self.k
        assert len(t.seats) >= len(t.group) - 1  # every live member (but a leaver) took its seat
        active = [r for r, share in enumerate(t.shares) if share > 0]
        assert active == list(range(len(active))) and len(active) >= s.workers_min  # listeners last
        w = len(active)
        assert list(t.shares[:w]) == [s.batch // w + (r < s.batch % w) if s.batch else 1 for r in range(w)]
        assert len(t.group) <= min(s.workers_max, s.shards, s.batch or MAX_GROUP)
        previous = k.records[-1] if k.records else None
        incumbents = tuple(n for n in (previous.finished if previous else ()) if n in self.live)
        assert t.group[: len(incumbents)] == incumbents
        if previous is not None:  # last segment's listeners, still live, now have a share
            for r, n in enumerate(previous.group):
                if previous.shares[r] == 0 and n in incumbents:
                    assert t.shares[t.group.index(n)] > 0
        else:
            assert not any(share == 0 for share in t.shares)  # the first segment: everyone active
        dealt = elastic.deal(s.shards, len(active))
        for r, (_, seat) in t.seats.items():
            assert (seat.group, seat.shares, seat.start, seat.epoch) == (t.group, t.shares, k.step, self.epoch)
            assert seat.state == k.state and seat.end == min(s.steps, k.step + s.seg)
            mine = dealt[r] if r < len(active) else []
            assert seat.cursors == tuple(ShardCursor(shard=sh, position=k.cursors.get(sh, 0)) for sh in mine)
        progress = k.progress()
        assert progress.workers == t.group and progress.batch == sum(t.shares)
        assert progress.listeners == t.group[len(active):]

    def segment(self, t: Try) -> None:
        """Run the try's seats; deliver reports and losses in time order; commit entries."""
        s, steps = self.spec, t.steps
        crash = t.crash = {r: 0 for r in t.lost}
        for r in t.seats:
            if self.rng.random() < 0.15 and self.can_lose():
                crash[r] = steps if self.rng.random() < 0.25 else self.rng.randint(0, steps)
                self.live.remove(t.group[r])
        for r, (_, seat) in t.seats.items():
            share = t.shares[r]
            order, positions = [c.shard for c in seat.cursors], {c.shard: c.position for c in seat.cursors}
            t.reads[r] = [elastic.step_reads(order, positions, share, i) for i in range(steps)]
        if s.mode == "sync":
            t.rounds = {r: crash.get(r, steps) for r in range(len(t.group))}
            rounds = [sum(1 for r in range(len(t.group)) if t.shares[r] and t.rounds[r] > i) for i in range(steps)]
        else:
            t.rounds = {r: 1 if crash.get(r, steps) == steps else 0 for r in range(len(t.group))}
            rounds = [sum(1 for r in range(len(t.group)) if t.shares[r] and t.rounds[r])]
        active = sum(1 for share in t.shares if share)
        # a segment commits when its rounds had enough trained contributions and an active rank
        # reports (listeners confirm the state; alone they cannot vouch for it)
        ok = min(rounds) >= min(s.workers_min, active) and any(t.shares[r] and r not in crash for r in t.seats)
        digest = hashlib.sha256(f"{self.epoch}:{len(self.tries)}".encode()).digest()
        began = self.now
        events: list[tuple[float, int, int, Outcome | None]] = []
        for r, (index, _) in t.seats.items():
            if r in crash:
                events.append((began + crash[r] + self.rng.uniform(0.0, 3 * steps), r, index, None))
            else:
                events.append((began + steps + self.rng.uniform(0.0, 1.0), r, index, self.outcome(t, r, ok, digest)))
        events.sort(key=lambda e: (e[0], e[1]))
        cut = None  # the coordinator is replaced after this many deliveries
        if self.takeovers and self.rng.random() < 0.15:
            cut = self.rng.randint(0, len(events))
        for i, (at, r, index, outcome) in enumerate(events):
            if i == cut:
                break
            self.now = max(self.now, at)
            worker = t.group[r]
            if outcome is None:
                self.k.on_lost([index], worker=worker, reason="crashed", now=self.now)
                entries = self.k.take_lost_entries()
                t.lost.add(r)
            else:
                entries = self.k.on_outcomes([outcome], worker=worker, now=self.now)
                t.reported.add(r)
            if i + 1 == cut and entries and self.rng.random() < 0.5:
                entries = []  # made, but the coordinator died before replicating it
                self.counts["entry lost"] += 1
            for entry in entries:
                self.commit(entry, t)
        if cut is not None:
            self.takeover()
        elif not ok:
            assert self.k.failure is not None and len(self.k.records) == len(self.trials)
            self.counts["retry"] += 1
        else:
            assert self.trials and self.trials[-1] is t

    def outcome(self, t: Try, r: int, ok: bool, digest: bytes) -> Outcome:
        index, seat = t.seats[r]
        if not ok:
            return Outcome(index=index, ok=False)
        positions = {c.shard: c.position for c in seat.cursors}
        for step in t.reads[r]:
            positions.update((sh, p + 1) for sh, p in step)
        report = SeatReport(
            end=t.end, losses=(1.0 if t.shares[r] else 0.0,) * t.steps, state=digest,
            cursors=tuple(ShardCursor(shard=c.shard, position=positions[c.shard]) for c in seat.cursors),
            rounds_of=tuple(t.rounds[q] for q in range(len(t.group))))
        return Outcome(index=index, ok=True, value=encode_struct(report))

    # ---- commits and what they must say

    def commit(self, entry: bytes, t: Try) -> None:
        assert entry[0] == SEGMENT_ENTRY
        assert self.k.apply(entry)
        self.log.append(entry)
        self.trials.append(t)
        record = decode_struct(SegmentRecord, entry[1:], what="SegmentRecord")
        assert (record.group, record.shares, record.start, record.end) == (t.group, t.shares, t.start, t.end)
        assert record.finished == tuple(t.group[r] for r in sorted(t.reported))
        for r, steps in t.reads.items():  # what went into the committed updates
            used = t.steps if r in t.reported else t.rounds[r] if self.spec.mode == "sync" else t.steps * t.rounds[r]
            self.committed.update(mb for step in steps[:used] for mb in step)
        self.check_accounting()
        self.check_events(record, t)
        self.counts["listener"] += t.shares.count(0)
        self.counts["crash mid-segment"] += sum(1 for c in t.crash.values() if 0 < c < t.steps)
        self.counts["crash after its rounds"] += sum(1 for r, c in t.crash.items() if r in t.seats and c == t.steps)
        if any(t.shares[r] for r in t.reported):
            assert record.losses == (1.0,) * t.steps

    def check_accounting(self) -> None:
        assert max(self.committed.values(), default=1) == 1, "a micro-batch went into two updates"
        for shard in range(self.spec.shards):
            used = sorted(p for sh, p in self.committed if sh == shard)
            assert used == list(range(self.k.cursors.get(shard, 0))), f"shard {shard}"

    def check_events(self, record: SegmentRecord, t: Try) -> None:
        """JOINED for listeners; ACTIVE for a first share after the first segment (after
        listening, or a blocking join); GONE for lost ranks and for finishers of the last
        segment not live at the boundary; all at the segment's start."""
        by = {change: [e.node for e in record.events if e.change == change] for change in GroupChange}
        assert all(e.step == record.start for e in record.events)
        assert by[GroupChange.JOINED] == [n for n, sh in zip(t.group, t.shares, strict=True) if sh == 0]
        previous = self.k.records[-2] if len(self.k.records) > 1 else None
        before = previous.finished if previous else ()
        gone = [t.group[r] for r in t.lost] + [n for n in before if n not in t.live]
        assert sorted(by[GroupChange.GONE]) == sorted(gone)
        assert not by[GroupChange.FAILED]
        listened = [n for n, sh in zip(previous.group, previous.shares, strict=True) if sh == 0] if previous else []
        first = [n for n, sh in zip(t.group, t.shares, strict=True) if sh > 0 and (n not in before or n in listened)]
        assert sorted(by[GroupChange.ACTIVE]) == (sorted(first) if previous else [])
        self.counts["listener then active"] += sum(1 for n in first if n in listened)
        self.counts["blocking join"] += sum(1 for n in first if n not in before) if previous else 0


CONFIGS: dict[str, dict[str, object]] = {
    "sync": dict(mode="sync", steps=60, segment_steps=5, shards=8, batch=6, workers_min=2, workers_max=4),
    "sync-batch0": dict(mode="sync", steps=36, segment_steps=4, shards=6, batch=0, workers_min=1, workers_max=5),
    "sync-min3": dict(mode="sync", steps=40, segment_steps=4, shards=16, batch=7, workers_min=3, workers_max=6),
    "diloco": dict(mode="diloco", steps=60, inner_steps=6, shards=7, batch=5, workers_min=2, workers_max=3),
    "diloco-batch0": dict(mode="diloco", steps=40, inner_steps=5, shards=9, batch=0, workers_min=1, workers_max=4),
}


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_runs_to_the_end_with_exact_data_accounting(config: str, seed: int) -> None:
    mesh = Mesh(seed, CONFIGS[config], takeovers=False)
    mesh.run()
    assert mesh.k.finished() and sum(mesh.committed.values()) == sum(mesh.k.cursors.values())


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_runs_to_the_end_through_coordinator_takeovers(config: str, seed: int) -> None:
    mesh = Mesh(1000 + seed, CONFIGS[config])
    mesh.run()
    assert mesh.k.finished() and sum(mesh.committed.values()) == sum(mesh.k.cursors.values())
    fresh = TrainKind(mesh.sub, mesh.inputs)  # a replica that only ever applied the log agrees
    assert all(fresh.apply(entry) for entry in mesh.log)
    assert (fresh.step, fresh.cursors, fresh.records) == (mesh.k.step, mesh.k.cursors, mesh.k.records)


def test_the_schedules_are_not_vacuous() -> None:
    """Across the seeds above, each case the schedules are for occurs, in both modes."""
    for mode in ("sync", "diloco"):
        seen: Counter[str] = Counter()
        for config in (c for c in sorted(CONFIGS) if CONFIGS[c]["mode"] == mode):
            for seed in range(8):
                for mesh in (Mesh(seed, CONFIGS[config], takeovers=False), Mesh(1000 + seed, CONFIGS[config])):
                    mesh.run()
                    seen.update(mesh.counts)
        wanted = {"takeover", "entry lost", "retry", "listener", "listener then active", "crash mid-segment",
                  "crash after its rounds", "blocking join", "left before its seat"}
        assert wanted <= {what for what, n in seen.items() if n > 0}, (mode, seen)


def test_a_successor_does_not_take_a_deposed_plans_late_report() -> None:
    """Workers send results to the newest ballot they know: a seat of the deposed coordinator's
    plan must not pass for the successor's seat of the same rank (plan numbers are per epoch;
    ``TaskRecord`` also drops a train task's outcomes of attempts it did not hand out)."""
    sub, inputs = submission(dict(steps=40, segment_steps=20, shards=6, batch=6, workers_min=2))
    a, b, c = rank(TASK, [node(i) for i in range(3)])
    deposed = TrainKind(sub, inputs)
    deposed.plan([a, b, c], task_id=TASK, epoch=1, now=0.0)
    (item,) = deposed.take(1, worker=a, now=0.0)
    stale = decode_struct(Seat, item.input, what="Seat")  # shares (2, 2, 2): shards 0 and 3
    k = TrainKind(sub, inputs)  # c died with the coordinator; the successor replans for a, b
    k.requeue_running(now=1.0)
    assert k.plan([a, b], task_id=TASK, epoch=2, now=1.0) == ""
    mine = {w: k.take(1, worker=w, now=1.0)[0] for w in (a, b)}  # shares (3, 3): shards 0, 2, 4 / 1, 3, 5
    late = SeatReport(end=20, losses=(1.0,) * 20, state=b"o" * 32, rounds_of=(20, 20, 20),
                      cursors=tuple(ShardCursor(shard=cur.shard, position=20) for cur in stale.cursors))
    k.on_outcomes([Outcome(index=item.index, ok=True, value=encode_struct(late))], worker=a, now=2.0)
    entries = []
    for w in (a, b):
        seat = decode_struct(Seat, mine[w].input, what="Seat")
        report = SeatReport(end=20, losses=(1.0,) * 20, state=b"g" * 32, rounds_of=(20, 20),
                            cursors=tuple(ShardCursor(shard=cur.shard, position=20) for cur in seat.cursors))
        entries += k.on_outcomes([Outcome(index=mine[w].index, ok=True, value=encode_struct(report))],
                                 worker=w, now=3.0)
    (entry,) = entries
    record = decode_struct(SegmentRecord, entry[1:], what="SegmentRecord")
    assert record.finished == (a, b) and record.state == b"g" * 32
    assert record.cursors == tuple(ShardCursor(shard=sh, position=20) for sh in range(6))


def test_a_job_that_could_never_start_is_refused() -> None:
    """A worker needs a shard and a micro-batch: more ``workers_min`` than either is an error, not a
    job that waits for good."""
    from protocol.errors import LocalProtocolError

    with pytest.raises(LocalProtocolError, match="could never start"):
        JobSpec(steps=10, workers_min=3, shards=2)
    with pytest.raises(LocalProtocolError, match="could never start"):
        JobSpec(steps=10, workers_min=3, batch=2)
    assert JobSpec(steps=10, workers_min=3, shards=3, batch=3).workers_min == 3


def test_join_to_first_contribution_survives_a_takeover() -> None:
    """``ACTIVE.seconds`` counts from when the coordinator first saw the newcomer; a successor
    that only saw it at takeover still reports at least the JOINED seconds plus the listening
    segment's wall time, which the records keep."""
    sub, inputs = submission(dict(steps=30, segment_steps=10, shards=4, workers_min=2))
    a, b, c = rank(TASK, [node(i) for i in range(3)])

    def run_segment(k: TrainKind, live: list[bytes], now: float, wall: float) -> SegmentRecord:
        assert k.plan(live, task_id=TASK, epoch=1, now=now) == ""
        items = {w: k.take(1, worker=w, now=now)[0] for w in live}
        entries = []
        for w, item in items.items():
            seat = decode_struct(Seat, item.input, what="Seat")
            report = SeatReport(end=seat.end, losses=(1.0,) * (seat.end - seat.start), state=b"s" * 32,
                                cursors=tuple(ShardCursor(shard=x.shard, position=x.position + 10)
                                              for x in seat.cursors))
            entries += k.on_outcomes([Outcome(index=item.index, ok=True, value=encode_struct(report))],
                                     worker=w, now=now + wall)
        (entry,) = entries
        assert k.apply(entry)
        return decode_struct(SegmentRecord, entry[1:], what="SegmentRecord")

    k = TrainKind(sub, inputs)
    run_segment(k, [a, b], 0.0, 5.0)
    k.plan([a, b, c], task_id=TASK, epoch=1, now=6.0)  # c is first seen here ...
    k.requeue_running(now=7.0)  # (that plan is dropped, as after a takeover of the same kind)
    listened = run_segment(k, [a, b, c], 9.0, 5.0)  # ... and listens from 9 s
    (joined,) = [e for e in listened.events if e.change is GroupChange.JOINED]
    assert joined.node == c and joined.seconds == 3.0 and listened.shares[-1] == 0
    successor = TrainKind(sub, inputs)
    for record in k.records:
        successor.apply(bytes([0x01]) + encode_struct(record))
    active = run_segment(successor, [a, b, c], 20.0, 5.0)
    (event,) = [e for e in active.events if e.change is GroupChange.ACTIVE]
    assert event.node == c and event.seconds >= joined.seconds + listened.wall_s == 8.0


def test_a_worker_that_returns_counts_its_join_from_its_return() -> None:
    sub, inputs = submission(dict(steps=40, segment_steps=10, shards=4, workers_min=2))
    a, b, c = rank(TASK, [node(i) for i in range(3)])
    k = TrainKind(sub, inputs)

    def commit(live: list[bytes], now: float) -> SegmentRecord:
        assert k.plan(live, task_id=TASK, epoch=1, now=now) == ""
        entries = []
        for w in live:
            (item,) = k.take(1, worker=w, now=now)
            seat = decode_struct(Seat, item.input, what="Seat")
            report = SeatReport(end=seat.end, losses=(1.0,) * (seat.end - seat.start), state=b"s" * 32,
                                cursors=tuple(ShardCursor(shard=x.shard, position=x.position + 10)
                                              for x in seat.cursors))
            entries += k.on_outcomes([Outcome(index=item.index, ok=True, value=encode_struct(report))],
                                     worker=w, now=now + 1.0)
        (entry,) = entries
        assert k.apply(entry)
        return decode_struct(SegmentRecord, entry[1:], what="SegmentRecord")

    commit([a, b, c], 0.0)  # c trains from the start
    commit([a, b], 100.0)  # c is gone
    back = commit([a, b, c], 250.0)  # c is back: a listener, first seen just now
    (joined,) = [e for e in back.events if e.change is GroupChange.JOINED]
    assert joined.node == c and joined.seconds == 0.0


def test_a_newcomers_join_clock_starts_when_it_is_first_able_mid_segment() -> None:
    """JOINED.seconds: from the first plan() call that saw the member able while a segment ran
    (the coordinator calls plan before every dispatch) to the boundary that admitted it."""
    sub, inputs = submission(dict(steps=40, segment_steps=10, shards=4, workers_min=2))
    a, b, c = rank(TASK, [node(i) for i in range(3)])
    k = TrainKind(sub, inputs)
    assert k.plan([a, b], task_id=TASK, epoch=1, now=0.0) == ""
    items = {w: k.take(1, worker=w, now=0.0)[0] for w in (a, b)}
    assert k.plan([a, b, c], task_id=TASK, epoch=1, now=4.0) == ""  # c turns up mid-segment
    entries = []
    for w, item in items.items():
        seat = decode_struct(Seat, item.input, what="Seat")
        report = SeatReport(end=seat.end, losses=(1.0,) * 10, state=b"s" * 32,
                            cursors=tuple(ShardCursor(shard=x.shard, position=10) for x in seat.cursors))
        entries += k.on_outcomes([Outcome(index=item.index, ok=True, value=encode_struct(report))], worker=w, now=9.0)
    (entry,) = entries
    assert k.apply(entry)
    assert k.plan([a, b, c], task_id=TASK, epoch=1, now=10.0) == ""
    entries = []
    for w in (a, b, c):
        (item,) = k.take(1, worker=w, now=10.0)
        seat = decode_struct(Seat, item.input, what="Seat")
        report = SeatReport(end=seat.end, losses=(1.0,) * 10, state=b"t" * 32,
                            cursors=tuple(ShardCursor(shard=x.shard, position=20) for x in seat.cursors))
        entries += k.on_outcomes([Outcome(index=item.index, ok=True, value=encode_struct(report))], worker=w, now=19.0)
    (entry,) = entries
    record = decode_struct(SegmentRecord, entry[1:], what="SegmentRecord")
    assert record.shares[record.group.index(c)] == 0  # it listened
    (joined,) = [e for e in record.events if e.change is GroupChange.JOINED]
    assert joined.node == c and joined.seconds == 6.0


def test_no_listener_enters_the_last_segment() -> None:
    """A listener trains from the segment after the one it listens to: in the job's last segment
    it would only risk the end (its download), so only newcomers the segment needs enter."""
    sub, inputs = submission(dict(steps=20, segment_steps=10, shards=4, workers_min=2))
    a, b, c, d = rank(TASK, [node(i) for i in range(4)])
    k = TrainKind(sub, inputs)
    assert k.plan([a, b], task_id=TASK, epoch=1, now=0.0) == ""
    entries = []
    for w in (a, b):
        (item,) = k.take(1, worker=w, now=0.0)
        seat = decode_struct(Seat, item.input, what="Seat")
        report = SeatReport(end=seat.end, losses=(1.0,) * 10, state=b"s" * 32,
                            cursors=tuple(ShardCursor(shard=x.shard, position=10) for x in seat.cursors))
        entries += k.on_outcomes([Outcome(index=item.index, ok=True, value=encode_struct(report))], worker=w, now=1.0)
    (entry,) = entries
    assert k.apply(entry)
    assert k.plan([a, b, c, d], task_id=TASK, epoch=1, now=2.0) == ""
    assert k.progress().workers == (a, b) and k.progress().listeners == ()
    assert k.take(1, worker=c, now=2.0) == []
