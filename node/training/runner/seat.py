"""One worker's seat of a training job: the training process's logic, without its pipes.

Theory of operation
-------------------
A ``Session`` is one job as this worker holds it in memory across segments: the ``Job`` that
``make_job(options)`` built, its model on the session's device, the (inner, in DiLoCo)
optimizer, DiLoCo's ``OuterOptimizer``, and the *shared buffer*: ``numel`` float32s (every
parameter, ``model.parameters()`` order, tied ones once) that the node all-reduces in place
(``attach`` swaps in the node's shared-memory view; until then a private tensor).

``run_seat(seat, exchange=, put=, progress=, state_file=)`` trains steps ``seat.start ..
seat.end`` and returns the ``SeatReport``. Its parts, in order:

1. *State.* What the session holds is ``held`` (the state blob id it reported last; ``None``
   with ``fresh`` set: the seed's initial state, untouched). ``seat.state is None`` means
   "start from the seed": a session that is not fresh rebuilds the job (same seed, same
   parameters on every worker). A ``seat.state`` equal to ``held`` continues in memory.
   Anything else, or any seat after one that failed (the session is *dirty* from the first
   step of a seat until its report), loads ``state_file`` bit-exactly (``state.load_state``)
   into a fresh optimizer; without a file the seat fails ``StateMissing``.
2. *Data.* ``seat.cursors`` are this worker's shards: local step ``i`` reads the shard
   ``cursors[i % len(cursors)]`` at its current position and advances it; the report carries
   every shard's next position.
3. *Sync mode*, per step ``s``: ``reference.accumulate`` (zero grads, backward) → the flat
   gradient into the buffer → ``exchange(s, buffer, examples=1)`` (the group's mean, in place)
   → clip to ``job.grad_clip`` with a norm computed in float64 by numpy over the averaged
   buffer (one coefficient, bit-identical on every worker whatever its thread count) → the
   buffer back into every ``p.grad`` → ``optimizer.step()``. Every worker applies the same
   bytes to the same state, so every worker ends the seat with the same parameters and
   optimizer state, and the same state blob: ``state_bytes(model, optimizer)`` with metadata
   of the job step and mode only (nothing per worker).
4. *DiLoCo mode* (a segment is H inner steps): the inner steps run locally (accumulate,
   ``reference.apply``: the job's own clip and step), then the pseudo-gradient ``θ - θ_i``
   goes through the buffer, is exchanged once under the key step ``seat.end - 1`` (examples:
   the seat's batches) and ``OuterOptimizer.step`` applies the mean. The shared state is model
   + outer params and momentum (``state_bytes(model, None, outer=...)``); the inner AdamW
   moments are this worker's and stay in memory (fresh after a load).
5. *End.* The state is written under ``work`` and ``put(path, "state", copies)`` (2 copies at
   a checkpoint, else 0) returns its blob id, the report's ``state``; then the validation loss
   (``seat.evaluate``) and, on rank 0 of the final seat, the export (``export_model``).

*Local ranks.* With ``helpers`` set (``local_ranks.GradientRanks``: this process is local rank
0 of G), a step's (or an inner step's) ``reference.accumulate`` is replaced by
``helpers.gradient``: the G ranks each compute a slice of the step's reads at this process's
parameters and their parts are summed locally, leaving the same mean gradient in ``p.grad``
(to float32 summation order; ``local_ranks``' docstring). Everything else above runs here only,
unchanged: the exchange (once per step), the clip and optimizer, DiLoCo's outer step, state,
listeners (which compute nothing). Before a seat with a share the helpers are spawned afresh if
they failed (``SeatError`` ``LocalRankFailed`` if they cannot be); a helper failing mid-seat
fails the seat ``LocalRankFailed``, and job code raising in a helper fails it with that
error's type.

Non-finite losses: ``protocol.schema.Float`` refuses NaN and infinities, so a loss (or
validation loss) that is not finite is reported as ``±NONFINITE_LOSS`` (NaN as ``+``): finite,
unmistakable, and a mean over up to 256 workers of it stays finite. The step still exchanges:
the all-reduce leaves this worker's non-finite contribution out and returns the others' mean
(a round with no contributor fails the seat ``NoContributors``). In DiLoCo a non-finite inner
loss also poisons the worker's AdamW moments: after the outer step puts the model back at the
mean, the inner optimizer starts afresh.

``exchange``'s ``examples`` (the weight the node may give this worker's part): 1 per sync step
(one batch), the seat's batch count for a DiLoCo round.

Timing: ``compute_s`` is the time outside ``exchange`` and ``put`` from the first step to the
end of the last optimizer step; ``comm_s`` the time inside ``exchange``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch
from torch import nn

from node.training import elastic
from node.training.runner import diloco, export, reference, state
from node.training.runner.job import Job
from node.training.runner.local_group import LocalGroupError
from node.training.runner.local_ranks import GradientRanks, RankRaised
from protocol.messages.training import Export, Seat, SeatReport, ShardCursor

#: What a non-finite loss is reported as (module docstring).
NONFINITE_LOSS = 1e30
#: Steps of the fine-tune after pruning the exported model, unless "open" says otherwise.
FINE_TUNE_STEPS = 20
#: Most characters of the exported sample (``Export.sample``).
MAX_SAMPLE_CHARS = 4096
#: Most bytes of the packed export report (``Export.report``).
MAX_EXPORT_REPORT = 16384
#: Most bytes of round means a listener keeps before it waits for its state.
MAX_KEPT_BYTES = 1 << 30
#: ``torch.nn.utils.clip_grad_norm_``'s epsilon, so the coefficient is the same formula.
CLIP_EPS = 1e-6

Exchange = Callable[[int, torch.Tensor, float], tuple[int, int]]
"""``exchange(step, buffer, examples)``: average ``buffer`` (the session's, flat float32 CPU) in
place over the group; returns ``(contributors, bytes_sent)``."""
Put = Callable[[Path, str, int], bytes]
"""``put(path, what, copies)``: the file becomes a blob (the node's afterwards); its id."""
Arrived = Callable[[bool], str | None]
"""``arrived(wait)``: a listener's state file once the node has fetched it (None: not yet;
``wait``: block until it has)."""
ProgressFn = Callable[[int, float, float], None]
"""``progress(step, loss, tokens_s)`` after each step (the caller rate-limits)."""


class SeatError(Exception):
    """A seat that cannot run as given (its ``kind`` is the failure's type)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionConfig:
    """What the node's "open" frame sets besides the job function and its options."""

    work: Path
    """The directory state and model files are written in (the node moves them away)."""
    mode: str = "sync"
    """``"sync"`` or ``"diloco"``."""
    outer_lr: float = diloco.OUTER_LR
    outer_momentum: float = diloco.OUTER_MOMENTUM
    prune: float = 0.0
    """Sparsity of the exported model (0: no pruning)."""
    quantize: str = "none"
    """``"none"`` or ``"int8"`` (``export.quantize_int8``) for the exported model."""
    fine_tune_steps: int = FINE_TUNE_STEPS
    """Steps of the fine-tune after pruning (on this worker's shards, past the job's cursors)."""

    def __post_init__(self) -> None:
        if self.mode not in ("sync", "diloco"):
            raise ValueError(f"mode {self.mode!r} is not sync or diloco")
        if self.quantize not in ("none", "int8"):
            raise ValueError(f"quantize {self.quantize!r} is not none or int8")
        if not 0 <= self.prune < 1 or self.fine_tune_steps < 0:
            raise ValueError(f"prune {self.prune} must be in [0, 1), fine-tune steps >= 0")


@dataclass(slots=True)
class _Tally:
    """A seat's figures as it runs."""

    compute_s: float = 0.0
    comm_s: float = 0.0
    rounds: int = 0
    contributors_min: int = 0
    bytes_sent: int = 0
    batches: int = 0
    losses: list[float] = field(default_factory=list)


def reportable(value: float) -> float:
    """``value`` if finite, else ``±NONFINITE_LOSS`` (NaN: ``+``): what ``Float()`` accepts."""
    if math.isfinite(value):
        return value
    return -NONFINITE_LOSS if value == -math.inf else NONFINITE_LOSS


def clip_coefficient(flat: torch.Tensor, max_norm: float) -> float:
    """``min(1, max_norm / (‖flat‖ + 1e-6))`` with the norm summed in float64 by numpy (pairwise
    summation, single-threaded): the same bits on every worker for the same ``flat``."""
    values = flat.detach().cpu().numpy().astype(np.float64)
    norm = math.sqrt(float(np.sum(values * values)))
    if not math.isfinite(norm):
        return 1.0
    return min(1.0, max_norm / (norm + CLIP_EPS))


class Session:
    """One job held in memory across seats (module docstring)."""

    def __init__(self, build: Callable[[], Job], config: SessionConfig, *,
                 device: torch.device | None = None) -> None:
        self._build = build
        self.config = config
        self.device = device or torch.device("cpu")
        self.held: bytes | None = None
        """The state blob id in memory (None: the seed's, while ``fresh``)."""
        self.fresh = True
        """The model and optimizer are as ``make_job`` built them."""
        self.dirty = False
        """A seat began and did not report: the memory holds no committed state."""
        self._install(build())
        self.numel = sum(p.numel() for p in self._params)
        """Elements of the shared buffer (every parameter once)."""
        self.buffer = torch.zeros(self.numel, dtype=torch.float32)
        self.helpers: GradientRanks | None = None
        """This worker's local ranks 1..G-1 (``local_ranks``), which compute their slices of
        every gradient; None: this process computes them alone."""

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The model's parameter shapes, ``model.parameters()`` order (what helpers must build)."""
        return [tuple(p.shape) for p in self._params]

    @property
    def tokens_per_batch(self) -> int:
        return self.job.tokens_per_batch

    def attach(self, buffer: torch.Tensor) -> None:
        """Use ``buffer`` (the node's shared memory: ``numel`` float32s on the CPU) from now on."""
        if buffer.dtype != torch.float32 or buffer.shape != (self.numel,) or buffer.device.type != "cpu":
            raise ValueError(f"shared buffer of {buffer.dtype}{list(buffer.shape)} on {buffer.device}; "
                             f"{self.numel} float32 on the CPU needed")
        self.buffer = buffer

    def _install(self, job: Job) -> None:
        self.job = job
        self.model: nn.Module = job.model.to(self.device)
        self.model.train()
        self._params = list(self.model.parameters())
        self.optimizer = job.optimizer(self._params)
        self.outer: diloco.OuterOptimizer | None = None
        if self.config.mode == "diloco":
            self.outer = diloco.OuterOptimizer(self.model, lr=self.config.outer_lr,
                                               momentum=self.config.outer_momentum)

    # ------------------------------------------------------------------ a seat

    def run_seat(self, seat: Seat, *, exchange: Exchange, put: Put, progress: ProgressFn,
                 state_file: str | None = None, arrived: Arrived | None = None) -> SeatReport:
        """Train the seat and report it (module docstring). A raise leaves the session dirty."""
        if seat.end <= seat.start:
            raise SeatError("BadSeat", f"seat covers no steps ({seat.start}..{seat.end})")
        share = elastic.group_shares(seat.shares, len(seat.group))[seat.rank]
        if share == 0:
            return self._listen(seat, exchange=exchange, put=put, state_file=state_file, arrived=arrived)
        if not seat.cursors:
            raise SeatError("BadSeat", "seat has no data shards (more workers than shards?)")
        wide = [c.shard for c in seat.cursors if c.shard >= self.job.shards]
        if wide:
            raise SeatError("BadJob", f"the job has {self.job.shards} data shards (Job.shards) but the "
                            f"seat reads shard {wide[0]}: submit it with --shards {self.job.shards}")
        self._start_from(seat, state_file)
        self.fresh, self.dirty = False, True
        if self.helpers is not None:
            try:
                self.helpers.ensure()
            except LocalGroupError as exc:
                raise SeatError("LocalRankFailed", f"the local ranks did not start: {exc}") from exc
        positions = {c.shard: c.position for c in seat.cursors}
        tally = _Tally()
        if self.config.mode == "diloco":
            self._diloco(seat, share, positions, tally, exchange, progress)
        else:
            self._sync(seat, share, positions, tally, exchange, progress)
        digest = self._put_state(seat, put)
        val_loss = None
        if seat.evaluate:
            val_loss = reportable(reference.validation_loss(self.job.evaluate, self.model))
        exported = None
        if seat.final and seat.rank == 0:
            exported = export_model(self.job, self.model, self.config, seat, positions, put)
        self.held, self.dirty = digest, False
        return SeatReport(
            end=seat.end, losses=tuple(reportable(x) for x in tally.losses),
            cursors=tuple(ShardCursor(shard=c.shard, position=positions[c.shard]) for c in seat.cursors),
            state=digest, val_loss=val_loss, tokens=self.job.tokens_per_batch * tally.batches,
            bytes_sent=tally.bytes_sent, compute_s=tally.compute_s, comm_s=tally.comm_s,
            rounds=tally.rounds, contributors_min=tally.contributors_min, export=exported)

    def _listen(self, seat: Seat, *, exchange: Exchange, put: Put, state_file: str | None,
                arrived: Arrived | None) -> SeatReport:
        """A listener's seat (``node.training.elastic``): every round of the segment with nothing
        to add (a zero buffer), each mean kept until the state the segment started from has
        arrived, then replayed through the step every other worker took on the same bytes."""
        tally = _Tally()
        loaded = seat.state is None or (not self.dirty and seat.state == self.held) or state_file is not None
        if loaded:
            self._start_from(seat, state_file)
        self.fresh, self.dirty = False, True
        kept: list[torch.Tensor] = []
        rounds = [seat.end - 1] if self.config.mode == "diloco" else list(range(seat.start, seat.end))
        for step in rounds:
            self.buffer.zero_()
            self._exchange(step, 0.0, tally, exchange)
            if not loaded and arrived is not None:
                path = arrived(len(kept) * 4 * self.numel >= MAX_KEPT_BYTES)
                if path is not None:
                    loaded = self._replay(seat, path, kept)
            if loaded:
                self._apply_round()
            else:
                kept.append(self.buffer.clone())
        if not loaded:
            path = arrived(True) if arrived is not None else None
            if path is None:
                raise SeatError("StateMissing", "a listener's state did not arrive")
            self._replay(seat, path, kept)
        digest = self._put_state(seat, put)
        val_loss = reportable(reference.validation_loss(self.job.evaluate, self.model)) if seat.evaluate else None
        self.held, self.dirty = digest, False
        return SeatReport(end=seat.end, losses=(0.0,) * (seat.end - seat.start), cursors=(), state=digest,
                          val_loss=val_loss, bytes_sent=tally.bytes_sent, comm_s=tally.comm_s,
                          rounds=tally.rounds, contributors_min=tally.contributors_min)

    def _replay(self, seat: Seat, path: str, kept: list[torch.Tensor]) -> bool:
        """Load the segment's start state, then apply the kept means in order (emptying ``kept``)."""
        current = self.buffer.clone()
        self._start_from(seat, path)
        for mean in kept:
            self.buffer.copy_(mean)
            self._apply_round()
        kept.clear()
        self.buffer.copy_(current)
        return True

    def _apply_round(self) -> None:
        """The buffer holds a round's mean: the step every worker takes with it."""
        if self.outer is not None:
            self.outer.step(self.model, self.buffer)
        else:
            self._apply_mean()

    def _start_from(self, seat: Seat, state_file: str | None) -> None:
        if seat.state is None:
            if not self.fresh:
                self._rebuild()
            return
        if not self.dirty and seat.state == self.held:
            return
        if state_file is None:
            raise SeatError("StateMissing", f"the seat starts from state {seat.state.hex()[:16]}, "
                            "which this process does not hold, and no state file was given")
        blob = Path(state_file).read_bytes()
        self.optimizer = self.job.optimizer(self._params)  # fresh: DiLoCo's inner state is ours
        if self.outer is not None:
            state.load_state(blob, self.model, None, outer=self.outer)
        else:
            state.load_state(blob, self.model, self.optimizer)
        self.held, self.fresh = seat.state, False

    def _rebuild(self) -> None:
        self._install(self._build())
        numel = sum(p.numel() for p in self._params)
        if numel != self.numel:
            raise SeatError("ModelChanged", f"make_job built {numel} parameters, first {self.numel}")
        self.fresh = True

    def _sync(self, seat: Seat, share: int, positions: dict[int, int], tally: _Tally,
              exchange: Exchange, progress: ProgressFn) -> None:
        order = [c.shard for c in seat.cursors]
        for i, step in enumerate(range(seat.start, seat.end)):
            began = time.perf_counter()
            loss = self._accumulate(step, elastic.step_reads(order, positions, share, i))
            self._grads_to_buffer()
            comm = self._exchange(step, float(share), tally, exchange)
            self._apply_mean()
            spent = time.perf_counter() - began - comm
            self._stepped(step, loss, spent, tally, progress, batches=share)

    def _apply_mean(self) -> None:
        """Sync mode: the averaged gradient in the buffer, clipped, becomes one optimizer step
        (the same operations on the same bytes on every worker, a listener's replay included)."""
        if self.job.grad_clip:
            coefficient = clip_coefficient(self.buffer, self.job.grad_clip)
            if coefficient < 1.0:
                self.buffer.mul_(coefficient)
        self._buffer_to_grads()
        self.optimizer.step()

    def _diloco(self, seat: Seat, share: int, positions: dict[int, int], tally: _Tally,
                exchange: Exchange, progress: ProgressFn) -> None:
        assert self.outer is not None
        order = [c.shard for c in seat.cursors]
        for i, step in enumerate(range(seat.start, seat.end)):
            began = time.perf_counter()
            loss = self._accumulate(step, elastic.step_reads(order, positions, share, i))
            reference.apply(self.job, self.model, self.optimizer)
            self._stepped(step, loss, time.perf_counter() - began, tally, progress, batches=share)
        began = time.perf_counter()
        self.buffer.copy_(self.outer.pseudo_gradient(self.model))
        comm = self._exchange(seat.end - 1, float(share * (seat.end - seat.start)), tally, exchange)
        self.outer.step(self.model, self.buffer)
        if not all(math.isfinite(x) for x in tally.losses):
            # A non-finite inner step poisoned this worker's AdamW moments; the model is back
            # at θ (the others' mean was applied), so only the inner state starts afresh.
            self.optimizer = self.job.optimizer(self._params)
        tally.compute_s += time.perf_counter() - began - comm

    def _accumulate(self, step: int, reads: list[tuple[int, int]]) -> float:
        """``reference.accumulate`` over this step's reads: in this process, or split over the
        local ranks (``local_ranks``: the same mean gradient, to float32 summation order)."""
        if self.helpers is None:
            return reference.accumulate(self.job, self.model, reads)
        try:
            return self.helpers.gradient(self.job, self.model, self._params, reads, step=step)
        except LocalGroupError as exc:
            raise SeatError("LocalRankFailed", str(exc)) from exc
        except RankRaised as exc:
            raise SeatError(exc.kind, str(exc)) from exc

    def _stepped(self, step: int, loss: float, spent: float, tally: _Tally,
                 progress: ProgressFn, *, batches: int = 1) -> None:
        tally.compute_s += spent
        tally.batches += batches
        tally.losses.append(loss)
        tokens_s = self.job.tokens_per_batch * batches / spent if spent > 0 else 0.0
        progress(step, reportable(loss), tokens_s)

    def _exchange(self, step: int, examples: float, tally: _Tally, exchange: Exchange) -> float:
        began = time.perf_counter()
        contributors, sent = exchange(step, self.buffer, examples)
        if contributors < 1:
            raise SeatError("NoContributors", f"round of step {step}: no finite contribution")
        spent = time.perf_counter() - began
        tally.comm_s += spent
        tally.rounds += 1
        tally.bytes_sent += sent
        tally.contributors_min = (contributors if tally.rounds == 1
                                  else min(tally.contributors_min, contributors))
        return spent

    def _grads_to_buffer(self) -> None:
        offset = 0
        for p in self._params:
            n = p.numel()
            if p.grad is None:
                self.buffer[offset:offset + n].zero_()
            else:
                self.buffer[offset:offset + n].copy_(p.grad.reshape(-1))
            offset += n

    def _buffer_to_grads(self) -> None:
        offset = 0
        for p in self._params:
            n = p.numel()
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(self.buffer[offset:offset + n].view_as(p))
            offset += n

    def _put_state(self, seat: Seat, put: Put) -> bytes:
        metadata = {"starmesh.step": str(seat.end), "starmesh.mode": self.config.mode}
        if self.outer is not None:
            blob = state.state_bytes(self.model, None, outer=self.outer, metadata=metadata)
        else:
            blob = state.state_bytes(self.model, self.optimizer, metadata=metadata)
        path = write_file(self.config.work, f"state-{seat.end}-", blob)
        return put(path, "state", 2 if seat.checkpoint else 0)


# ---------------------------------------------------------------------------- export


def write_file(work: Path, prefix: str, data: bytes) -> Path:
    """``data`` in a new file of ``work`` (a unique name: the node moves each file away)."""
    fd, name = tempfile.mkstemp(dir=work, prefix=prefix, suffix=".safetensors")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(name)


def example_input(job: Job, cursor: tuple[int, int]) -> Any:
    """What the model's forward takes, for the latency figure: a batch's first element when the
    batch is a tuple or list (``(inputs, targets)``), else the batch."""
    batch = job.batch(*cursor)
    return batch[0] if isinstance(batch, tuple | list) else batch


def export_model(job: Job, model: nn.Module, config: SessionConfig, seat: Seat,
                 positions: dict[int, int], put: Put) -> Export:
    """The final model: a CPU copy, pruned (and fine-tuned) and quantized as the job asked,
    written as safetensors with the job's config in its metadata, put with 2 copies."""
    exported = copy.deepcopy(model).cpu()
    x = example_input(job, (seat.cursors[0].shard, positions[seat.cursors[0].shard]))
    figures: dict[str, Any] = {"before": _figures(exported, job, x)}
    if config.prune > 0:
        export.prune(exported, config.prune)
        cursors = [[_next(seat, positions, i)] for i in range(config.fine_tune_steps)]
        export.fine_tune(job, exported, cursors)  # trains the copy
    method = "none"
    if config.quantize == "int8":
        quantized = export.quantize_int8(exported)
        exported, method = quantized.model, quantized.method
    after = _figures(exported, job, x)
    figures.update(after=after, prune=config.prune, fine_tune_steps=config.fine_tune_steps
                   if config.prune > 0 else 0, quantize=method)
    metadata = {"starmesh.quantize": method,
                "config": json.dumps(job.config or {}, sort_keys=True, default=str)}
    blob = state.model_bytes(exported, metadata)
    model_id = put(write_file(config.work, "model-", blob), "model", 2)
    sample = ""
    if job.sample is not None:
        sample = str(job.sample(exported))[:MAX_SAMPLE_CHARS]
    packed: bytes = msgpack.packb(figures, use_bin_type=True)
    if len(packed) > MAX_EXPORT_REPORT:
        packed = msgpack.packb({"quantize": method, "error": "report too large"}, use_bin_type=True)
    tensors = export.model_tensors(exported)
    weights = [t for n, t in tensors.items() if not n.endswith(("weight_scale", "weight_zero_point"))]
    return Export(model=model_id, sample=sample, params=sum(t.numel() for t in weights),
                  nonzeros=sum(int(torch.count_nonzero(t)) for t in weights),
                  file_bytes=len(blob), report=packed)


def _next(seat: Seat, positions: dict[int, int], i: int) -> tuple[int, int]:
    """The fine-tune's batch ``i``: this worker's shards past the job's cursors (the job ends
    here, so nothing else reads them); ``positions`` is left as the report gives it."""
    shard = seat.cursors[i % len(seat.cursors)].shard
    return shard, positions[shard] + i // len(seat.cursors)


def _figures(model: nn.Module, job: Job, x: Any) -> dict[str, Any]:
    """``export.report``'s figures, or why they could not be measured (a summary, not a failure)."""
    try:
        figures = export.report(model, job.evaluate, x).as_dict()
    except Exception as exc:  # user code: a forward that does not take the batch's first item
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    figures["val_loss"] = reportable(figures["val_loss"])
    return figures
