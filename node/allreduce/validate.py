"""Cross-field checks of all-reduce control messages against the round's group size.

The schema bounds every field; these checks add what only the round knows (``n``) and
what relates fields to each other. A violation is the sender's fault:
``RemoteProtocolError``, and the round fails that member (PROTOCOL_ERROR).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.messages.tensor import ArCommit, ArReport


def _bad(msg: str) -> RemoteProtocolError:
    return RemoteProtocolError(msg, code=ErrorCode.SCHEMA_VIOLATION)


def _members(values: Sequence[int], n: int, what: str) -> set[int]:
    if any(not 0 <= v < n for v in values):
        raise _bad(f"{what}: member index out of range for a group of {n}")
    if any(a >= b for a, b in itertools.pairwise(values)):
        raise _bad(f"{what}: member indices must be strictly ascending")
    return set(values)


def check_report(rep: ArReport, n: int) -> None:
    if rep.leader >= n:
        raise _bad("AR_REPORT leader out of range")
    _members(sorted({h.slice for h in rep.holdings}), n, "AR_REPORT holdings")
    if len({h.slice for h in rep.holdings}) != len(rep.holdings):
        raise _bad("AR_REPORT lists a slice twice")
    for h in rep.holdings:
        _members(h.senders, n, "AR_REPORT holding senders")
        if len(h.sq_norms) != len(h.senders):
            raise _bad("AR_REPORT holding: one squared norm per sender")
    _members(rep.averages, n, "AR_REPORT averages")
    _members([e.member for e in rep.exclusions], n, "AR_REPORT exclusions")


def check_commit(c: ArCommit, n: int) -> None:
    s = _members(c.contributors, n, "AR_COMMIT contributors")
    r = _members(c.receivers, n, "AR_COMMIT receivers")
    if not s or not s <= r:
        raise _bad("AR_COMMIT contributors must be a non-empty subset of receivers")
    if c.leader != c.receivers[0]:
        raise _bad("AR_COMMIT leader must be the first receiver")
    if c.contributors_since > c.epoch:
        raise _bad("AR_COMMIT contributors_since after its epoch")
    if c.contributors_since == 0 and c.contributors != tuple(range(n)):
        raise _bad("AR_COMMIT contributors_since 0 needs the whole group as contributors")
    if len(c.owners) != n or any(o not in r for o in c.owners):
        raise _bad("AR_COMMIT needs one owner per slice, each a receiver")
    _members(sorted({x.slice for x in c.resend}), n, "AR_COMMIT resend slices")
    for x in c.resend:
        if not _members(x.senders, n, "AR_COMMIT resend senders") <= s:
            raise _bad("AR_COMMIT resend senders must be contributors")
    dropped = _members([e.member for e in c.dropped], n, "AR_COMMIT dropped")
    if dropped & s:
        raise _bad("AR_COMMIT drops a contributor")
