"""The provider directory on virtual time: records, most recent first, expiry by the periodic
sweep (nobody asking), members leaving, bounds."""

from __future__ import annotations

from node.blobs.directory import ProviderDirectory

A, B, C = (bytes([i]) * 32 for i in (1, 2, 3))
X, Y = b"\x10" * 32, b"\x20" * 32


def test_records_expire_by_the_sweep_without_anyone_asking() -> None:
    d = ProviderDirectory(now=0.0, sweep_s=5.0)
    assert d.next_deadline() is None  # nothing recorded: no timer
    d.provide(A, [X, Y], ttl_s=6.0, now=0.0)
    d.provide(B, [X], ttl_s=60.0, now=1.0)
    assert d.find(X, now=1.0) == [B, A] and len(d) == 3
    assert d.next_deadline() == 5.0
    d.handle_timer(now=5.0)
    assert len(d) == 3 and d.next_deadline() == 10.0
    d.handle_timer(now=10.0)  # A's records ran out at 6.0: swept, not just hidden
    assert len(d) == 1 and d.expired == 2 and d.find(X, now=10.0) == [B] and d.find(Y, now=10.0) == []
    d.handle_timer(now=61.0)
    d.handle_timer(now=66.0)
    assert len(d) == 0 and d.next_deadline() is None


def test_expired_records_are_not_found_between_sweeps_and_refresh_moves_to_front() -> None:
    d = ProviderDirectory(now=0.0, sweep_s=5.0)
    d.provide(A, [X], ttl_s=2.0, now=0.0)
    d.provide(B, [X], ttl_s=60.0, now=0.0)
    assert d.find(X, now=3.0) == [B]
    d.provide(A, [X], ttl_s=60.0, now=3.0)
    assert d.find(X, now=3.0) == [A, B]


def test_members_that_leave_are_forgotten_and_bounds_hold() -> None:
    d = ProviderDirectory(now=0.0, max_blobs=1, max_holders=2)
    d.provide(A, [X], ttl_s=60.0, now=0.0)
    d.provide(B, [X, Y], ttl_s=60.0, now=0.0)  # Y: past max_blobs, ignored
    d.provide(C, [X], ttl_s=60.0, now=0.0)  # the oldest holder goes
    assert d.find(X, now=0.0) == [C, B] and d.find(Y, now=0.0) == [] and d.ignored == 1
    d.keep_only({C})
    assert d.find(X, now=0.0) == [C]
    d.drop_holder(C)
    assert len(d) == 0 and d.next_deadline() is None
