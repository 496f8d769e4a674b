"""The same job trained in one process: what a distributed run is measured against.

A distributed sync step with ``W`` workers reads ``W`` batches (one per worker, each at its own
(shard, position) cursor), averages the ``W`` gradients and takes one optimizer step. Since the
loss is a mean over equal batches, the average of the per-batch gradients is the gradient of the
mean of the per-batch losses: ``train_step`` computes exactly that in one process, by
accumulating ``loss_b / W`` over the step's batches (the same arithmetic up to floating-point
summation order). So ``train_reference(job, steps, plan=...)`` over the cursors the distributed run
consumed is the "same config trained in one process" at the same global batch.

``train_diloco_reference`` is DiLoCo's one-process counterpart: ``W`` replicas (one ``Job`` each,
built alike) each take ``H`` inner steps on their own cursors, their pseudo-gradients are
averaged exactly, and one outer Nesterov step moves them all (``diloco.OuterOptimizer``); what
the bench's DiLoCo run is compared with when the all-reduce's codec is taken out of the picture.

``accumulate`` and ``apply`` are the two halves of ``train_step``, for a worker that averages the
gradients between them (``accumulate`` its own batches, all-reduce ``p.grad``, ``apply``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from node.training.runner import diloco
from node.training.runner.job import Job

Cursor = tuple[int, int]
"""``(shard, position)``: where a batch is read (``Job.batch``)."""


def round_robin(step: int, *, workers: int, shards: int) -> list[Cursor]:
    """The cursors of step ``step`` when batch ``j = step * workers + w`` reads shard ``j % shards``
    at position ``j // shards``: shards consumed evenly, each in order, none read twice."""
    first = step * workers
    return [(j % shards, j // shards) for j in range(first, first + workers)]


def accumulate(job: Job, model: nn.Module, cursors: Sequence[Cursor], *,
               total: int | None = None) -> float:
    """Zero the gradients, then backpropagate the mean loss over the cursors' batches.

    Returns that mean loss. Afterwards ``p.grad`` is the gradient of the mean (module docstring).
    ``total``: divide each batch's loss by this many instead of ``len(cursors)``: a local rank's
    part of a mean over ``total`` batches that several ranks share (``local_ranks``), so that
    the parts add up to the mean.
    """
    model.zero_grad(set_to_none=True)
    count = len(cursors) if total is None else total
    mean = 0.0
    for shard, position in cursors:
        loss = job.loss(model, job.batch(shard, position)) / count
        loss.backward()  # type: ignore[no-untyped-call]
        mean += float(loss.detach())
    return mean


def apply(job: Job, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Clip the (averaged) gradient to ``job.grad_clip`` if set, and take the optimizer step."""
    if job.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.grad_clip)
    optimizer.step()


def train_step(job: Job, model: nn.Module, optimizer: torch.optim.Optimizer,
               cursors: Sequence[Cursor]) -> float:
    """One optimizer step on the mean loss of the cursors' batches; returns that loss."""
    loss = accumulate(job, model, cursors)
    apply(job, model, optimizer)
    return loss


def validation_loss(evaluate: Callable[[nn.Module], float], model: nn.Module) -> float:
    """``evaluate(model)`` as ``Job.evaluate`` expects it: eval mode, no grad (mode restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(evaluate(model))
    finally:
        model.train(was_training)


@dataclass(frozen=True, slots=True)
class ReferenceResult:
    """A one-process run: per-step mean losses, final validation loss, and its speed."""

    losses: list[float]
    val_loss: float
    seconds: float
    """Wall time of the training steps (evaluation not included)."""
    tokens_per_s: float
    """Tokens trained per second (``job.tokens_per_batch`` x batches / ``seconds``)."""

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, len(self.losses))


def train_reference(job: Job, steps: int, *, workers: int = 1,
                    plan: Callable[[int], Sequence[Cursor]] | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> ReferenceResult:
    """Train ``job.model`` in place for ``steps`` steps and evaluate it.

    Step ``s`` reads the batches at ``plan(s)``; by default ``round_robin(s, workers=workers,
    shards=job.shards)``, the global batch of ``workers`` workers.
    """
    model = job.model
    optimizer = optimizer or job.optimizer(model.parameters())

    def default_plan(step: int) -> list[Cursor]:
        return round_robin(step, workers=workers, shards=job.shards)

    cursors = plan or default_plan
    model.train()
    losses, batches = [], 0
    start = time.perf_counter()
    for step in range(steps):
        step_cursors = cursors(step)
        losses.append(train_step(job, model, optimizer, step_cursors))
        batches += len(step_cursors)
    seconds = time.perf_counter() - start
    val_loss = validation_loss(job.evaluate, model)
    return ReferenceResult(losses=losses, val_loss=val_loss, seconds=seconds,
                           tokens_per_s=job.tokens_per_batch * batches / max(seconds, 1e-9))


def train_diloco_reference(jobs: Sequence[Job], steps: int, *, inner_steps: int,
                           plan: Callable[[int], Sequence[Cursor]] | None = None,
                           outer_lr: float = diloco.OUTER_LR,
                           outer_momentum: float = diloco.OUTER_MOMENTUM) -> ReferenceResult:
    """DiLoCo with ``len(jobs)`` workers in one process (module docstring), in place.

    Inner step ``s`` of worker ``w`` reads ``plan(s)[w]`` (by default the round-robin plan, the
    same batches ``train_reference(..., workers=len(jobs))`` reads at step ``s``); after every
    ``inner_steps`` steps, and after the last, an outer step. ``losses[s]`` is the workers' mean
    inner loss; the validation loss is of the final global parameters.
    """
    if not jobs or inner_steps < 1:
        raise ValueError("train_diloco_reference needs at least one job and inner_steps >= 1")
    workers = len(jobs)
    models = [job.model for job in jobs]
    optimizers = [job.optimizer(model.parameters()) for job, model in zip(jobs, models, strict=True)]
    outer = diloco.OuterOptimizer(models[0], lr=outer_lr, momentum=outer_momentum)
    for model in models[1:]:
        diloco.unflatten_into(model, outer.params)

    def default_plan(step: int) -> list[Cursor]:
        return round_robin(step, workers=workers, shards=jobs[0].shards)

    cursors = plan or default_plan
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        step_cursors = cursors(step)
        step_losses = [train_step(job, model, opt, [cursor]) for job, model, opt, cursor
                       in zip(jobs, models, optimizers, step_cursors, strict=True)]
        losses.append(sum(step_losses) / workers)
        if (step + 1) % inner_steps == 0 or step + 1 == steps:
            _outer_round(outer, models)
    seconds = time.perf_counter() - start
    val_loss = validation_loss(jobs[0].evaluate, models[0])
    return ReferenceResult(losses=losses, val_loss=val_loss, seconds=seconds,
                           tokens_per_s=jobs[0].tokens_per_batch * workers * steps / max(seconds, 1e-9))


def _outer_round(outer: diloco.OuterOptimizer, models: Sequence[nn.Module]) -> None:
    """Average the replicas' pseudo-gradients, step ``θ``, restart every replica from it."""
    averaged = torch.stack([outer.pseudo_gradient(model) for model in models]).mean(0)
    outer.step(models[0], averaged)
    for model in models[1:]:
        diloco.unflatten_into(model, outer.params)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m node.training.runner.reference --options JSON --steps N [--threads T]``: the
    built-in char GPT trained here with those options; one JSON line (``val_loss``, ``seconds``,
    ``tokens_per_s``). What ``python -m node train --reference`` runs, in its own process (the
    submitter itself never imports torch)."""
    import argparse
    import json

    from node.training.runner import charlm

    p = argparse.ArgumentParser(prog="python -m node.training.runner.reference")
    p.add_argument("--options", default="{}", help="charlm options as a JSON object of strings")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    result = train_reference(charlm.make_job(json.loads(args.options)), args.steps)
    print(json.dumps({"val_loss": result.val_loss, "seconds": result.seconds,
                      "tokens_per_s": result.tokens_per_s}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
