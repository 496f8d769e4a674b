"""A worker's local ranks 1..G-1 as gradient helpers of its training process (local rank 0).

Theory of operation
-------------------
A worker (one mesh member) with G > 1 local ranks (``rank_devices``: one per GPU of the job's
``gpus_per_worker``, or ``JobSpec.local_ranks`` gloo ranks on the CPU) runs its training
process as local rank 0 and G - 1 *helpers*, started by ``local_group.spawn_local_group``: all
G in one ``torch.distributed`` process group, NCCL between CUDA devices, gloo otherwise, so a
CPU host runs the same code. Rank 0 keeps everything a seat has (``seat.Session``): the
optimizer, the state blobs, a listener's replay, DiLoCo's outer step and the exchange with its
node. A helper holds only the job's model (``make_job`` with the same options, ``JobRecipe``)
on its device and computes gradients at the parameters rank 0 sends it; it never steps an
optimizer, loads a state or replays, so it has nothing that could drift.

One gradient (``GradientRanks.gradient``: a sync step, or a DiLoCo inner step) over ``reads``,
the N (shard, position) micro-batches of this worker's share of the step::

    rank 0:  store[cmd/k] = {reads, N}               # the command, through the group's TCPStore
    all:     broadcast(θ, from rank 0)               # every rank computes at rank 0's θ
    rank r:  slice_r = split_reads(reads, G)[r]      # contiguous, sizes differ by at most one
             g_r = Σ_{b in slice_r} ∇ loss_b(θ) / N  # zero the grads, backward each loss_b / N
             part_r = [ g_r | has_grad_r | Σ_{b in slice_r} loss_b / N | failed_r ]
    all:     all_reduce(part, SUM)
    rank 0:  p.grad = Σ_r g_r (None where no rank had one); the loss Σ_r; raise if one failed

``Σ_r g_r = Σ_b ∇ loss_b / N`` is the host's mean gradient over its whole share: what
``reference.accumulate`` leaves in ``p.grad`` in one process, and what rank 0 then feeds into
the unchanged path (``Session._grads_to_buffer`` -> exchange -> clip and optimizer step; in
DiLoCo ``reference.apply``, the inner AdamW). The exchange runs once per step, on rank 0 only.
Each rank scales by the host's N rather than by its own n_r and then weighing by n_r / N (as
``LocalGroup.reduce`` must, for callers that only have per-rank means): the same value with one
rounding fewer, and a rank without reads (N < G) adds exact zeros.

*Numerics against one device.* Every term ``∇ loss_b / N`` is the same computation at the same
θ; what differs is the summation order (one device adds the N terms in order into ``p.grad``;
here each rank adds its slice, then the all-reduce adds the slices) and whatever kernels round
differently on other devices or thread counts. So a step's gradient agrees to float32 rounding,
and a trajectory drifts only as that rounding grows through the optimizer (measured by
``tests/training/test_local_ranks.py``; figures in its docstring). Where the slices keep one
device's association (N = 1, rank 0 alone; with G = 2 also N = 2 and 3: g1+g2, (g1+g2)+g3)
the gradient is bit-identical on the same kernels. The step's loss is summed in the float32 part (one device
sums it as a Python float): it agrees to float32 rounding. Whatever G each worker has, every
worker of the mesh still ends each step bit-identical to the others: they all apply the same
exchanged mean.

*Commands through the store.* A helper waits for its next command in the store (no timeout:
between seats, or while rank 0 exchanges, writes state, evaluates, a helper may wait for
minutes), not in a collective, so only a gradient's two collectives are bounded by the group's
timeout: a helper that stalls in them longer fails the step.

*Failures.* Job code raising on a helper's slice: the helper stores its error under the step,
joins the all-reduce, and rank 0 raises ``RankRaised`` (the error's type and message) after it;
the group stays usable. Rank 0's own raise is re-raised after the all-reduce too, so helpers
never wait for a collective that does not come. A helper that dies, or stalls past the timeout,
makes rank 0's next collective raise ``LocalGroupError`` naming it (its exit code, and its
traceback when it wrote one): the ranks are *broken*, and ``ensure`` (before the next seat)
spawns them afresh. Helpers die with rank 0 (``PR_SET_PDEATHSIG``, and their store connection
closing) and ``close`` stops them.

Not shared with the helpers: module buffers (a BatchNorm's running statistics follow rank 0's
slice only) and RNG state (a helper's dropout draws are its own, unlike one device's sequence).
"""

