"""A worker's local ranks: one process per GPU of the host, reduced hierarchically.

A worker of a training job is one mesh member; its GPUs are its *local ranks*. With G > 1
devices the job's worker process is local rank 0 and spawns ranks 1..G-1
(``spawn_local_group``); all G join one ``torch.distributed`` process group (NCCL when every
device is CUDA, gloo otherwise, so a CPU host runs the same path), rendezvousing over a
loopback ``TCPStore`` that rank 0 opens on a port the kernel picks (port 0: no race for a
"free" port). With one device there is no process group at all (``LocalGroup.single``).

A job's training process uses it through ``node.training.runner.local_ranks`` (ranks 1..G-1 as
gradient helpers: rank 0 broadcasts its parameters and sums the ranks' gradient parts with the
plain ``broadcast`` / ``all_reduce_sum``, then exchanges and steps alone); ``reduce`` below is
the hierarchical pattern for a loop in which every rank keeps its own optimizer.

Use, in the job's worker process (``train`` a module-level function, run by every rank)::

    def train(group: LocalGroup, config, exchange: Exchange | None = None) -> None:
        model = build(config).to(group.device)
        group.broadcast_parameters(model)                   # the ranks start identical
        for step in ...:
            loss(model, batch_for(group.rank, step)).backward()
            group.reduce_gradients(model.parameters(), exchange, examples=batch_size)
            optimizer.step()

    devices = local_devices(gpus_per_worker)                # [cuda:0, cuda:1] or [cpu]
    with spawn_local_group(train, devices=devices, args=(config,),
                           cpus=split_cpus(my_cpus, len(devices))) as ranks:
        train(ranks.group, config, exchange=mesh_exchange)  # rank 0: this process
        ranks.join()

Theory of operation, per step (``LocalGroup.reduce``), on every local rank::

    buffer = [ n_r * g_r , n_r ]              # g_r: this rank's flat fp32 gradient,
                                              # n_r: its examples (1 when not given)
    all_reduce(buffer, SUM)                   # local: [ sum n_r g_r , N ]
    average = sum n_r g_r / N                 # the host's example-weighted mean gradient
    rank 0 only: average = exchange(average, examples=N)    # the mesh all-reduce, once
    broadcast(average, from rank 0)           # plus a status slot: did the exchange work?
    every rank writes ``average`` back (``reduce_gradients``: into each ``.grad``)

Weighting: when each rank's loss is the mean over its own batch, ``g_r`` is a mean over
``n_r`` examples, and ``sum n_r g_r / N`` is the mean over all ``N`` of the host's examples,
whatever the batch sizes. ``exchange`` receives that ``N`` (``examples=``) so the caller can
weight the mesh mean the same way (each host's average times its ``N``, over the mesh's
total). Without counts every rank weighs 1 and ``N`` is the number of local ranks.

Invariants: every rank ends a step with the same values, bit for bit (they are rank 0's,
broadcast); ``exchange`` runs exactly once per step, in rank 0 only (an ``exchange`` passed
on other ranks is ignored); a step either succeeds on every rank or raises on every rank:
an exchange that raises is re-raised in rank 0 and reported to the others as
``ExchangeFailed`` through the status slot, so no rank waits for a broadcast that never comes.

Failure: a rank that dies makes its peers' next collective fail at once (gloo sees the
connection close); a rank that hangs makes them fail after ``timeout`` seconds (the process
group's timeout, which must therefore exceed the slowest ``exchange``: ranks 1..G-1 wait in
the broadcast while rank 0 talks to the mesh). Either way peers raise ``LocalGroupError``
naming the step and, when the failed rank reported one, its error (each spawned rank writes
its traceback into the store before it exits). A group that failed once stays failed.

Threads: ``pin_threads(cpus)`` pins every thread of the calling process to ``cpus``
(``os.sched_setaffinity`` on each thread, Linux) and sets ``torch.set_num_threads``;
``split_cpus`` shares a worker's CPUs between its local ranks.

NCCL caveat: NCCL enforces the timeout from its watchdog thread, which by default tears
the rank's process down (``TORCH_NCCL_ASYNC_ERROR_HANDLING``) rather than raising; a dead
rank is then seen by the others as above.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import multiprocessing
import multiprocessing.process
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed import (  # type: ignore[attr-defined]  # public, not re-exported in the stubs
    PrefixStore,
    TCPStore,
)

from protocol.errors import ConfigError, StarmeshError

__all__ = [
    "Exchange", "ExchangeFailed", "LocalGroup", "LocalGroupError", "LocalRanks",
    "default_backend", "local_devices", "pin_threads", "spawn_local_group", "split_cpus",
]

#: Seconds a collective may wait for a peer by default (covers the mesh exchange, see above).
DEFAULT_TIMEOUT = 300.0
#: Seconds the spawned ranks may take to start (import torch) and reach the store.
DEFAULT_START_TIMEOUT = 120.0
#: Store keys: a rank's "I am about to join" and its traceback when it fails.
_READY = "starmesh/ready/{}"
_ERROR = "starmesh/error/{}"
_EXCHANGE_ERROR = "starmesh/exchange-error/{}"
#: Characters of a traceback kept in the store and in error messages.
_ERROR_CHARS = 4000


class LocalGroupError(StarmeshError):
    """A local rank failed, exited or timed out; the local group is unusable afterwards."""


class ExchangeFailed(LocalGroupError):
    """Local rank 0's ``exchange`` raised during this step (rank 0 re-raises the original)."""


