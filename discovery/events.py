"""Membership events the SWIM core reports through ``Swim.next_event()``."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from discovery.members import MemberView


class EventKind(enum.Enum):
    JOINED = "joined"
    """A member became alive: first heard of, or back from dead/left with a higher incarnation."""
    UPDATED = "updated"
    """An alive member changed its metadata or address (a higher incarnation)."""
    SUSPECTED = "suspected"
    """An alive member is now suspected (a probe failed, or someone said so)."""
    REFUTED = "refuted"
    """A suspected member proved itself alive with a higher incarnation. Also emitted for
    ourselves when we refute a suspicion or death claim about us."""
    DEAD = "dead"
    """A member was declared dead (its suspicion timed out here or elsewhere)."""
    LEFT = "left"
    """A member left gracefully (it announced its own death). Also ourselves after ``leave()``."""
    REAPED = "reaped"
    """A dead or left member was forgotten after ``dead_reap_after``."""
    SEED_UNREACHABLE = "seed_unreachable"
    """A join attempt got no answer from any seed within ``join_retry_interval``; the join
    is retried. ``member`` is ourselves and ``seeds`` lists the addresses tried."""


@dataclass(frozen=True, slots=True)
class MemberEvent:
    kind: EventKind
    member: MemberView
    """The member the event is about, as it is right after the change."""
    now: float
    """When it happened (the ``now`` of the call that caused it)."""
    seeds: tuple[str, ...] = ()
    """Only for ``SEED_UNREACHABLE``: the seed addresses that did not answer."""
