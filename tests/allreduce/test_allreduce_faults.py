"""All-reduce state machines on virtual time: exact survivor means, every fault case, no hang.

Each test runs N real ``AllReduceRound`` cores through the real codecs in
``node.allreduce.testing`` (seeded delivery order, scripted faults) and checks what every
member returned: survivors all finish with exactly the fp64 mean of the survivors' inputs
cast to fp32 (bit for bit), report who was dropped and why, and nobody is left waiting.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from node.allreduce import AllReduceConfig, DropReason
from node.allreduce.testing import AllReduceSim, NodeOutcome, NodeScript, exact_mean

CFG = AllReduceConfig.test()
#: Virtual seconds within which every round here must be over (the longest fault path is
#: two deadlines plus a leader takeover, well under ``round_timeout``).
BOUND = 30.0


def inputs(n: int, numel: int = 1000, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(numel).astype(np.float32) for _ in range(n)]


def run(tensors: list[np.ndarray], scripts: dict[int, NodeScript] | None = None, *, seed: int = 0,
        **kw: object) -> tuple[AllReduceSim, dict[int, NodeOutcome]]:
    sim = AllReduceSim(tensors, scripts=scripts, seed=seed, config=kw.pop("config", CFG), **kw)  # type: ignore[arg-type]
    out = sim.run(until=10 * BOUND)
    for o in out.values():  # never hangs: every member that started and did not crash ended
        if o.started and not o.crashed:
            assert o.result is not None or o.error is not None, f"member {o.index} still waiting"
            assert o.ended_at is not None and o.ended_at < BOUND
    return sim, out


def contributors(sim: AllReduceSim, o: NodeOutcome) -> list[int]:
    assert o.result is not None
    return [sim.ids.index(c) for c in o.result.contributors]


def assert_survivors(sim: AllReduceSim, out: dict[int, NodeOutcome], tensors: list[np.ndarray],
                     survivors: list[int]) -> np.ndarray:
    """Every survivor finished with the exact mean over exactly the survivors."""
    expected = exact_mean(tensors, survivors)
    for m in survivors:
        o = out[m]
        assert o.error is None, f"survivor {m} failed: {o.error}"
        assert contributors(sim, o) == sorted(survivors)
        assert o.result is not None and np.array_equal(o.result.average, expected)
        assert set(o.result.dropped) == {sim.ids[i] for i in range(sim.n) if i not in survivors}
    return expected


@pytest.mark.parametrize("n", range(2, 9))
def test_exact_mean_for_every_group_size(n: int) -> None:
    tensors = inputs(n, numel=997, seed=n)
    sim, out = run(tensors, seed=n)
    assert_survivors(sim, out, tensors, list(range(n)))
    for o in out.values():
        assert o.result is not None and o.result.epoch == 1 and o.result.contributed
        assert o.parts_sent > 0 and o.averages_sent > 0


@pytest.mark.parametrize("n", [2, 4, 7])
def test_early_averages_overlap_the_reduce_scatter_and_stand(n: int) -> None:
    tensors = inputs(n, numel=5000, seed=n)
    plain = run(tensors, seed=n, config=CFG.replace(early_averages=False))[1]
    sim, out = run(tensors, seed=n)
    assert_survivors(sim, out, tensors, list(range(n)))
    commit = min(o.first_commit_at for o in out.values() if o.first_commit_at is not None)
    for m, o in out.items():
        # every average went out before the commit, none again after it: the same bytes
        assert o.averages_sent == o.early_averages_sent == plain[m].averages_sent > 0
        assert o.first_average_at is not None and o.first_average_at < commit
        assert o.result is not None and plain[m].result is not None
        assert np.array_equal(o.result.average, plain[m].result.average)
    assert max(o.ended_at or 0 for o in out.values()) < max(o.ended_at or 0 for o in plain.values())


def test_early_averages_are_redone_when_a_member_is_left_out() -> None:
    tensors = inputs(4, seed=11)
    tensors[2][7] = np.nan  # member 2's contribution is excluded: S is not the whole group
    sim, out = run(tensors)
    assert_survivors(sim, out, tensors, [0, 1, 3])  # member 2 is a receiver, not a contributor
    for o in out.values():
        assert o.result is not None and o.result.epoch == 1
    assert out[0].early_averages_sent == 0  # member 2's first part to owner 0 held the NaN
    for m in (1, 3):  # their early averages included member 2: sent, dropped, done again
        assert 0 < out[m].early_averages_sent < out[m].averages_sent


def test_an_early_average_from_the_wrong_member_is_a_protocol_error() -> None:
    tensors = inputs(3, seed=12)
    sim, out = run(tensors, {1: NodeScript(early_average_for=2)})
    assert_survivors(sim, out, tensors, [0, 2])
    assert {d.reason for d in out[0].dropped} == {DropReason.PROTOCOL_ERROR}


def test_reference_is_the_plain_numpy_mean() -> None:
    tensors = inputs(5, seed=9)
    plain = np.mean(np.stack(tensors).astype(np.float64), axis=0).astype(np.float32)
    _sim, out = run(tensors)
    assert out[3].result is not None and np.array_equal(out[3].result.average, plain)


def test_bit_identical_under_different_delivery_orders() -> None:
    tensors = inputs(6, numel=1500, seed=3)
    results, orders = [], set()
    for seed in range(6):
        _sim, out = run(tensors, seed=seed, jitter=0.01)
        results.append(out[2].result.average)  # type: ignore[union-attr]
        orders.add(tuple(round(o.ended_at or 0.0, 9) for o in out.values()))
    assert len(orders) > 1  # the seeds really did reorder the network
    assert all(np.array_equal(r, results[0]) for r in results)


def test_weighted_slices_and_tiny_tensors() -> None:
    for numel in (1, 3, 7, 200):
        tensors = inputs(4, numel=numel, seed=numel)
        sim, out = run(tensors, weights=[3.0, 0.0, 1.0, 0.5])
        assert_survivors(sim, out, tensors, [0, 1, 2, 3])


def test_through_the_wire_with_lossy_codec_every_member_gets_the_same_bits() -> None:
    tensors = inputs(5, numel=2000, seed=4)
    sim, out = run(tensors, codec="int8+zstd", wire=True, scripts={2: NodeScript(crash_after_averages=2)})
    results = [o.result for i, o in out.items() if i != 2]
    assert all(r is not None and np.array_equal(r.average, results[0].average) for r in results)  # type: ignore[union-attr]
    assert contributors(sim, out[0]) == [0, 1, 3, 4]
    err = np.abs(results[0].average - exact_mean(tensors, [0, 1, 3, 4])).max()  # type: ignore[union-attr]
    assert 0 < err < 0.05


# ---------------------------------------------------------------------- the six fault cases

FAULTS = {
    "fails-before": (NodeScript(start_at=None), DropReason.DIED),
    "fails-sending": (NodeScript(crash_after_parts=2), DropReason.DIED),
    "sends-slowly": (NodeScript(part_delay=100.0), DropReason.STALLED),
    "fails-reducing": (NodeScript(crash_after_averages=1), DropReason.DIED),
    "reduces-slowly": (NodeScript(average_delay=100.0), DropReason.STALLED),
    "cancels": (NodeScript(cancel_after_parts=1), DropReason.CANCELLED),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize(("n", "victim"), [(2, 0), (2, 1), (3, 0), (3, 2), (5, 1), (8, 0), (8, 7)])
def test_fault_case(fault: str, n: int, victim: int) -> None:
    script, reason = FAULTS[fault]
    tensors = inputs(n, seed=n * 10 + victim)
    sim, out = run(tensors, {victim: script}, seed=victim)
    survivors = [m for m in range(n) if m != victim]
    assert_survivors(sim, out, tensors, survivors)
    for m in survivors:
        assert out[m].result.dropped[sim.ids[victim]] is reason  # type: ignore[union-attr]
    v = out[victim]
    if fault == "cancels":
        assert v.error is not None and v.error.reason is DropReason.CANCELLED
    elif fault in ("sends-slowly", "reduces-slowly"):  # alive but dropped: told so, no result
        assert v.result is None and v.error is not None and v.error.reason is DropReason.STALLED
    else:
        assert v.crashed or not v.started


SILENT = {  # no failure notification: only the deadlines can tell
    "fails-before": NodeScript(start_at=None, notify=False),
    "fails-sending": NodeScript(crash_after_parts=3, notify=False),
    "fails-reducing": NodeScript(crash_after_averages=0, notify=False),
}


@pytest.mark.parametrize("fault", sorted(SILENT))
@pytest.mark.parametrize(("n", "victim"), [(3, 0), (4, 2), (6, 5)])
def test_silent_fault_is_found_by_deadlines(fault: str, n: int, victim: int) -> None:
    tensors = inputs(n, seed=victim)
    sim, out = run(tensors, {victim: SILENT[fault]}, seed=n)
    survivors = [m for m in range(n) if m != victim]
    assert_survivors(sim, out, tensors, survivors)
    assert out[survivors[0]].result.dropped[sim.ids[victim]] is DropReason.STALLED  # type: ignore[union-attr]


@pytest.mark.parametrize("victim", [0, 1])
def test_two_members_without_notification_fail_cleanly(victim: int) -> None:
    """A lone survivor that heard nothing cannot tell its isolation from the other's death."""
    _sim, out = run(inputs(2), {victim: NodeScript(crash_after_parts=1, notify=False)})
    other = out[1 - victim]
    assert other.result is None and other.error is not None and "isolated" in str(other.error)