class Exchange(Protocol):
    """The mesh all-reduce as rank 0 calls it: ``exchange(average, examples=N)``.

    ``average`` is the host's mean gradient, a 1-D fp32 CPU tensor (the caller may modify
    and return it); ``examples`` the host's total examples this step (see the module
    docstring). Returns the mesh's average: a tensor with as many elements, any float dtype.
    """

    def __call__(self, average: torch.Tensor, *, examples: float) -> torch.Tensor: ...


# --------------------------------------------------------------------------- devices, CPUs


def local_devices(gpus_per_worker: int | None = None) -> list[torch.device]:
    """The devices of this host's local ranks, one rank per device.

    ``None``: every visible GPU (``CUDA_VISIBLE_DEVICES`` applies), or the CPU if there is
    none; ``0``: the CPU (a CPU job); ``k > 0``: the first ``k`` GPUs, ``ConfigError`` if
    the host has fewer (the coordinator should not have placed the job here).
    """
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus_per_worker is None:
        return [torch.device("cuda", i) for i in range(count)] or [torch.device("cpu")]
    if gpus_per_worker < 0:
        raise ConfigError(f"gpus per worker: {gpus_per_worker} (expected 0 or more)")
    if gpus_per_worker == 0:
        return [torch.device("cpu")]
    if gpus_per_worker > count:
        raise ConfigError(f"the job asks for {gpus_per_worker} GPUs per worker; this host has {count}")
    return [torch.device("cuda", i) for i in range(gpus_per_worker)]


def default_backend(devices: Sequence[torch.device]) -> str:
    """``"nccl"`` when every device is CUDA and NCCL is built in, else ``"gloo"``."""
    if devices and all(d.type == "cuda" for d in devices) and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def split_cpus(cpus: Sequence[int], world: int) -> list[list[int]]:
    """Share ``cpus`` between ``world`` ranks: contiguous runs whose sizes differ by at most
    one, in order; with fewer CPUs than ranks, rank ``r`` gets ``cpus[r % len(cpus)]``."""
    if world < 1:
        raise ConfigError(f"local ranks: {world} (expected 1 or more)")
    if not cpus:
        raise ConfigError("no CPUs to share between local ranks")
    if len(cpus) < world:
        return [[cpus[r % len(cpus)]] for r in range(world)]
    base, extra = divmod(len(cpus), world)
    out, start = [], 0
    for r in range(world):
        size = base + (1 if r < extra else 0)
        out.append(list(cpus[start:start + size]))
        start += size
    return out


