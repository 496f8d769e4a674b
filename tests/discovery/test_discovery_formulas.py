"""Table tests for the pure formulas and the small parts (memberlist suspicion_test.go, util_test.go)."""

from __future__ import annotations

import math

import pytest

from discovery.broadcast import FEEDBACK_ABOVE, BroadcastQueue, retransmit_limit
from discovery.config import SwimConfig
from discovery.suspicion import (
    Suspicion,
    expected_confirmations,
    remaining_suspicion_time,
    suspicion_timeout,
)
from protocol.errors import ConfigError
from protocol.messages.gossip import Alive, Dead, NodeMeta, Suspect

A, B, C, D, E = (bytes([i]) * 32 for i in range(1, 6))


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, 1.0), (5, 1.0), (10, 1.0), (50, 1.698), (100, 2.0), (500, 2.698), (1000, 3.0)],
)
def test_suspicion_timeout_scales_with_log10_n(n: int, expected: float) -> None:
    # memberlist util_test.go TestSuspicionTimeout: suspicionTimeout(3, n, 1s) / 3
    assert suspicion_timeout(3, n, 1.0) / 3 == pytest.approx(expected, abs=1e-9)


def test_suspicion_timeout_is_mult_times_interval_for_small_meshes() -> None:
    assert suspicion_timeout(8, 8, 0.5) == 4.0
    assert suspicion_timeout(4, 0, 0.25) == 1.0


@pytest.mark.parametrize(
    ("confirmations", "k", "elapsed", "expected"),
    [
        (0, 3, 0.0, 30.0),
        (1, 3, 2.0, 14.0),
        (2, 3, 3.0, 4.81),
        (3, 3, 4.0, -2.0),
        (4, 3, 5.0, -3.0),
        (5, 3, 10.0, -8.0),
    ],
)
def test_remaining_suspicion_time_table(
    confirmations: int, k: int, elapsed: float, expected: float
) -> None:
    # min 2 s, max 30 s, as memberlist suspicion_test.go TestSuspicion_remainingSuspicionTime
    got = remaining_suspicion_time(confirmations, k, elapsed, 2.0, 30.0)
    assert got == pytest.approx(expected, abs=1e-9)


def test_remaining_suspicion_time_without_expected_confirmations_is_min() -> None:
    assert remaining_suspicion_time(0, 0, 1.5, 4.0, 8.0) == 2.5


@pytest.mark.parametrize(
    ("mult", "n", "k"),
    [(4, 8, 2), (4, 4, 2), (4, 3, 0), (8, 8, 6), (8, 7, 0), (2, 100, 0), (6, 1000, 4)],
)
def test_expected_confirmations(mult: int, n: int, k: int) -> None:
    assert expected_confirmations(mult, n) == k


def test_suspicion_starts_at_max_and_shrinks_with_new_independent_confirmations() -> None:
    s = Suspicion(sender=A, k=3, min_timeout=2.0, max_timeout=30.0, now=100.0)
    assert s.deadline == 130.0
    assert not s.confirm(A)  # the first suspector is not a confirmation
    assert s.confirm(B)
    assert s.deadline == pytest.approx(116.0)
    assert not s.confirm(B)  # not independent
    assert s.deadline == pytest.approx(116.0)
    assert s.confirm(C)
    assert s.deadline == pytest.approx(107.81)
    assert s.confirm(D)
    assert s.deadline == pytest.approx(102.0)
    assert not s.confirm(E)  # k reached: nothing more to shrink
    assert s.confirmations == 3


def test_suspicion_with_k_zero_is_min_timeout() -> None:
    s = Suspicion(sender=A, k=0, min_timeout=4.0, max_timeout=8.0, now=1.0)
    assert s.deadline == 5.0
    assert not s.confirm(B)
    assert s.deadline == 5.0


@pytest.mark.parametrize(
    ("mult", "n", "limit"), [(3, 0, 0), (3, 1, 3), (3, 99, 6), (4, 8, 4), (4, 1000, 16)]
)
def test_retransmit_limit(mult: int, n: int, limit: int) -> None:
    assert retransmit_limit(mult, n) == limit
    assert limit == mult * math.ceil(math.log10(n + 1))


def _alive(node: bytes, inc: int = 0) -> Alive:
    return Alive(incarnation=inc, node=node, address="h:1", meta=NodeMeta())


def test_broadcast_queue_orders_by_fewest_transmits_then_newest() -> None:
    q = BroadcastQueue(retransmit_mult=3, max_size=10)
    q.queue(A, _alive(A))
    q.queue(B, _alive(B))
    assert q.get(1, n_members=9) == [_alive(B)]  # newest first
    q.queue(C, _alive(C))
    assert q.get(2, n_members=9) == [_alive(C), _alive(A)]  # both unsent; B was sent once
    assert q.get(5, n_members=9) == [_alive(C), _alive(B), _alive(A)]  # all sent once: newest first


