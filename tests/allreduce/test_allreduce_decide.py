"""Table tests for the leader's decision (node/allreduce/decide.py): one view in, one decision out."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from node.allreduce.decide import DecisionKind, LeaderView, decide
from protocol.messages.tensor import (
    ArCommit,
    ArFinish,
    ArReport,
    DropReason,
    Exclusion,
    Holding,
    Resend,
)

RID = b"r" * 16
D, S, N, OUT, C = (DropReason.DIED, DropReason.STALLED, DropReason.NON_FINITE, DropReason.NORM_OUTLIER,
                 DropReason.CANCELLED)


def report(epoch: int = 0, *, hold: Mapping[int, Mapping[int, float]] | None = None,
           averages: tuple[int, ...] = (), excl: Mapping[int, DropReason] | None = None) -> ArReport:
    holdings = tuple(Holding(slice=s, senders=tuple(sorted(h)), sq_norms=tuple(h[j] for j in sorted(h)))
                     for s, h in sorted((hold or {}).items()))
    return ArReport(round_id=RID, epoch=epoch, leader=0, holdings=holdings, averages=averages,
                    exclusions=tuple(Exclusion(member=m, reason=r) for m, r in sorted((excl or {}).items())))


def owns(s: int, senders: range | list[int], norm: float = 1.0) -> dict[int, dict[int, float]]:
    return {s: dict.fromkeys(senders, norm)}


def commit(epoch: int, contributors: list[int], receivers: list[int], owners: list[int], since: int = 1,
           dropped: Mapping[int, DropReason] | None = None) -> ArCommit:
    return ArCommit(round_id=RID, epoch=epoch, leader=receivers[0], contributors=tuple(contributors),
                    contributors_since=since, receivers=tuple(receivers), owners=tuple(owners), resend=(),
                    dropped=tuple(Exclusion(member=m, reason=r) for m, r in sorted((dropped or {}).items())))


def view(reports: Mapping[int, ArReport], *, n: int = 4, c: ArCommit | None = None, forced: bool = False,
         failed: Mapping[int, DropReason] | None = None, **kw: object) -> LeaderView:
    return LeaderView(round_id=RID, n=n, me=0, sizes=(10,) * n, commit=c, failed=failed or {},
                      reports=reports, forced=forced, outlier_factor=10.0, **kw)  # type: ignore[arg-type]


def first(n: int = 4, missing: Mapping[int, list[int]] | None = None) -> dict[int, ArReport]:
    """Epoch-0 reports where owner o holds everyone except ``missing[o]``."""
    miss = missing or {}
    return {o: report(hold=owns(o, [j for j in range(n) if j not in miss.get(o, [])])) for o in range(n)}


def the_commit(v: LeaderView) -> ArCommit:
    d = decide(v)
    assert d.kind is DecisionKind.COMMIT and isinstance(d.message, ArCommit), d
    return d.message


def test_waits_for_every_expected_reporter_until_the_deadline() -> None:
    reps = first()
    del reps[3]
    assert decide(view(reps)).kind is DecisionKind.WAIT
    assert decide(view(reps, forced=True, patient=True)).kind is DecisionKind.EXTEND  # once
    assert decide(view(reps, forced=True, extending=True)).kind is DecisionKind.WAIT
    c = the_commit(view(reps, forced=True))  # after it, 3 is silent: out of S and R
    assert (c.contributors, c.receivers, c.dropped) == ((0, 1, 2), (0, 1, 2), (Exclusion(member=3, reason=S),))
    assert c.owners == (0, 1, 2, 0) and c.resend == (Resend(slice=3, senders=(1, 2)),)


def test_first_commit_when_everything_is_complete() -> None:
    c = the_commit(view(first()))
    assert (c.epoch, c.leader, c.contributors, c.receivers) == (1, 0, (0, 1, 2, 3), (0, 1, 2, 3))
    assert (c.owners, c.resend, c.dropped, c.contributors_since) == ((0, 1, 2, 3), (), (), 0)  # S = everyone: early averages stand


def test_dead_member_slice_goes_to_least_loaded_and_everyone_resends() -> None:
    reps = first(missing={o: [2] for o in range(4)})
    del reps[2]
    c = the_commit(view(reps, failed={2: D}))
    assert c.contributors == (0, 1, 3) and c.receivers == (0, 1, 3)
    assert c.owners == (0, 1, 0, 3)  # ties on holdings and load: lowest index
    assert c.resend == (Resend(slice=2, senders=(1, 3)),)
    assert c.dropped == (Exclusion(member=2, reason=D),)


def test_slow_sender_leaves_s_but_stays_a_receiver() -> None:
    c = the_commit(view(first(missing={0: [2], 1: [2], 3: [2]}), forced=True))
    assert c.contributors == (0, 1, 3) and c.receivers == (0, 1, 2, 3) and c.owners == (0, 1, 2, 3)
    assert c.dropped == (Exclusion(member=2, reason=S),)


def test_slow_receiving_owner_loses_its_slice_not_its_contribution() -> None:
    c = the_commit(view(first(missing={1: [0, 2, 3]}), forced=True))
    assert c.contributors == (0, 1, 2, 3) and c.receivers == (0, 1, 2, 3)
    assert c.owners[1] != 1 and c.resend == (Resend(slice=1, senders=tuple(m for m in range(4) if m != c.owners[1])),)


def test_non_finite_and_norm_outlier() -> None:
    reps = first(n=5)
    reps[1] = report(hold=owns(1, [0, 1, 3, 4]), excl={2: N})
    for o in (0, 3, 4):
        reps[o] = report(hold={o: {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 400.0}})
    reps[2] = report(hold={2: {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 400.0}})
    c = the_commit(view(reps, n=5))
    assert c.contributors == (0, 1, 3) and c.receivers == (0, 1, 2, 3, 4)
    assert c.dropped == (Exclusion(member=2, reason=N), Exclusion(member=4, reason=OUT))


def test_isolated_leader_waits_once_then_aborts_but_goes_on_alone_on_evidence() -> None:
    reps = {0: report(hold=owns(0, [0]))}
    d = decide(view(reps, n=3, forced=True))
    assert d.kind is DecisionKind.ABORT and isinstance(d.message, ArFinish) and d.message.aborted
    assert decide(view(reps, n=3, forced=True, patient=True)).kind is DecisionKind.EXTEND
    d = decide(view(reps, n=3, forced=True, quiet=frozenset({1}), failed={1: S}))
    assert d.kind is DecisionKind.ABORT
    c = the_commit(view(reps, n=3, failed={1: D, 2: C}))
    assert c.contributors == (0,) and c.receivers == (0,)


EPOCH1 = commit(1, [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3])
HELD = {s: {j: 1.0 for j in range(4)} for s in range(4)}


def later(averages: Mapping[int, tuple[int, ...]], epoch: int = 1) -> dict[int, ArReport]:
    return {m: report(epoch, hold={m: HELD[m]}, averages=a) for m, a in averages.items()}


def test_finish_when_everyone_holds_every_average() -> None:
    d = decide(view(later(dict.fromkeys(range(4), (0, 1, 2, 3))), c=EPOCH1))
    assert d.kind is DecisionKind.FINISH and d.message == ArFinish(round_id=RID, epoch=1, leader=0)
    reps = later(dict.fromkeys(range(4), (0, 1, 2, 3)))
    reps[2] = report(0)  # a report from an older epoch does not count
    assert decide(view(reps, c=EPOCH1)).kind is DecisionKind.WAIT


def test_lost_contributor_shrinks_s_unless_a_takeover_finishes() -> None:
    reps = later(dict.fromkeys((0, 1, 2), (0, 1, 2, 3)))
    c = the_commit(view(reps, c=EPOCH1, failed={3: D}))
    assert (c.epoch, c.contributors, c.receivers, c.contributors_since) == (2, (0, 1, 2), (0, 1, 2), 2)
    assert c.owners == (0, 1, 2, 0) and c.resend == (Resend(slice=3, senders=(1, 2)),)
    assert decide(view(reps, c=EPOCH1, failed={3: D}, takeover=True)).kind is DecisionKind.FINISH
    assert decide(view(reps, c=EPOCH1, failed={3: C}, takeover=True)).kind is DecisionKind.COMMIT


def test_slow_reducer_is_blamed_only_at_the_deadline() -> None:
    reps = later({0: (0, 2, 3), 1: (1, 2, 3), 2: (2, 3), 3: (2, 3)})  # nobody else has 0's or 1's
    assert decide(view(reps, c=EPOCH1)).kind is DecisionKind.WAIT  # data may be in flight
    c = the_commit(view(reps, c=EPOCH1, forced=True))
    assert c.contributors == (2, 3) and c.receivers == (2, 3)
    assert c.dropped == (Exclusion(member=0, reason=S), Exclusion(member=1, reason=S))


def test_slow_receiver_is_blamed_when_the_others_got_the_averages() -> None:
    reps = later({0: (0, 1, 2, 3), 1: (0, 1, 2, 3), 2: (0, 1, 2, 3), 3: (3,)})
    c = the_commit(view(reps, c=EPOCH1, forced=True))
    assert c.contributors == (0, 1, 2) and c.receivers == (0, 1, 2) and c.contributors_since == 2


def test_owner_lacking_a_resend_blames_the_sender() -> None:
    c1 = commit(2, [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 0], since=2, dropped={3: S})
    reps = {0: report(2, hold={0: HELD[0], 3: {0: 1.0, 2: 1.0}}, averages=(0, 1, 2)),
            1: report(2, hold={1: HELD[1]}, averages=(0, 1, 2)),
            2: report(2, hold={2: HELD[2]}, averages=(0, 1, 2)),
            3: report(2, averages=(0, 1, 2))}
    c = the_commit(view(reps, c=c1, forced=True))
    assert c.contributors == (0, 2) and c.receivers == (0, 1, 2, 3)
    assert c.dropped == (Exclusion(member=1, reason=S), Exclusion(member=3, reason=S))


def test_abort_after_max_epochs_and_with_nobody_left() -> None:
    reps = later(dict.fromkeys((0, 1, 2), (0, 1, 2, 3)))
    last = commit(8, [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3])
    d = decide(view({m: report(8, averages=r.averages) for m, r in reps.items()}, c=last, failed={3: D}))
    assert d.kind is DecisionKind.ABORT and "epochs" in d.detail
    reps = first()
    for o in range(4):
        reps[o] = report(hold=owns(o, range(4)), excl=dict.fromkeys(range(4), N))
    d = decide(view(reps))
    assert d.kind is DecisionKind.ABORT and "contributor" in d.detail


@pytest.mark.parametrize("forced", [False, True])
def test_no_change_waits_before_the_deadline_and_blames_at_it(forced: bool) -> None:
    reps = later({0: (0, 1, 2, 3), 1: (0, 1, 2, 3), 2: (0, 1, 2, 3), 3: (0, 1, 2)})
    d = decide(view(reps, c=EPOCH1, forced=forced))
    assert d.kind is (DecisionKind.COMMIT if forced else DecisionKind.WAIT)