from __future__ import annotations

import datetime
import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import torch
from torch import nn
from torch.distributed import DistStoreError

from node.tasks.task_worker import Runner
from node.training.runner import reference
from node.training.runner.job import Job
from node.training.runner.local_group import (
    DEFAULT_START_TIMEOUT,
    DEFAULT_TIMEOUT,
    LocalGroup,
    LocalGroupError,
    LocalRanks,
    local_devices,
    spawn_local_group,
)
from protocol.errors import ConfigError

__all__ = ["GradientRanks", "JobRecipe", "RankRaised", "rank_devices", "split_reads"]

Cursor = tuple[int, int]
"""``(shard, position)``: a micro-batch (``Job.batch``)."""

#: Store keys: a command, a helper's model signature, a helper's error in a step.
_CMD = "starmesh/helpers/cmd/{}"
_MODEL = "starmesh/helpers/model/{}"
_RAISED = "starmesh/helpers/raised/{}/{}"
#: How long a helper waits for a command in one store call (it waits again after).
_IDLE_WAIT = datetime.timedelta(days=1)
#: Seconds rank 0 gives a failed helper to be reaped, for its exit code in the error.
_REAP_S = 2.0
#: Characters of a helper's error kept in the store.
_ERROR_CHARS = 2000


class RankRaised(Exception):
    """The job's code raised on a helper's slice of a step; the ranks are still usable."""

    def __init__(self, rank: int, kind: str, message: str) -> None:
        super().__init__(f"local rank {rank}: {kind}: {message}")
        self.rank, self.kind, self.message = rank, kind, message


# --------------------------------------------------------------------------- pure parts


def rank_devices(gpus: int | None, local_ranks: int = 0) -> list[torch.device]:
    """The devices of a worker's local ranks, rank 0 first.

    ``gpus``: the job's GPUs per worker (``local_group.local_devices``: 0 is the CPU, None
    the visible GPUs or the CPU). ``local_ranks`` 0: one rank per GPU of a ``gpus > 0`` job,
    else one rank (with ``gpus`` None: the first visible device, as before local ranks);
    ``k > 0``: k ranks, all on the CPU (gloo) for a CPU job, else on the first k GPUs
    (``ConfigError`` if there are fewer).
    """
    if local_ranks < 0:
        raise ConfigError(f"local ranks: {local_ranks} (expected 0 or more)")
    devices = local_devices(gpus)
    if devices[0].type == "cpu":
        return [devices[0]] * max(1, local_ranks)
    if local_ranks == 0:
        return devices if gpus is not None else devices[:1]
    if local_ranks > len(devices):
        raise ConfigError(f"local ranks: {local_ranks}, but the worker has {len(devices)} GPUs")
    return devices[:local_ranks]


def split_reads(reads: Sequence[Cursor], world: int) -> list[list[Cursor]]:
    """``reads`` cut into ``world`` contiguous slices, in order, whose sizes differ by at most
    one (the first ``len % world`` slices one longer); a slice may be empty."""
    base, extra = divmod(len(reads), world)
    out: list[list[Cursor]] = []
    start = 0
    for r in range(world):
        size = base + (1 if r < extra else 0)
        out.append([(int(s), int(p)) for s, p in reads[start:start + size]])
        start += size
    return out


@dataclass(frozen=True, slots=True)
class JobRecipe:
    """How a helper builds the job: the job function (``module:function``, from the bundle at
    ``path`` or an allowed module, as ``task_worker.Runner`` resolves it) and its options."""

    function: str
    path: str | None
    options: dict[str, str]
    allow: tuple[str, ...] = ()

    def build(self) -> Job:
        fn = Runner(allow=self.allow, write=lambda _: None).resolve(self.function, self.path)
        if isinstance(fn, dict):
            raise ConfigError(f"{self.function}: {fn.get('type')}: {fn.get('message')}")
        job = fn(dict(self.options))
        if not isinstance(job, Job):
            raise TypeError(f"{self.function} returned {type(job).__name__}, not a Job")
        return job