def pin_threads(cpus: Iterable[int], *, threads: int | None = None) -> list[int]:
    """Pin every thread of this process (and the threads it starts later) to ``cpus`` and
    run torch's intra-op pool with ``threads`` threads (default: one per CPU).

    Returns the CPUs pinned to, ascending. Where the OS has no ``sched_setaffinity``
    (macOS) only the thread count is set. ``ConfigError`` for an empty or disallowed list.
    """
    wanted = sorted(set(cpus))
    if not wanted:
        raise ConfigError("pin_threads: empty CPU list")
    setaffinity = getattr(os, "sched_setaffinity", None)
    if setaffinity is not None:
        try:
            setaffinity(0, wanted)
        except OSError as exc:
            raise ConfigError(f"CPUs {wanted}: cannot pin to them ({exc.strerror})") from exc
        # Linux applies affinity per thread: also move the threads already running
        # (torch's pools, gloo's), not only the caller and its future children.
        with contextlib.suppress(OSError):
            for tid in os.listdir("/proc/self/task"):
                with contextlib.suppress(OSError):  # the thread may have ended meanwhile
                    setaffinity(int(tid), wanted)
    torch.set_num_threads(threads if threads is not None else len(wanted))
    return wanted


# --------------------------------------------------------------------------- the group


class LocalGroup:
    """This process's local rank: ``rank`` of ``world`` ranks, computing on ``device``.

    Built by ``LocalGroup.single`` (one rank, no process group) or ``spawn_local_group``
    (one process per rank, this one being rank 0). Not thread-safe; one per process.
    """

    def __init__(self, *, rank: int, world: int, device: torch.device, backend: str | None,
                 timeout: float, store: Any = None) -> None:
        self.rank = rank
        self.world = world
        self.device = device
        self.backend = backend
        """``"nccl"``, ``"gloo"``, or None for a single rank."""
        self.timeout = timeout
        """Seconds a collective waits for its peers before ``LocalGroupError``."""
        self.steps = 0
        """``reduce`` calls so far."""
        self._store = store
        self._broken: str | None = None
        self._buffer: torch.Tensor | None = None
        self._grad_flat: torch.Tensor | None = None
        self._comm = device if backend == "nccl" else torch.device("cpu")

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> LocalGroup:
        """The degenerate group: one rank, no process group, no processes."""
        return cls(rank=0, world=1, device=torch.device(device), backend=None, timeout=0.0)

    @classmethod
    def _join(cls, *, store: Any, rank: int, world: int, device: torch.device, backend: str,
              timeout: float) -> LocalGroup:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=PrefixStore("pg", store), rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout))
        return cls(rank=rank, world=world, device=device, backend=backend, timeout=timeout,
                   store=store)

    # ------------------------------------------------------------------ reduction

    def reduce(self, flat: torch.Tensor, exchange: Exchange | None = None, *,
               examples: int | None = None) -> torch.Tensor:
        """Average ``flat`` over the local ranks (weighted by ``examples``), pass the host's
        average through ``exchange`` on rank 0, and leave the result in ``flat`` on every
        rank (returned). Every rank must call it with the same number of elements.

        ``examples``: this rank's examples this step (all ranks pass a count, or none
        does); a rank with 0 contributes nothing, and if all have 0 the average is zero.
        Raises ``LocalGroupError`` when a peer failed or timed out, ``ExchangeFailed`` on
        ranks 1..G-1 when rank 0's exchange raised (rank 0 re-raises that exception).
        """
        self._check_usable()
        if not flat.is_floating_point():
            raise ConfigError(f"reduce: a float tensor is needed, got {flat.dtype}")
        if examples is not None and examples < 0:
            raise ConfigError(f"reduce: examples {examples} (expected 0 or more)")
        step, self.steps = self.steps, self.steps + 1
        n = flat.numel()
        buf = self._buffer_for(n)
        weight = 1.0 if examples is None else float(examples)
        with torch.no_grad():
            body = buf[:n]
            body.copy_(flat.reshape(-1))
            if examples is not None:
                body.mul_(weight)
            buf[n] = weight
            if self.world > 1:
                self._collective("all-reduce", step, lambda: dist.all_reduce(buf))
            total = float(buf[n].item())
            if total > 0 and total != 1.0:
                body.div_(total)
            elif total <= 0:
                body.zero_()
            failure: BaseException | None = None
            if self.rank == 0 and exchange is not None:
                failure = self._run_exchange(exchange, body, total, step)
            buf[n] = 0.0 if failure is not None else 1.0
            if self.world > 1:
                self._collective("broadcast", step, lambda: dist.broadcast(buf, src=0))
            if failure is not None:
                raise failure
            if float(buf[n].item()) != 1.0:  # the group is fine; only this step failed
                raise ExchangeFailed(f"local rank {self.rank}: step {step}: local rank 0's "
                                     f"exchange failed: {self._stored(_EXCHANGE_ERROR.format(step))}")
            flat.copy_(body.view_as(flat))
        return flat

    def _run_exchange(self, exchange: Exchange, body: torch.Tensor, total: float,
                      step: int) -> BaseException | None:
        """Call ``exchange`` once; write its result into ``body``. Its failure is returned
        (raised after the broadcast told the other ranks), not raised here."""
        try:
            result = exchange(body.to("cpu", copy=True), examples=total)
            if not isinstance(result, torch.Tensor) or result.numel() != body.numel():
                got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
                raise LocalGroupError(f"exchange returned {got}, expected {body.numel()} elements")
            body.copy_(result.reshape(-1))
        except Exception as exc:
            if self._store is not None:
                with contextlib.suppress(Exception):
                    self._store.set(_EXCHANGE_ERROR.format(step), f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS])
            return exc
        return None

    def reduce_gradients(self, parameters: Iterable[torch.nn.Parameter],
                         exchange: Exchange | None = None, *,
                         examples: int | None = None) -> torch.Tensor:
        """``reduce`` of the gradients of ``parameters`` (flattened into one fp32 buffer, a
        parameter without ``.grad`` counting as zeros), written back into each ``.grad``.
        Returns the flat result (reused by the next call)."""
        params = [p for p in parameters if p.requires_grad]
        n = sum(p.numel() for p in params)
        device = params[0].device if params else self.device
        flat = self._grad_flat
        if flat is None or flat.numel() != n or flat.device != device:
            flat = self._grad_flat = torch.empty(n, dtype=torch.float32, device=device)
        with torch.no_grad():
            pos = 0
            for p in params:
                k = p.numel()
                if p.grad is None:
                    flat[pos:pos + k].zero_()
                else:
                    flat[pos:pos + k].copy_(p.grad.reshape(-1))
                pos += k
        self.reduce(flat, exchange, examples=examples)
        with torch.no_grad():
            pos = 0
            for p in params:
                k = p.numel()
                value = flat[pos:pos + k].view_as(p)
                if p.grad is None:
                    p.grad = value.to(p.dtype, copy=True)
                else:
                    p.grad.copy_(value)
                pos += k
        return flat

    # ------------------------------------------------------------------ plain collectives

    @property
    def store(self) -> Any:
        """The group's loopback ``TCPStore`` (None for a single rank): small values between
        the ranks outside the collectives (``node.training.runner.local_ranks``' commands)."""
        return self._store

    @property
    def broken(self) -> str | None:
        """Why the group is unusable (a collective failed, or it was closed); None while usable."""
        return self._broken

    @property
    def comm_device(self) -> torch.device:
        """Where the backend's tensors live: the rank's GPU for NCCL, else the CPU."""
        return self._comm

    def broadcast(self, tensor: torch.Tensor, *, step: int, what: str = "broadcast") -> None:
        """Rank 0's ``tensor`` into every rank's ``tensor``, in place (staged through
        ``comm_device`` if it lives elsewhere). ``LocalGroupError`` (naming ``what`` and
        ``step``) if a peer failed or timed out."""
        self._run_in_place(tensor, what, step, lambda t: dist.broadcast(t, src=0))

    def all_reduce_sum(self, tensor: torch.Tensor, *, step: int, what: str = "all-reduce") -> None:
        """Every rank's ``tensor`` becomes the sum over the ranks, in place (as ``broadcast``)."""
        self._run_in_place(tensor, what, step, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))

    def _run_in_place(self, tensor: torch.Tensor, what: str, step: int,
                      op: Callable[[torch.Tensor], object]) -> None:
        if self.world == 1:
            return
        self._check_usable()
        staged = tensor if tensor.device == self._comm else tensor.to(self._comm)
        self._collective(what, step, lambda: op(staged))
        if staged is not tensor:
            tensor.copy_(staged)

    # ------------------------------------------------------------------ parameters

    def broadcast_parameters(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers, so the ranks start identical.
        ``LocalGroupError`` if the ranks' models differ in their tensors' count or sizes."""
        if self.world == 1:
            return
        self._check_usable()
        tensors = list(model.state_dict().values())
        shape = torch.tensor([len(tensors), sum(t.numel() for t in tensors)],
                             dtype=torch.int64, device=self._comm)
        mine = shape.clone()
        self._collective("broadcast of the model's shape", self.steps, lambda: dist.broadcast(shape, src=0))
        if not torch.equal(shape, mine):
            self._broken = "models differ"
            raise LocalGroupError(f"local rank {self.rank}: its model has {mine.tolist()} "
                                  f"(tensors, elements), local rank 0's {shape.tolist()}")
        with torch.no_grad():
            for t in tensors:
                staged = t if t.device == self._comm else t.to(self._comm)
                self._collective("broadcast of parameters", self.steps,
                                 lambda s=staged: dist.broadcast(s, src=0))  # type: ignore[misc]
                if staged is not t:
                    t.copy_(staged)

    def parameters_divergence(self, model: torch.nn.Module) -> float:
        """The largest absolute difference between any rank's parameters and rank 0's (the
        same value on every rank; 0.0 when they are identical). A collective."""
        if self.world == 1:
            return 0.0
        self._check_usable()
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()]).to(self._comm)
            ref = flat.clone()
            self._collective("broadcast of parameters", self.steps, lambda: dist.broadcast(ref, src=0))
            worst = (flat - ref).abs().max().reshape(1) if flat.numel() else torch.zeros(1, device=self._comm)
            self._collective("all-reduce of divergence", self.steps,
                             lambda: dist.all_reduce(worst, op=dist.ReduceOp.MAX))
            return float(worst.item())

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Leave the process group (no collective; safe after a failure; idempotent)."""
        if self.backend is not None and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        if self.world > 1:
            self._broken = self._broken or "closed"

    def _check_usable(self) -> None:
        if self._broken is not None and self.world > 1:
            raise LocalGroupError(f"local rank {self.rank}: the local group is unusable ({self._broken})")

    def _buffer_for(self, n: int) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() != n + 1:
            self._buffer = torch.empty(n + 1, dtype=torch.float32, device=self._comm)
        return self._buffer

    def _collective(self, what: str, step: int, run: Callable[[], object]) -> None:
        try:
            run()
        except RuntimeError as exc:  # DistError and its kinds (backend, network, store)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            peers = self._peer_errors()
            why = (f"failed local rank(s): {peers}" if peers else
                   f"no local rank reported an error: one exited, or is stuck or slower than "
                   f"the group's timeout ({self.timeout:g} s)")
            self._broken = f"{what} of step {step} failed"
            raise LocalGroupError(f"local rank {self.rank}/{self.world}: {what} of step {step} "
                                  f"failed ({first}); {why}") from exc

    def _peer_errors(self) -> str:
        if self._store is None:
            return ""
        found = []
        for r in range(self.world):
            if r != self.rank:
                text = self._stored(_ERROR.format(r))
                if text:
                    found.append(f"rank {r}: {text}")
        return "; ".join(found)

    def _stored(self, key: str) -> str:
        """The store's value at ``key`` without waiting ("" if absent or unreachable)."""
        if self._store is None:
            return ""
        try:
            if not self._store.check([key]):
                return ""
            return bytes(self._store.get(key)).decode("utf-8", "replace")
        except Exception:
            return ""


# --------------------------------------------------------------------------- spawning

RankTarget = Callable[..., object]
"""``target(group, *args)``: the code each spawned rank runs (a module-level function)."""


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else text


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphaned ranks)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent was already gone
            os._exit(1)