HIVEMIND_PAIRS = [  # the pairs of hivemind's test_allreduce_fault_tolerance
    ("fails-before", "fails-before"),
    ("sends-slowly", "fails-sending"),
    ("fails-sending", "fails-before"),
    ("reduces-slowly", "fails-sending"),
    ("fails-reducing", "fails-reducing"),
    ("cancels", "fails-before"),
]


@pytest.mark.parametrize(("f0", "f1"), HIVEMIND_PAIRS)
@pytest.mark.parametrize("n", [4, 8])
def test_two_faults_at_once(f0: str, f1: str, n: int) -> None:
    tensors = inputs(n, seed=n)
    scripts = {0: FAULTS[f0][0], 1: FAULTS[f1][0]}
    sim, out = run(tensors, scripts, seed=n)
    assert_survivors(sim, out, tensors, list(range(2, n)))


# ---------------------------------------------------------------------- the leader fails


@pytest.mark.parametrize("notify", [True, False])
@pytest.mark.parametrize("sent", [1, 2, 3])
def test_leader_dies_halfway_through_its_finish(sent: int, notify: bool) -> None:
    """Members that missed AR_FINISH elect a successor, which finishes the same epoch (or
    learns from a finished member, still answering, that it is over): nobody gets other bits."""
    tensors = inputs(5, seed=sent)
    _sim, out = run(tensors, {0: NodeScript(crash_after_message=("ArFinish", sent), notify=notify)})
    expected = exact_mean(tensors, list(range(5)))
    for o in out.values():
        assert o.result is not None and np.array_equal(o.result.average, expected)