# --------------------------------------------------------------------------- one rank's part


class _Part:
    """A rank's flat contribution ``[grads | has_grad | loss | failed]`` (module docstring)."""

    def __init__(self, params: Sequence[nn.Parameter], device: torch.device) -> None:
        self.params = list(params)
        self.numel = sum(p.numel() for p in self.params)
        n = self.numel + len(self.params) + 2
        self.flat = torch.zeros(n, dtype=torch.float32, device=device)
        self.theta = torch.empty(self.numel, dtype=torch.float32, device=device)

    def compute(self, job: Job, model: nn.Module, reads: Sequence[Cursor], total: int) -> BaseException | None:
        """Backpropagate this rank's slice and pack it; the job's exception, not raised."""
        failure: BaseException | None = None
        loss = 0.0
        try:
            model.zero_grad(set_to_none=True)
            if reads:
                loss = reference.accumulate(job, model, reads, total=total)
        except BaseException as exc:  # job code; re-raised (rank 0) or reported (helpers) later
            failure = exc
        flat, offset, flags = self.flat, 0, []
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                grad = p.grad if failure is None else None
                if grad is not None:
                    flat[offset:offset + n].copy_(grad.reshape(-1))
                else:
                    flat[offset:offset + n].zero_()
                flags.append(0.0 if grad is None else 1.0)
                offset += n
            flags += [loss if failure is None else 0.0, 0.0 if failure is None else 1.0]
            flat[self.numel:].copy_(torch.tensor(flags, dtype=torch.float32))
        return failure

    def unpack(self) -> float:
        """The summed part into each ``p.grad`` (None where no rank had one); the loss."""
        flat, offset = self.flat, 0
        with torch.no_grad():
            has = flat[self.numel:self.numel + len(self.params)].tolist()
            for i, p in enumerate(self.params):
                n = p.numel()
                if has[i] == 0:
                    p.grad = None
                else:
                    value = flat[offset:offset + n].view_as(p)
                    if p.grad is None:
                        p.grad = value.to(p.dtype, copy=True)
                    else:
                        p.grad.copy_(value)
                offset += n
        return float(flat[-2].item())

    def load_theta(self) -> None:
        with torch.no_grad():
            offset = 0
            for p in self.params:
                n = p.numel()
                p.copy_(self.theta[offset:offset + n].view_as(p))
                offset += n

    def save_theta(self) -> None:
        with torch.no_grad():
            offset = 0
            for p in self.params:
                n = p.numel()
                self.theta[offset:offset + n].copy_(p.detach().reshape(-1))
                offset += n


# --------------------------------------------------------------------------- helpers


def _helper(group: LocalGroup, recipe: JobRecipe) -> None:
    """A helper rank's loop (``spawn_local_group`` target): build, then serve commands."""
    job = recipe.build()
    model = job.model.to(group.device)
    model.train()
    part = _Part(list(model.parameters()), group.comm_device)
    store = group.store
    store.set(_MODEL.format(group.rank), _signature([tuple(p.shape) for p in part.params]))
    step = 0
    while True:
        command = _wait_command(store, step)
        if command.get("op") != "grad":
            return
        reads = [(int(s), int(p)) for s, p in command["reads"]]
        label = int(command["step"])
        group.broadcast(part.theta, step=label, what="broadcast of the parameters")
        part.load_theta()
        failure = part.compute(job, model, split_reads(reads, group.world)[group.rank], int(command["total"]))
        if failure is not None:
            text = f"{type(failure).__name__}\n{failure}"[:_ERROR_CHARS]
            store.set(_RAISED.format(step, group.rank), text)
        group.all_reduce_sum(part.flat, step=label, what="all-reduce of the gradients")
        step += 1


