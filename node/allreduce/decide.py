"""The round leader's decision: a pure function of what it knows (PROTOCOL.md §11.6).

``decide(view)`` turns the leader's failure knowledge and the members' latest reports into
WAIT, a FINISH of the current epoch, the COMMIT of the next epoch, or an ABORT. It never
looks at a clock: the caller says whether the decision deadline has passed (``forced``).

Rules, in order:

1. *Who must answer.* Expected reporters are the receivers R of the current commit (all
   members before the first commit) that the leader does not know to be failed. Only
   reports at the current epoch count. Before the deadline the leader waits for all of
   them. At the deadline, if some are missing, or (epoch >= 1) some last reported early
   (blocked on a failure: no evidence of slowness) and are neither done nor past their own
   deadline (``timed_out``), it extends the deadline once per epoch (``patient``: its
   commit may have reached them late, so their own deadlines run later); the decision is
   then taken when every one has a done or timed-out report, or the extension ends. The
   missing ones are then *silent* (STALLED).
2. *Isolation.* If every other expected member is silent, or every other member is
   silent or was failed by the leader's own deadlines (``quiet``), the leader cannot tell
   its own isolation from everyone's stall: it aborts rather than return its own tensor.
   (Explicit failures, DIED or CANCELLED, are evidence: a member told that everyone else
   died goes on alone.)
3. *Finish.* At epoch >= 1, when every reporter holds every slice's average and no
   contributor failed or went silent, the epoch is final. A leader that took over finishes
   even if contributors died or went silent, since they may have finished under the old
   leader already; only a CANCELLED contributor (which cannot have finished) prevents it.
4. *Next commit.* Otherwise, blame and exclude, then commit epoch + 1:

   * epoch 0 (first commit): candidates are members not failed, silent or non-finite. An
     initial owner missing contributions from more than half (and >= 2) of the other
     candidates is blamed as a slow *receiver* (its slice moves; it stays a candidate);
     otherwise every candidate it misses is a slow *sender* (STALLED, out of S, still a
     receiver). Then the norm rule: a candidate's norm is sqrt of the sum of its reported
     squared slice norms over the slices of unblamed reporting owners; candidates above
     ``outlier_factor`` x median are NORM_OUTLIER (>= 3 candidates needed).
   * epoch >= 1: a slice some reporter misses is *blocked* if its owner failed or waits
     on a failed or non-finite contributor (nobody is blamed: removing those unblocks it);
     if its live owner lacks live contributors' data, those contributors are blamed (slow
     resend); otherwise the owner holds everything and *owes* the average: if no other
     reporter has it, or the owner was just blamed as a slow resender, the owner is blamed
     (slow reducer), else every reporter missing it is (slow receiver: the others got that
     owner's average).
     Slowness is judged only at the deadline: before it (every reporter answered early,
     e.g. blocked on a failed owner) only failures and non-finite values are acted on.
     Members reported NON_FINITE leave S. If nothing at all is blamed, the members that
     are not done are (so every commit makes progress).

   Blamed senders leave S but stay receivers; blamed owners and receivers leave both.
   Slices whose owner left R (or was blamed) go to the receiver holding most of the new
   S's contributions to it (ties: least load, then lowest index). Every contributor the
   new owner lacks must resend. S unchanged keeps ``contributors_since``, so averages
   already delivered stay valid; the first commit with S = the whole group has
   ``contributors_since = 0``, which keeps the initial owners' early averages.
5. *Abort* when S or R would be empty, or the epoch would exceed ``max_epochs``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from node.allreduce.layout import norm_outliers
from protocol.messages.tensor import ArCommit, ArFinish, ArReport, DropReason, Exclusion, Resend

Held = dict[int, dict[int, float]]
"""slice -> sender -> squared norm, for one member's complete holdings."""


class DecisionKind(enum.Enum):
    WAIT = "wait"
    COMMIT = "commit"
    FINISH = "finish"
    ABORT = "abort"
    EXTEND = "extend"
    """Members are silent at the deadline: wait once more for them (``LeaderView.patient``)."""


@dataclass(frozen=True, slots=True)
class Decision:
    kind: DecisionKind
    message: ArCommit | ArFinish | None = None
    detail: str = ""


WAIT = Decision(DecisionKind.WAIT)
EXTEND = Decision(DecisionKind.EXTEND)