def _rank_main(target: RankTarget, rank: int, world: int, port: int, device: str, backend: str,
               timeout: float, start_timeout: float, cpus: list[int] | None,
               args: tuple[Any, ...], threads: int | None = None) -> None:
    """Entry point of a spawned rank: connect, pin, join, run ``target``, report failure."""
    _die_with_parent()
    store = TCPStore("127.0.0.1", port, world, is_master=False,
                          timeout=datetime.timedelta(seconds=start_timeout))
    group: LocalGroup | None = None
    try:
        if cpus:
            pin_threads(cpus, threads=threads)
        elif threads:
            torch.set_num_threads(threads)
        store.set(_READY.format(rank), "1")
        group = LocalGroup._join(store=store, rank=rank, world=world, device=torch.device(device),
                                 backend=backend, timeout=timeout)
        target(group, *args)
    except BaseException as exc:
        text = "".join(traceback.format_exception(exc))
        with contextlib.suppress(Exception):
            store.set(_ERROR.format(rank), f"{type(exc).__name__}: {exc}\n{text}"[-_ERROR_CHARS:])
        sys.stderr.write(f"local rank {rank} failed:\n{text}")
        sys.stderr.flush()
        os._exit(1)  # skip the atexit/NCCL teardown of a failed group
    finally:
        if group is not None:
            group.close()