def test_broadcast_queue_retires_items_after_the_retransmit_limit() -> None:
    q = BroadcastQueue(retransmit_mult=2, max_size=10)
    q.queue(A, _alive(A))
    # n = 9 members: limit 2 * ceil(log10(10)) = 2 transmissions
    assert q.get(3, n_members=9) == [_alive(A)]
    assert q.get(3, n_members=9) == [_alive(A)]
    assert q.get(3, n_members=9) == []
    assert len(q) == 0


def test_broadcast_queue_newer_news_about_a_member_invalidates_older() -> None:
    q = BroadcastQueue(retransmit_mult=3, max_size=10)
    q.queue(A, _alive(A, 1))
    q.queue(B, _alive(B))
    q.get(2, n_members=5)
    suspect = Suspect(incarnation=1, node=A, sender=B)
    q.queue(A, suspect)
    dead = Dead(incarnation=1, node=A, sender=C)
    q.queue(A, dead)
    assert len(q) == 2
    assert q.pending() == [dead, _alive(B)]
    assert q.get(10, n_members=5) == [dead, _alive(B)]


def test_broadcast_queue_is_bounded_dropping_the_most_sent() -> None:
    q = BroadcastQueue(retransmit_mult=10, max_size=3)
    for node in (A, B, C):
        q.queue(node, _alive(node))
    q.get(2, n_members=5)  # C and B sent once
    q.queue(D, _alive(D))
    q.queue(E, _alive(E))
    assert len(q) == 3
    assert q.dropped == 2
    assert q.pending() == [_alive(E), _alive(D), _alive(A)]
    for i in range(200):  # heap garbage stays bounded as well
        q.queue(A, _alive(A, i))
    assert len(q._heap) <= 2 * len(q) + 64


def test_presets_are_valid_and_distinct() -> None:
    presets = [SwimConfig.lan(), SwimConfig.wan(), SwimConfig.local(), SwimConfig.test()]
    assert len(set(presets)) == 4
    assert SwimConfig.lan() == SwimConfig()


def test_local_preset_meets_its_freeze_and_detection_budget() -> None:
    cfg = SwimConfig.local()
    n = 8
    min_t = suspicion_timeout(cfg.suspicion_mult, n, cfg.probe_interval)
    # A member frozen 3 s must not be declared dead: even a suspicion that started the moment
    # it froze must outlast the freeze plus one probe interval.
    assert min_t > 3.0 + cfg.probe_interval
    # kill -9: everyone suspects within ~2 probe periods, then the minimum timeout, then gossip.
    assert 2 * cfg.probe_interval + min_t + 3 * cfg.gossip_interval < 6.0
    assert expected_confirmations(cfg.suspicion_mult, n) == n - 2


@pytest.mark.parametrize(
    "changes",
    [
        {"probe_interval": 0.0},
        {"probe_timeout": 1.0},
        {"gossip_nodes": 0},
        {"indirect_checks": -1},
        {"dead_reap_after": 1.0},
        {"max_broadcasts": 0},
    ],
)
def test_config_rejects_nonsense(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        SwimConfig.lan().replace(**changes)


def test_hearing_our_own_news_from_someone_else_counts_as_a_transmission() -> None:
    q = BroadcastQueue(retransmit_mult=1, max_size=1000)  # n = 99: limit 1 * 2 = 2
    q.queue(A, _alive(A))
    q.queue(B, _alive(B))
    q.heard(A, _alive(A))  # a short queue: every item keeps its full limit
    assert q.get(5, n_members=99) == [_alive(B), _alive(A)]
    others = [bytes([9, i]) * 16 for i in range(FEEDBACK_ABOVE)]
    for key in others:  # under pressure
        q.queue(key, _alive(key))
    q.heard(A, _alive(A, 5))  # different news about A: not ours, ignored
    q.heard(A, _alive(A))  # A's second (last) transmission is used up
    sent = q.get(200, n_members=99)
    assert _alive(A) not in sent
    assert _alive(B) in sent  # B was not heard: it gets its second transmission


def test_urgent_news_goes_before_everything_else() -> None:
    q = BroadcastQueue(retransmit_mult=3, max_size=10)
    suspect = Suspect(incarnation=0, node=A, sender=B)
    q.queue(A, suspect, urgent=True)
    q.get(1, n_members=9)  # sent once already
    q.queue(C, _alive(C))
    q.queue(D, _alive(D))
    assert q.get(2, n_members=9) == [suspect, _alive(D)]
