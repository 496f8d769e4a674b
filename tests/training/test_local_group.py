"""The hierarchical reduction of a worker's local ranks (``node.training.runner.local_group``).

Two real local ranks on loopback gloo: this test process is rank 0 (as a job's worker
process is) and ``spawn_local_group`` starts rank 1. The rank functions below run in both;
each writes what it saw to ``out/rank<r>.pt`` and the test compares. Values are small
integers over powers of two, so every expected fp32 result is exact.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from node.training.runner.local_group import (
    ExchangeFailed,
    LocalGroup,
    LocalGroupError,
    local_devices,
    pin_threads,
    spawn_local_group,
    split_cpus,
)
from protocol.errors import ConfigError

N = 10
#: Examples per rank in the weighted step (host total 4: exact division).
EXAMPLES = (1, 3)
#: The "other host" the fake exchange averages with.
STORED = torch.full((N,), 0.5)
CPU2 = [torch.device("cpu"), torch.device("cpu")]


def rank_input(rank: int) -> torch.Tensor:
    return torch.arange(N, dtype=torch.float32) * (rank + 1) + rank


class FakeExchange:
    """The mesh all-reduce, faked: the mean with a stored vector (a second host), or +1."""

    def __init__(self, *, fail_at: int | None = None) -> None:
        self.calls: list[float] = []
        self.fail_at = fail_at

    def __call__(self, average: torch.Tensor, *, examples: float) -> torch.Tensor:
        self.calls.append(examples)
        if len(self.calls) - 1 == self.fail_at:
            raise RuntimeError("mesh round failed (fake)")
        if examples == 2.0:  # the unweighted step
            return average + 1
        if average.numel() != N:  # the training steps: a second host whose gradient is zero
            return average / 2
        return (average + STORED) / 2


def train_ranks(group: LocalGroup, out: str) -> None:
    """Runs in both ranks: exact reductions, an exchange failure, then training steps."""
    exchange = FakeExchange(fail_at=2)
    seen: dict[str, Any] = {"rank": group.rank, "world": group.world,
                            "affinity": sorted(os.sched_getaffinity(0)),
                            "threads": torch.get_num_threads()}
    weighted = group.reduce(rank_input(group.rank), exchange, examples=EXAMPLES[group.rank])
    unweighted = group.reduce(rank_input(group.rank), exchange)
    seen["weighted"], seen["unweighted"] = weighted.clone(), unweighted.clone()
    try:
        group.reduce(rank_input(group.rank), exchange)
    except ExchangeFailed as exc:
        seen["failed"] = f"ExchangeFailed: {exc}"
    except RuntimeError as exc:
        seen["failed"] = f"RuntimeError: {exc}"

    torch.manual_seed(100 + group.rank)  # different initial weights: broadcast must fix them
    model = torch.nn.Linear(8, 4)
    group.broadcast_parameters(model)
    seen["initial"] = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(7 + group.rank)
    batch = 4 + 2 * group.rank  # ranks' batches differ in size
    local_grads = []
    for _ in range(4):
        x = torch.randn(batch, 8, generator=data)
        loss = ((model(x) - x[:, :4]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        local_grads.append(model.weight.grad.detach().clone())  # type: ignore[union-attr]
        group.reduce_gradients(model.parameters(), exchange, examples=batch)
        optimizer.step()
    seen["local_grads"] = local_grads
    seen["final"] = [p.detach().clone() for p in model.parameters()]
    seen["divergence"] = group.parameters_divergence(model)
    seen["exchange_calls"] = list(exchange.calls)
    torch.save(seen, Path(out) / f"rank{group.rank}.pt")


def raise_on_rank1(group: LocalGroup, step: int) -> None:
    for i in range(3):
        if group.rank == 1 and i == step:
            raise RuntimeError("boom from rank 1")
        group.reduce(torch.ones(N))


def stall_on_rank1(group: LocalGroup, seconds: float) -> None:
    if group.rank == 1:
        time.sleep(seconds)
        return
    group.reduce(torch.ones(N))


def test_two_gloo_ranks_reduce_hierarchically(tmp_path: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    with spawn_local_group(train_ranks, devices=CPU2, args=(str(tmp_path),),
                           cpus=[cpus, cpus[:1]], timeout=20.0, start_timeout=60.0) as ranks:
        assert ranks.group.backend == "gloo" and (ranks.group.rank, ranks.group.world) == (0, 2)
        train_ranks(ranks.group, str(tmp_path))
        ranks.join(timeout=20.0)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))

    a, b = rank_input(0), rank_input(1)
    expected_weighted = ((a * EXAMPLES[0] + b * EXAMPLES[1]) / sum(EXAMPLES) + STORED) / 2
    expected_unweighted = (a + b) / 2 + 1
    for seen in (r0, r1):
        assert torch.equal(seen["weighted"], expected_weighted)
        assert torch.equal(seen["unweighted"], expected_unweighted)
    # Rank 0 re-raises its exchange's own error; rank 1 learns of it instead of hanging.
    assert r0["failed"] == "RuntimeError: mesh round failed (fake)"
    assert r1["failed"].startswith("ExchangeFailed:") and "mesh round failed (fake)" in r1["failed"]
    # Exactly once per step, only on rank 0: 3 reductions + 4 training steps; the host
    # totals it was given: 1+3, 2 ranks unweighted (twice), then 4+6 examples per step.
    assert r0["exchange_calls"] == [4.0, 2.0, 2.0] + [10.0] * 4
    assert r1["exchange_calls"] == []

    assert all(torch.equal(p, q) for p, q in zip(r0["initial"], r1["initial"], strict=True))
    assert not torch.equal(r0["local_grads"][0], r1["local_grads"][0])  # the ranks' gradients differ
    assert all(torch.equal(p, q) for p, q in zip(r0["final"], r1["final"], strict=True))
    assert not torch.equal(r0["final"][0], r0["initial"][0])  # it trained
    assert r0["divergence"] == r1["divergence"] == 0.0
    assert r1["affinity"] == cpus[:1] and r1["threads"] == 1  # pinned by spawn_local_group


def test_a_rank_that_raises_fails_the_others_reduce(tmp_path: Path) -> None:
    with spawn_local_group(raise_on_rank1, devices=CPU2, args=(1,), timeout=60.0) as ranks:
        ranks.group.reduce(torch.ones(N))
        start = time.monotonic()
        with pytest.raises(LocalGroupError, match=r"all-reduce of step 1 failed.*boom from rank 1"):
            ranks.group.reduce(torch.ones(N))
        assert time.monotonic() - start < 30.0  # the dead peer is noticed, not the 60 s timeout
        with pytest.raises(LocalGroupError, match="unusable"):
            ranks.group.reduce(torch.ones(N))
        with pytest.raises(LocalGroupError, match="local rank 1 exited with code 1: RuntimeError: boom"):
            ranks.join(timeout=20.0)


def test_a_stuck_rank_times_out_the_group() -> None:
    with spawn_local_group(stall_on_rank1, devices=CPU2, args=(30.0,), timeout=1.5) as ranks:
        start = time.monotonic()
        with pytest.raises(LocalGroupError, match=r"no local rank reported an error.*timeout \(1\.5 s\)"):
            ranks.group.reduce(torch.ones(N))
        assert 1.0 < time.monotonic() - start < 15.0
        ranks.close(grace=0.0)
        assert ranks.processes[0].exitcode is not None


def test_one_rank_is_the_degenerate_group() -> None:
    group = LocalGroup.single()
    exchange = FakeExchange()
    flat = rank_input(1)
    assert group.reduce(flat, exchange, examples=4) is flat
    assert torch.equal(flat, (rank_input(1) + STORED) / 2)
    assert exchange.calls == [4.0]
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    model.bias.grad = None  # a parameter without a gradient gets the (zero) average
    group.reduce_gradients(model.parameters(), lambda g, *, examples: g * 2)
    assert torch.equal(model.weight.grad, torch.ones(2, 3) * 2)  # type: ignore[arg-type]
    assert torch.equal(model.bias.grad, torch.zeros(2))  # type: ignore[arg-type]
    group.broadcast_parameters(model)
    assert group.parameters_divergence(model) == 0.0
    with pytest.raises(ConfigError):
        group.reduce(torch.ones(3, dtype=torch.int64))


@pytest.mark.parametrize(("cpus", "world", "expected"), [
    ([0, 1, 2, 3], 1, [[0, 1, 2, 3]]),
    ([0, 1, 2, 3], 2, [[0, 1], [2, 3]]),
    ([0, 1, 2, 3, 4], 2, [[0, 1, 2], [3, 4]]),
    ([4, 5, 6, 7, 8, 9, 10], 3, [[4, 5, 6], [7, 8], [9, 10]]),
    ([3], 2, [[3], [3]]),
    ([0, 1], 3, [[0], [1], [0]]),
])
def test_split_cpus(cpus: list[int], world: int, expected: list[list[int]]) -> None:
    assert split_cpus(cpus, world) == expected


def test_devices_and_pinning_errors() -> None:
    if not torch.cuda.is_available():
        assert local_devices() == [torch.device("cpu")]
        with pytest.raises(ConfigError, match="asks for 1 GPUs per worker; this host has 0"):
            local_devices(1)
    assert local_devices(0) == [torch.device("cpu")]
    with pytest.raises(ConfigError):
        split_cpus([], 2)
    with pytest.raises(ConfigError):
        pin_threads([])
