"""Lifeguard suspicion timer (memberlist suspicion.go / util.go), as pure functions.

Theory of operation
-------------------
When a member is suspected, a timer starts at the *maximum* timeout. Every *independent*
suspector that confirms the suspicion (a ``Suspect`` from a sender not seen before)
shrinks it along a log curve towards the *minimum*, reached after ``k`` confirmations
(Lifeguard, "LHA-Suspicion", Dadgar et al. 2018, section IV-B). A member that is only
suspected by one troubled peer is therefore given a long time to refute, while a member
that many peers cannot reach is declared dead quickly. The timer never fires earlier than
``start + min``; a confirmation never lengthens it.

``Suspicion`` holds no clock: it stores its start and computes its deadline; the owner
(``discovery/swim.py``) polls ``deadline`` from ``next_deadline()``.
"""

from __future__ import annotations

import math


def suspicion_timeout(suspicion_mult: int, n: int, probe_interval: float) -> float:
    """Minimum suspicion timeout: ``suspicion_mult * max(1, log10(max(1, n))) * probe_interval``.

    ``n`` is the estimated number of live members (memberlist util.go ``suspicionTimeout``;
    computed in whole milliseconds of node scale, as there).
    """
    node_scale = max(1.0, math.log10(max(1.0, float(n))))
    return suspicion_mult * math.floor(node_scale * 1000.0) * probe_interval / 1000.0


def expected_confirmations(suspicion_mult: int, n: int) -> int:
    """k: confirmations expected before the timeout reaches its minimum.

    ``suspicion_mult - 2``, or 0 when fewer than that many members besides ourselves and
    the suspect exist (``n - 2 < k``) so no confirmation can be waited for.
    """
    k = suspicion_mult - 2
    return 0 if n - 2 < k else max(0, k)


def remaining_suspicion_time(
    confirmations: int, k: int, elapsed: float, min_timeout: float, max_timeout: float
) -> float:
    """Seconds left on a suspicion timer (may be negative: overdue).

    ``max - log(c + 1) / log(k + 1) * (max - min)``, floored to whole milliseconds and
    clamped at ``min``, minus ``elapsed`` (memberlist ``remainingSuspicionTime``).
    With ``k < 1`` the timeout is simply ``min``.
    """
    if k < 1:
        return min_timeout - elapsed
    frac = math.log(confirmations + 1.0) / math.log(k + 1.0)
    raw = max_timeout - frac * (max_timeout - min_timeout)
    timeout = math.floor(1000.0 * raw) / 1000.0
    return max(timeout, min_timeout) - elapsed


class Suspicion:
    """One member's suspicion timer: who confirmed it and when it fires."""

    __slots__ = ("_confirmed_by", "deadline", "k", "max_timeout", "min_timeout", "start")

    def __init__(
        self, *, sender: bytes, k: int, min_timeout: float, max_timeout: float, now: float
    ) -> None:
        self.start = now
        self.k = k
        self.min_timeout = min_timeout
        self.max_timeout = max(max_timeout, min_timeout)
        # The original suspector does not count as a confirmation (memberlist).
        self._confirmed_by: set[bytes] = {sender}
        first = self.max_timeout if k >= 1 else min_timeout
        self.deadline = now + first

    @property
    def confirmations(self) -> int:
        """Independent confirmations received so far (the first suspector excluded)."""
        return len(self._confirmed_by) - 1

    def confirm(self, sender: bytes) -> bool:
        """Count ``sender`` as an independent suspector. True if it was new (re-gossip it).

        At most ``k`` confirmations are counted; each one moves the deadline earlier.
        """
        if self.confirmations >= self.k or sender in self._confirmed_by:
            return False
        self._confirmed_by.add(sender)
        left = remaining_suspicion_time(
            self.confirmations, self.k, 0.0, self.min_timeout, self.max_timeout
        )
        self.deadline = self.start + left
        return True