@pytest.mark.parametrize("notify", [True, False])
@pytest.mark.parametrize("sent", [1, 3])
def test_leader_dies_halfway_through_its_commit(sent: int, notify: bool) -> None:
    tensors = inputs(5, seed=sent)
    script = {0: NodeScript(crash_after_message=("ArCommit", sent), notify=notify)}
    sim, out = run(tensors, script, config=CFG.replace(early_averages=False))
    assert_survivors(sim, out, tensors, [1, 2, 3, 4])
    # With early averages the leader's slice average may have reached everyone before it
    # died: then its contribution stands (every survivor agrees, and says so), else it goes.
    sim, out = run(tensors, script)
    got = {tuple(contributors(sim, out[m])) for m in (1, 2, 3, 4)}
    assert len(got) == 1 and got <= {(0, 1, 2, 3, 4), (1, 2, 3, 4)}
    if got == {(1, 2, 3, 4)}:
        assert_survivors(sim, out, tensors, [1, 2, 3, 4])
    else:
        assert_agree(sim, out, tensors, [0, 1, 2, 3, 4], [1, 2, 3, 4])


def assert_agree(sim: AllReduceSim, out: dict[int, NodeOutcome], tensors: list[np.ndarray],
                 contributed: list[int], survivors: list[int]) -> None:
    """Every survivor finished with the exact mean over ``contributed``."""
    expected = exact_mean(tensors, contributed)
    for m in survivors:
        o = out[m]
        assert o.result is not None and contributors(sim, o) == contributed
        assert np.array_equal(o.result.average, expected)


def test_frozen_leader_is_superseded_and_told() -> None:
    tensors = inputs(5, seed=7)
    sim, out = run(tensors, {0: NodeScript(control_delay=5.0)})
    assert_survivors(sim, out, tensors, [1, 2, 3, 4])
    assert out[0].result is None and out[0].error is not None


def test_successive_leaders_die() -> None:
    tensors = inputs(6, seed=8)
    scripts = {0: NodeScript(crash_after_parts=1), 1: NodeScript(crash_after_message=("ArCommit", 2)),
               2: NodeScript(crash_after_averages=1, notify=False)}
    sim, out = run(tensors, scripts)
    assert_survivors(sim, out, tensors, [3, 4, 5])