@dataclass(frozen=True, slots=True)
class LeaderView:
    """Everything the leader knows, as plain data."""

    round_id: bytes
    n: int
    me: int
    sizes: tuple[int, ...]
    commit: ArCommit | None
    failed: Mapping[int, DropReason]
    reports: Mapping[int, ArReport]
    """Latest report per member, the leader's own (fresh) included when it is final."""
    forced: bool
    quiet: frozenset[int] = frozenset()
    """Members this leader failed by its own deadlines (no AR_BEGIN, leader silent)."""
    takeover: bool = False
    patient: bool = False
    """The leader may still extend this epoch's deadline once (rule 1)."""
    extending: bool = False
    """The extension runs: silent members are still waited for, but slowness may be judged."""
    outlier_factor: float | None = None
    max_epochs: int = 8
    nonempty: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nonempty", tuple(s for s, k in enumerate(self.sizes) if k))

    @property
    def epoch(self) -> int:
        return self.commit.epoch if self.commit else 0


def held_of(report: ArReport) -> Held:
    return {h.slice: dict(zip(h.senders, h.sq_norms, strict=True)) for h in report.holdings}


def is_done(report: ArReport, nonempty: tuple[int, ...]) -> bool:
    return set(nonempty) <= set(report.averages)


def decide(v: LeaderView) -> Decision:
    base_r = set(v.commit.receivers) if v.commit else set(range(v.n))
    expected = base_r - v.failed.keys()
    current = {m: v.reports[m] for m in sorted(expected)
               if m in v.reports and v.reports[m].epoch == v.epoch}
    silent = expected - current.keys()
    # A report sent early (blocked on a failure) is no evidence of slowness: at the deadline,
    # wait (once) for every reporter's own deadline report, as for the silent ones.
    early = {m for m, r in current.items() if v.commit and not r.timed_out and not is_done(r, v.nonempty)}
    if silent and not v.forced:
        return WAIT
    if v.forced and (silent or early) and (v.patient or v.extending):
        return EXTEND if v.patient else WAIT
    others = expected - {v.me}
    if v.n > 1 and ((others and others <= silent) or set(range(v.n)) - {v.me} <= silent | v.quiet):
        return _abort(v, "isolated: no other member answered")
    if v.commit is not None:
        done = all(is_done(r, v.nonempty) for r in current.values())
        lost = set(v.commit.contributors) & (v.failed.keys() | silent)
        if v.takeover:
            lost = {m for m in lost if v.failed.get(m) is DropReason.CANCELLED}
        if current and done and not lost:
            fin = ArFinish(round_id=v.round_id, epoch=v.epoch, leader=v.commit.leader)
            return Decision(DecisionKind.FINISH, fin)
    return _next_commit(v, current, silent)


@dataclass(slots=True)
class _Blame:
    """Members leaving S only (``senders``) or both S and R (``gone``), with reasons."""

    gone: dict[int, DropReason] = field(default_factory=dict)
    senders: dict[int, DropReason] = field(default_factory=dict)
    slow_owners: set[int] = field(default_factory=set)
    """Owners that lose their slices (epoch 0: still receivers)."""


def _next_commit(v: LeaderView, current: dict[int, ArReport], silent: set[int]) -> Decision:
    if v.epoch + 1 > v.max_epochs:
        return _abort(v, f"too many epochs ({v.max_epochs})")
    base_r = set(v.commit.receivers) if v.commit else set(range(v.n))
    blame = _Blame()
    for m in sorted(v.failed.keys() & (base_r | _contributors(v))):
        blame.gone[m] = v.failed[m]
    for m in sorted(silent):
        blame.gone[m] = DropReason.STALLED
    for rep in current.values():
        for ex in rep.exclusions:
            if ex.reason is DropReason.NON_FINITE and ex.member not in blame.gone:
                blame.senders.setdefault(ex.member, DropReason.NON_FINITE)
    held = {m: held_of(rep) for m, rep in current.items()}
    if v.commit is None:
        contributors = _first_contributors(v, held, blame)
    else:
        contributors = _later_contributors(v, current, held, blame)
    receivers = base_r - blame.gone.keys()
    if v.commit and (contributors, receivers) == (set(v.commit.contributors), base_r):
        return WAIT  # nothing to change before the deadline (at it, someone is always blamed)
    if not contributors:
        return _abort(v, "no contributor left")
    if not receivers:
        return _abort(v, "no receiver left")
    owners = _assign_owners(v, receivers, contributors, held, blame.slow_owners)
    return Decision(DecisionKind.COMMIT, _commit(v, contributors, receivers, owners, held, blame))


def _contributors(v: LeaderView) -> set[int]:
    return set(v.commit.contributors) if v.commit else set(range(v.n))