class LocalRanks:
    """The spawned ranks 1..G-1 of ``spawn_local_group`` and this process's rank 0 (``group``).

    A context manager: leaving it closes the group and reaps the children (``close``).
    Call ``join()`` first to wait for the children to finish and raise if one failed.
    """

    def __init__(self, group: LocalGroup, store: Any,
                 processes: list[multiprocessing.process.BaseProcess]) -> None:
        self.group = group
        self.processes = processes
        """Ranks 1..G-1, in rank order."""
        self._store = store

    def __enter__(self) -> LocalRanks:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def failures(self) -> list[str]:
        """One line per spawned rank that exited with a non-zero code: its code and error."""
        out = []
        for rank, proc in enumerate(self.processes, start=1):
            if proc.exitcode not in (None, 0):
                text = self.group._stored(_ERROR.format(rank))
                out.append(f"local rank {rank} exited with code {proc.exitcode}"
                           + (f": {_last_line(text)}" if text else ""))
        return out

    def join(self, timeout: float | None = None) -> None:
        """Wait for ranks 1..G-1 to exit; ``LocalGroupError`` listing those that failed, or
        those still running after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for proc in self.processes:
            proc.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        problems = self.failures()
        problems += [f"local rank {r} still running after {timeout:g} s"
                     for r, p in enumerate(self.processes, start=1) if p.exitcode is None]
        if problems:
            raise LocalGroupError("; ".join(problems))

    def close(self, grace: float = 5.0) -> None:
        """Leave the group, give the children ``grace`` seconds to exit, then kill them."""
        self.group.close()
        deadline = time.monotonic() + grace
        for proc in self.processes:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.processes:
            if proc.exitcode is None:
                proc.kill()
                proc.join(5.0)
        self._store = None


def spawn_local_group(target: RankTarget, *, devices: Sequence[torch.device | str],
                      args: tuple[Any, ...] = (), cpus: Sequence[Sequence[int]] | None = None,
                      backend: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                      start_timeout: float = DEFAULT_START_TIMEOUT,
                      threads: int | None = None) -> LocalRanks:
    """Make this process local rank 0 of ``len(devices)`` ranks; spawn the others.

    Each spawned rank ``r`` (a fresh ``spawn`` process, so ``target`` and ``args`` must
    pickle: a module-level function, plain data) pins its threads to ``cpus[r]`` (if
    given), joins the group on ``devices[r]`` and runs ``target(group, *args)``; this
    process pins itself to ``cpus[0]`` and gets its group as ``LocalRanks.group``, to run
    the same loop with its ``exchange``. ``backend``: default ``default_backend(devices)``.
    ``timeout``: seconds a collective waits (module docstring); ``start_timeout``: seconds
    the ranks may take to start. ``LocalGroupError`` if a rank dies or is late starting.
    ``threads``: torch threads of every rank (default: one per CPU of its list when ``cpus``
    is given, else left as it is).

    The children are ``multiprocessing`` *spawn* processes: each re-imports this process's
    ``__main__`` module (keep its work under ``if __name__ == "__main__":``), and on Linux is
    killed when the thread that spawned it ends (``PR_SET_PDEATHSIG``), so spawn from a
    thread that lives as long as the group, the main thread of the job's worker process.
    A rank that dies after saying it is ready but before joining costs ``timeout``.
    """
    devs = [torch.device(d) for d in devices]
    world = len(devs)
    if world == 0:
        raise ConfigError("spawn_local_group: no devices")
    if cpus is not None and len(cpus) != world:
        raise ConfigError(f"spawn_local_group: {len(cpus)} CPU lists for {world} ranks")
    backend = backend or default_backend(devs)
    if cpus is not None:
        pin_threads(cpus[0], threads=threads)
    elif threads:
        torch.set_num_threads(threads)
    if world == 1:
        return LocalRanks(LocalGroup.single(devs[0]), None, [])
    store = TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=start_timeout))
    context = multiprocessing.get_context("spawn")
    processes: list[multiprocessing.process.BaseProcess] = []
    try:
        for r in range(1, world):
            proc = context.Process(
                target=_rank_main, name=f"local-rank-{r}",
                args=(target, r, world, store.port, str(devs[r]), backend, timeout, start_timeout,
                      list(cpus[r]) if cpus is not None else None, args, threads))
            proc.start()
            processes.append(proc)
        _await_ready(store, processes, start_timeout)
        group = LocalGroup._join(store=store, rank=0, world=world, device=devs[0],
                                 backend=backend, timeout=timeout)
    except BaseException:
        for started in processes:
            started.kill()
            started.join(5.0)
        raise
    return LocalRanks(group, store, processes)


def _await_ready(store: Any, processes: list[multiprocessing.process.BaseProcess],
                 start_timeout: float) -> None:
    """Wait until every spawned rank says it is joining; fail fast if one exits first."""
    deadline = time.monotonic() + start_timeout
    pending = set(range(1, len(processes) + 1))
    while pending:
        pending = {r for r in pending if not store.check([_READY.format(r)])}
        for r in sorted(pending):
            code = processes[r - 1].exitcode
            if code is not None:
                text = bytes(store.get(_ERROR.format(r))).decode("utf-8", "replace") \
                    if store.check([_ERROR.format(r)]) else "see its stderr"
                raise LocalGroupError(f"local rank {r} exited with code {code} before joining: "
                                      f"{_last_line(text)}")
        if pending and time.monotonic() > deadline:
            raise LocalGroupError(f"local ranks {sorted(pending)} did not start within "
                                  f"{start_timeout:g} s")
        if pending:
            time.sleep(0.05)
