"""The "train" kind's core on explicit time: plan, seats, close, apply, retry, takeover."""

from __future__ import annotations

from node.training.trainkind import FAILED_ENTRY, SEGMENT_ENTRY, TrainKind
from protocol.messages.tasks import (
    Failure,
    Outcome,
    Submission,
    decode_struct,
    encode_struct,
    inputs_digest,
)
from protocol.messages.training import JobSpec, Seat, SeatReport, ShardCursor

TASK = b"t" * 16
A, B, C = b"a" * 32, b"b" * 32, b"c" * 32
STATE = b"s" * 32


def kind(**spec: object) -> TrainKind:
    inputs = [encode_struct(JobSpec(**{"steps": 40, "segment_steps": 20, "shards": 4,
                                       "workers_min": 2, **spec}))]  # type: ignore[arg-type]
    sub = Submission(kind="train", function="node.training.runner.charlm:make_job",
                     inputs_digest=inputs_digest(inputs), count=1, retries=1,
                     submitter=b"k" * 32, created=1.0, nonce=b"n" * 16)
    return TrainKind(sub, inputs)


def report(seat: Seat, state: bytes = STATE, loss: float = 2.0) -> bytes:
    return encode_struct(SeatReport(
        end=seat.end, losses=tuple(loss for _ in range(seat.end - seat.start)), state=state,
        cursors=tuple(ShardCursor(shard=c.shard, position=c.position + 10) for c in seat.cursors)))


def seats(k: TrainKind, workers: list[bytes], now: float) -> dict[bytes, tuple[int, Seat]]:
    out = {}
    for w in workers:
        (item,) = k.take(1, worker=w, now=now)
        out[w] = (item.index, decode_struct(Seat, item.input, what="Seat"))
    return out


def test_waits_for_min_workers_then_plans_a_committed_group() -> None:
    k = kind()
    assert k.plan([A], task_id=TASK, epoch=1, now=0.0).startswith("waiting for 2 workers")
    assert k.plan([A, B], task_id=TASK, epoch=1, now=1.0) == ""
    got = seats(k, [A, B], 1.0)
    assert k.take(1, worker=C, now=1.0) == [] and k.take(1, worker=A, now=1.0) == []
    group = got[A][1].group
    assert sorted(group) == sorted([A, B]) and got[B][1].group == group
    shards = sorted(c.shard for _, s in got.values() for c in s.cursors)
    assert shards == [0, 1, 2, 3] and {s.start for _, s in got.values()} == {0}


def test_segment_commits_once_every_seat_reported_and_moves_the_job() -> None:
    k = kind()
    k.plan([A, B], task_id=TASK, epoch=1, now=0.0)
    got = seats(k, [A, B], 0.0)
    idx, seat = got[A]
    assert k.on_outcomes([Outcome(index=idx, ok=True, value=report(seat, loss=1.0))], worker=A, now=1.0) == []
    idx, seat = got[B]
    (entry,) = k.on_outcomes([Outcome(index=idx, ok=True, value=report(seat, loss=3.0))], worker=B, now=2.0)
    assert entry[0] == SEGMENT_ENTRY and k.step == 0  # nothing moves before the entry is applied
    assert k.apply(entry) and not k.apply(entry)  # a replay is ignored
    assert k.step == 20 and k.state == STATE and k.done == 1
    assert k.records[0].losses == tuple(2.0 for _ in range(20))
    assert k.cursors == {0: 10, 1: 10, 2: 10, 3: 10}
    assert k.plan([A, B], task_id=TASK, epoch=1, now=3.0) == ""
    nxt = seats(k, [A, B], 3.0)
    assert nxt[A][1].start == 20 and nxt[A][1].state == STATE and nxt[A][1].final


def test_a_lost_seat_leaves_the_survivors_record() -> None:
    k = kind()
    k.plan([A, B], task_id=TASK, epoch=1, now=0.0)
    got = seats(k, [A, B], 0.0)
    k.on_lost([got[B][0]], worker=B, reason="dead", now=1.0)
    idx, seat = got[A]
    (entry,) = k.on_outcomes([Outcome(index=idx, ok=True, value=report(seat))], worker=A, now=2.0)
    assert k.apply(entry) and k.records[0].finished == (A,)


def test_failed_segments_retry_after_a_backoff_then_fail_the_job() -> None:
    k = kind()
    for attempt in range(2):
        now = 10.0 * attempt
        assert k.plan([A, B], task_id=TASK, epoch=1, now=now) == ""
        got = seats(k, [A, B], now)
        for w, (idx, _) in got.items():
            entries = k.on_outcomes([Outcome(index=idx, ok=False, failure=Failure(type="E", message="x"))],
                                    worker=w, now=now + 1)
    assert entries and entries[0][0] == FAILED_ENTRY
    assert k.apply(entries[0]) and k.finished() and k.failed == 1


def test_takeover_replans_the_segment_in_flight() -> None:
    k = kind()
    k.plan([A, B], task_id=TASK, epoch=1, now=0.0)
    old = seats(k, [A, B], 0.0)
    k.requeue_running(now=1.0)
    assert k.plan([A, B], task_id=TASK, epoch=2, now=1.0) == ""
    new = seats(k, [A, B], 1.0)
    assert new[A][1].epoch == 2 and new[A][1].plan != old[A][1].plan
    idx, seat = old[A]  # the deposed plan's late report is not taken
    assert k.on_outcomes([Outcome(index=idx, ok=True, value=report(seat))], worker=A, now=2.0) == []