def _first_contributors(v: LeaderView, held: dict[int, Held], blame: _Blame) -> set[int]:
    cands = set(range(v.n)) - blame.gone.keys() - blame.senders.keys()
    slow: set[int] = set()
    for o in sorted(held):
        if not v.sizes[o]:
            continue
        missing = (cands - {o}) - held[o].get(o, {}).keys()
        if len(missing) >= 2 and 2 * len(missing) > len(cands - {o}):
            blame.slow_owners.add(o)
        else:
            slow |= missing
    for m in sorted(slow):
        blame.senders[m] = DropReason.STALLED
    cands -= slow
    norm_slices = [o for o in sorted(held) if v.sizes[o] and o not in blame.slow_owners]
    norms = {j: math.sqrt(sum(held[o][o].get(j, 0.0) for o in norm_slices)) for j in sorted(cands)}
    for m in sorted(norm_outliers(norms, v.outlier_factor)):
        blame.senders[m] = DropReason.NORM_OUTLIER
    return cands - blame.senders.keys()


def _later_contributors(v: LeaderView, current: dict[int, ArReport], held: dict[int, Held],
                        blame: _Blame) -> set[int]:
    assert v.commit is not None
    s_prev, owners = set(v.commit.contributors), v.commit.owners
    unusable = blame.gone.keys() | blame.senders.keys()
    missing = {r: {s for s in v.nonempty if s not in rep.averages} for r, rep in current.items()}
    missed = set().union(*missing.values())
    ready: set[int] = set()  # slices whose live owner holds every contribution: it owes them
    if not v.forced:
        # Before the deadline only failures are evidence; missing data may be in flight.
        return s_prev - unusable
    for s in sorted(missed):
        o = owners[s]
        lacking = s_prev - held.get(o, {}).get(s, {}).keys() - {o}
        if o in blame.gone or lacking & unusable:
            continue  # waits on a failed member: removing it from S unblocks the slice
        if lacking:
            for m in sorted(lacking):
                blame.senders.setdefault(m, DropReason.STALLED)
        else:
            ready.add(s)
    receivers: set[int] = set()
    for s in sorted(ready):
        others = [r for r in missing if r != owners[s]]
        missers = {r for r in others if s in missing[r]}
        if not missers:
            continue
        if len(missers) == len(others) or owners[s] in blame.senders:
            blame.slow_owners.add(owners[s])  # nobody got it, or its owner is slow anyway
        else:
            receivers |= missers  # others got this average: the missers are slow receivers
    if not (blame.gone or blame.senders or blame.slow_owners or receivers):
        receivers = {r for r, miss in missing.items() if miss}
    for m in sorted(receivers | blame.slow_owners):
        blame.gone.setdefault(m, DropReason.STALLED)
    return s_prev - blame.gone.keys() - blame.senders.keys()


def _holds(held: dict[int, Held], member: int, slice_: int) -> set[int]:
    return set(held.get(member, {}).get(slice_, {})) | {member}


def _assign_owners(v: LeaderView, receivers: set[int], contributors: set[int],
                   held: dict[int, Held], slow: set[int]) -> list[int]:
    prev = list(v.commit.owners) if v.commit else list(range(v.n))
    eligible = sorted(receivers - slow) or sorted(receivers)
    load = dict.fromkeys(eligible, 0)
    owners, orphans = list(prev), []
    for s, size in enumerate(v.sizes):
        if not size:
            owners[s] = prev[s] if prev[s] in receivers else eligible[0]
        elif prev[s] in load:
            load[prev[s]] += size
        else:
            orphans.append(s)
    for s in sorted(orphans, key=lambda s: (-v.sizes[s], s)):
        best = min(eligible, key=lambda c: (-len(contributors & _holds(held, c, s)), load[c], c))
        owners[s] = best
        load[best] += v.sizes[s]
    return owners


def _commit(v: LeaderView, contributors: set[int], receivers: set[int], owners: list[int],
            held: dict[int, Held], blame: _Blame) -> ArCommit:
    epoch = v.epoch + 1
    resend = []
    for s in v.nonempty:
        need = contributors - _holds(held, owners[s], s)
        if need:
            resend.append(Resend(slice=s, senders=tuple(sorted(need))))
    prev = v.commit
    if prev is not None:
        since = prev.contributors_since if set(prev.contributors) == contributors else epoch
    else:  # the first commit: with the whole group as S, the early averages stand (§11.3)
        since = 0 if len(contributors) == v.n else epoch
    why = {**blame.senders, **blame.gone, **({e.member: e.reason for e in prev.dropped} if prev else {})}
    dropped = tuple(Exclusion(member=m, reason=why.get(m, DropReason.STALLED))
                    for m in range(v.n) if m not in contributors)
    return ArCommit(round_id=v.round_id, epoch=epoch, leader=min(receivers),
                    contributors=tuple(sorted(contributors)), contributors_since=since,
                    receivers=tuple(sorted(receivers)), owners=tuple(owners),
                    resend=tuple(resend), dropped=dropped)


def _abort(v: LeaderView, detail: str, kind: DecisionKind = DecisionKind.ABORT) -> Decision:
    fin = ArFinish(round_id=v.round_id, epoch=v.epoch, leader=v.me, aborted=True)
    return Decision(kind, fin, detail)
