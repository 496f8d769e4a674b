"""The one-process run consumes what W workers would, and its step is their averaged step."""

from __future__ import annotations

import torch

from node.training.runner import charlm, reference


def test_round_robin_reads_every_shard_in_order() -> None:
    plan = [reference.round_robin(s, workers=3, shards=4) for s in range(4)]
    assert plan[0] == [(0, 0), (1, 0), (2, 0)] and plan[1] == [(3, 0), (0, 1), (1, 1)]
    flat = [c for step in plan for c in step]
    assert len(set(flat)) == 12
    assert sorted(p for s, p in flat if s == 2) == [0, 1, 2]


def test_accumulated_gradient_is_the_workers_mean(tiny: dict[str, str]) -> None:
    job = charlm.make_job(tiny)
    cursors = reference.round_robin(0, workers=3, shards=job.shards)
    loss = reference.accumulate(job, job.model, cursors)
    together = [p.grad.clone() for p in job.model.parameters() if p.grad is not None]
    per_worker, losses = [], []
    for cursor in cursors:
        losses.append(reference.accumulate(job, job.model, [cursor]))
        per_worker.append([p.grad.clone() for p in job.model.parameters() if p.grad is not None])
    mean = [torch.stack(g).mean(0) for g in zip(*per_worker, strict=True)]
    assert abs(loss - sum(losses) / 3) < 1e-5
    for a, b in zip(together, mean, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_clipping_bounds_the_step(tiny: dict[str, str]) -> None:
    job = charlm.make_job(tiny | {"grad_clip": "1e-3"})
    optimizer = torch.optim.SGD(job.model.parameters(), lr=1.0)
    reference.accumulate(job, job.model, [(0, 0)])
    before = [p.detach().clone() for p in job.model.parameters()]
    reference.apply(job, job.model, optimizer)
    moved = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(job.model.parameters(), before, strict=True)])
    assert float(moved.norm()) <= 1e-3 * 1.0001


def test_reference_run_is_deterministic(tiny: dict[str, str]) -> None:
    a = reference.train_reference(charlm.make_job(tiny), 5, workers=2)
    b = reference.train_reference(charlm.make_job(tiny), 5, workers=2)
    assert a.losses == b.losses and a.val_loss == b.val_loss and len(a.losses) == 5
    assert a.tokens_per_s > 0 and a.seconds_per_step > 0
    custom = reference.train_reference(charlm.make_job(tiny), 2, plan=lambda s: [(s, 0)])
    assert custom.losses[0] == reference.train_reference(charlm.make_job(tiny), 1).losses[0]


def test_diloco_reference_with_plain_averaging_of_one_worker_is_plain_training(tiny: dict[str, str]) -> None:
    plain = charlm.make_job(tiny)
    reference.train_reference(plain, 6)
    job = charlm.make_job(tiny)
    result = reference.train_diloco_reference([job], 6, inner_steps=3, outer_lr=1.0, outer_momentum=0.0)
    assert len(result.losses) == 6
    for a, b in zip(plain.model.parameters(), job.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_diloco_reference_keeps_replicas_identical_after_each_round(tiny: dict[str, str]) -> None:
    jobs = [charlm.make_job(tiny) for _ in range(2)]
    result = reference.train_diloco_reference(jobs, 5, inner_steps=2)
    for a, b in zip(jobs[0].model.parameters(), jobs[1].model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert result.val_loss < 4.2 and len(result.losses) == 5