def _wait_command(store: Any, step: int) -> dict[str, Any]:
    key = _CMD.format(step)
    while True:
        try:
            store.wait([key], _IDLE_WAIT)
            break
        except DistStoreError as exc:  # a day without a command: wait on; rank 0 gone: raise
            if "timeout" not in str(exc).lower():
                raise
    command = msgpack.unpackb(bytes(store.get(key)), raw=False)
    if not isinstance(command, dict):
        raise LocalGroupError(f"helper command {step} is not a map")
    return command


# --------------------------------------------------------------------------- rank 0


class GradientRanks:
    """Local rank 0's side of a worker's G local ranks (module docstring).

    ``GradientRanks(recipe, devices=..., shapes=...)`` spawns ranks 1..G-1 on ``devices[1:]``
    and checks that each built a model with rank 0's parameter ``shapes`` (``LocalGroupError``
    if one does not start or builds another model). ``cpus``: each rank's CPUs
    (``local_group.split_cpus``; None: no pinning); ``threads``: each rank's torch threads
    (None: one per CPU of its list, or as they are). Use it from the thread that made it (the
    training process's main thread: a helper dies when that thread ends), and ``close()`` it
    before the process exits.
    """

    def __init__(self, recipe: JobRecipe, *, devices: Sequence[torch.device],
                 shapes: Sequence[tuple[int, ...]], cpus: Sequence[Sequence[int]] | None = None,
                 threads: int | None = None, timeout: float = DEFAULT_TIMEOUT,
                 start_timeout: float = DEFAULT_START_TIMEOUT) -> None:
        if len(devices) < 2:
            raise ConfigError(f"GradientRanks: {len(devices)} devices; helpers need 2 or more")
        self.recipe = recipe
        self.devices = list(devices)
        self.shapes = [tuple(s) for s in shapes]
        self.cpus = [list(c) for c in cpus] if cpus is not None else None
        self.threads = threads
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.spawned = 0
        """Times the helpers were spawned (1 + restarts)."""
        self.dealt = [0] * len(self.devices)
        """Micro-batches each rank computed, rank 0 first."""
        self._ranks: LocalRanks | None = None
        self._part: _Part | None = None
        self._step = 0
        self._broken = False
        self._spawn()

    @property
    def world(self) -> int:
        return len(self.devices)

    @property
    def pids(self) -> list[int]:
        """The helpers' pids, rank 1 first (empty while none run)."""
        return [p.pid or 0 for p in self._ranks.processes] if self._ranks is not None else []

    def _spawn(self) -> None:
        ranks = spawn_local_group(_helper, devices=self.devices, args=(self.recipe,), cpus=self.cpus,
                                  timeout=self.timeout, start_timeout=self.start_timeout,
                                  threads=self.threads)
        try:
            self._await_models(ranks)
        except BaseException:
            ranks.close(grace=0.0)
            raise
        self._ranks, self._part, self._step, self._broken = ranks, None, 0, False
        self.spawned += 1

    def _await_models(self, ranks: LocalRanks) -> None:
        store = ranks.group.store
        deadline = time.monotonic() + self.start_timeout
        want = _signature(self.shapes)
        for r in range(1, self.world):
            while not store.check([_MODEL.format(r)]):
                failed = ranks.failures()
                if failed:
                    raise LocalGroupError(f"a helper did not build the job: {'; '.join(failed)}")
                if time.monotonic() > deadline:
                    raise LocalGroupError(f"local rank {r} did not build the job within {self.start_timeout:g} s")
                time.sleep(0.02)
            got = bytes(store.get(_MODEL.format(r))).decode()
            if got != want:
                raise LocalGroupError(f"local rank {r} built another model than local rank 0 "
                                      f"(parameters, elements: {got.split(':')[0]} vs {want.split(':')[0]})")

    def usable(self) -> bool:
        """The helpers run and their group has not failed."""
        ranks = self._ranks
        return (ranks is not None and not self._broken and ranks.group.broken is None
                and all(p.exitcode is None for p in ranks.processes))

    def ensure(self) -> None:
        """Spawn the helpers afresh unless ``usable()`` (``LocalGroupError`` if they cannot start)."""
        if not self.usable():
            self.close()
            self._spawn()

    def gradient(self, job: Job, model: nn.Module, params: Sequence[nn.Parameter],
                 reads: Sequence[Cursor], *, step: int | None = None) -> float:
        """The mean loss over ``reads``, computed by all the ranks, and its gradient (the host's
        mean over the reads) in ``p.grad`` of ``params`` (``model.parameters()``, in order) on
        this rank: what ``reference.accumulate(job, model, reads)`` returns and leaves. Raises
        what the job's code raised here, ``RankRaised`` for a helper's, ``LocalGroupError`` if
        the ranks failed (they stay broken until ``ensure``). ``step``: the job's step, for
        error messages (default: the count of gradients so far)."""
        ranks = self._ranks
        if ranks is None or not self.usable():
            raise LocalGroupError("the local ranks are not running (they failed; ensure() restarts them)")
        if self._part is None or len(self._part.params) != len(params) or any(
                a is not b for a, b in zip(self._part.params, params, strict=True)):  # a rebuilt model
            self._part = _Part(params, ranks.group.comm_device)
        part, group, store = self._part, ranks.group, ranks.group.store
        seq, self._step = self._step, self._step + 1
        label = seq if step is None else step
        slices = split_reads(reads, self.world)
        try:
            store.set(_CMD.format(seq), msgpack.packb(
                {"op": "grad", "reads": [list(c) for c in reads], "total": len(reads), "step": label},
                use_bin_type=True))
            part.save_theta()
            group.broadcast(part.theta, step=label, what="broadcast of the parameters")
            failure = part.compute(job, model, slices[0], len(reads))
            group.all_reduce_sum(part.flat, step=label, what="all-reduce of the gradients")
            store.delete_key(_CMD.format(seq))
        except LocalGroupError as exc:
            self._broken = True
            raise self._explained(exc) from exc
        except BaseException:
            self._broken = True
            raise
        for r, s in enumerate(slices):
            self.dealt[r] += len(s)
        raised = self._raised(store, seq) if float(part.flat[-1].item()) > 0 else None
        if failure is not None:
            raise failure
        if raised is not None:
            raise raised
        return part.unpack()

    def _raised(self, store: Any, step: int) -> RankRaised:
        """The first helper's error of ``step`` (all of the step's errors leave the store)."""
        found = []
        for r in range(1, self.world):
            key = _RAISED.format(step, r)
            if store.check([key]):
                kind, _, message = bytes(store.get(key)).decode("utf-8", "replace").partition("\n")
                store.delete_key(key)
                found.append(RankRaised(r, kind, message))
        return found[0] if found else RankRaised(0, "LocalRankFailed", "local rank 0 failed")

    def _explained(self, exc: LocalGroupError) -> LocalGroupError:
        """``exc`` with the helpers' exit codes (given ``_REAP_S`` to exit: a dead peer breaks
        the collective before the kernel has reaped it)."""
        ranks = self._ranks
        if ranks is None:
            return exc
        deadline = time.monotonic() + _REAP_S
        for proc in ranks.processes:
            proc.join(max(0.0, deadline - time.monotonic()))
        failed = ranks.failures()
        return LocalGroupError(f"{exc}; {'; '.join(failed)}") if failed else exc

    def close(self, grace: float = 5.0) -> None:
        """Stop the helpers (a ``stop`` command; SIGKILL after ``grace`` seconds, at once if the
        group failed). Idempotent."""
        ranks, self._ranks = self._ranks, None
        if ranks is None:
            return
        healthy = not self._broken and ranks.group.broken is None
        if healthy:
            try:
                ranks.group.store.set(_CMD.format(self._step), msgpack.packb({"op": "stop"}))
            except Exception:  # the store went with a failure: the kill below suffices
                healthy = False
        ranks.close(grace=grace if healthy else 0.0)


def _signature(shapes: Sequence[tuple[int, ...]]) -> str:
    """``"<parameters>,<elements>:<sha256 of the shapes>"``: what two ranks' models must share."""
    numel = sum(math.prod(s) for s in shapes)
    digest = hashlib.sha256(repr([tuple(s) for s in shapes]).encode()).hexdigest()[:32]
    return f"{len(shapes)},{numel}:{digest}"