# ---------------------------------------------------------------------- bad values


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(("n", "victim"), [(2, 1), (4, 0), (7, 3)])
def test_non_finite_contribution_is_excluded_not_averaged(bad: float, n: int, victim: int) -> None:
    tensors = inputs(n, seed=victim)
    tensors[victim][len(tensors[victim]) // 2] = bad
    sim, out = run(tensors)
    survivors = [m for m in range(n) if m != victim]
    expected = assert_survivors(sim, out, tensors, survivors)
    v = out[victim].result  # still a receiver: it gets the others' average
    assert v is not None and not v.contributed and np.array_equal(v.average, expected)
    assert v.dropped == {sim.ids[victim]: DropReason.NON_FINITE}


def test_norm_outlier_is_excluded_and_reported() -> None:
    tensors = inputs(5, seed=2)
    tensors[3] *= 1e4
    sim, out = run(tensors)
    survivors = [0, 1, 2, 4]
    expected = assert_survivors(sim, out, tensors, survivors)
    assert out[3].result is not None and np.array_equal(out[3].result.average, expected)
    assert out[0].result.dropped == {sim.ids[3]: DropReason.NORM_OUTLIER}  # type: ignore[union-attr]


def test_norm_check_needs_three_and_spares_moderate_spread() -> None:
    tensors = inputs(2, seed=1)
    tensors[1] *= 1e4  # two members: neither is the odd one out
    sim, out = run(tensors)
    assert_survivors(sim, out, tensors, [0, 1])
    tensors = inputs(4, seed=1)
    tensors[2] *= 20.0  # an unlucky honest small batch (simulations train saw 11.6x): kept
    sim, out = run(tensors)
    assert_survivors(sim, out, tensors, [0, 1, 2, 3])
    sim, out = run(tensors, config=CFG.replace(outlier_factor=10.0))  # a tighter rule drops it
    assert_survivors(sim, out, tensors, [0, 1, 3])


def test_late_start_within_join_timeout_is_included() -> None:
    tensors = inputs(4, seed=5)
    sim, out = run(tensors, {2: NodeScript(start_at=0.8), 0: NodeScript(start_at=0.3)})
    assert_survivors(sim, out, tensors, [0, 1, 2, 3])


# ---------------------------------------------------------------------- random faults


def _random_script(r: random.Random, tensors: list[np.ndarray], v: int) -> tuple[str, NodeScript]:
    kind = r.choice(["before", "sending", "slowsend", "reducing", "slowred", "cancel", "crash", "nan", "outlier",
                     "midcommit", "midfinish", "frozen"])
    notify = r.random() < 0.7
    if kind == "nan":
        tensors[v][r.randrange(tensors[v].size)] = np.nan
    if kind == "outlier":
        tensors[v] *= 1e4
    return kind, {
        "before": NodeScript(start_at=None, notify=notify),
        "sending": NodeScript(crash_after_parts=r.randint(0, 6), notify=notify),
        "slowsend": NodeScript(part_delay=r.choice([0.5, 5.0, 60.0])),
        "reducing": NodeScript(crash_after_averages=r.randint(0, 6), notify=notify),
        "slowred": NodeScript(average_delay=r.choice([0.5, 5.0, 60.0])),
        "cancel": NodeScript(cancel_at=r.random() * 0.05),
        "crash": NodeScript(crash_at=r.random() * 8, notify=notify),
        "midcommit": NodeScript(crash_after_message=("ArCommit", r.randint(1, 3)), notify=notify),
        "midfinish": NodeScript(crash_after_message=("ArFinish", r.randint(1, 3)), notify=notify),
        "frozen": NodeScript(control_delay=r.choice([0.5, 3.0, 20.0])),
    }.get(kind, NodeScript())


@pytest.mark.parametrize("trial", range(120))
def test_random_faults_keep_the_invariants(trial: int) -> None:
    """Up to three random faults: whoever returns a result returns the same bits, the exact
    mean of the contributors it reports; bad values never count; nobody hangs."""
    r = random.Random(trial)
    n = r.randint(2, 8)
    tensors = inputs(n, numel=r.randint(n, 1500), seed=trial)
    kinds, scripts = {}, {}
    for v in r.sample(range(n), r.randint(0, min(3, n - 1))):
        kinds[v], scripts[v] = _random_script(r, tensors, v)
    sim, out = run(tensors, scripts, seed=trial)
    results = [o.result for o in out.values() if o.result is not None]
    for res in results:
        c = [sim.ids.index(x) for x in res.contributors]
        assert c == [sim.ids.index(x) for x in results[0].contributors]
        assert np.array_equal(res.average, exact_mean(tensors, c))
        assert not any(kinds.get(m) == "nan" for m in c)
    healthy = [m for m in range(n) if m not in scripts]
    if n > 2 and len(healthy) >= 2:
        assert all(out[m].result is not None for m in healthy), [str(out[m].error) for m in healthy]
