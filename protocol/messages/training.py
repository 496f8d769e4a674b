"""The structs of a training job: what a task of kind ``"train"`` carries in its opaque bytes.

A training job is a task (``protocol.messages.tasks``) whose submission has ``kind="train"``
and one input, an encoded ``JobSpec``. Everything else of the job travels inside the task
layer's opaque fields, always as ``encode_struct`` bytes of one struct below:

* a ``WorkItem.input`` of a train task is a ``Seat``: one worker's part of one *segment*
  (a run of consecutive steps trained by one group);
* an ``Outcome.value`` of a seat is a ``SeatReport``;
* a log entry of the job (replicated to the task's replicas) is a ``SegmentRecord``: the
  segment's group, losses, shard cursors and the state blob at its end;
* a worker's live ``SeatProgress`` and a holder's ``JobProgress`` are to ride on heartbeats and
  task summaries (fields still to add to ``protocol.messages.tasks``).

PROTOCOL.md will specify them once the kind is registered (it is not yet: no node accepts a
``"train"`` task until a runner serves its seats).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from protocol.errors import LocalProtocolError
from protocol.messages.gossip import NODE_ID
from protocol.messages.tasks import DIGEST, FUNCTION, MAX_VALUE_BYTES, TASK_ID
from protocol.schema import (
    Bool,
    Bytes,
    EnumOf,
    Float,
    ListOf,
    Optional,
    Str,
    Struct,
    StructOf,
    UInt,
    spec,
)

#: Most workers in one job's group.
MAX_GROUP = 256
#: Most virtual data shards of a job.
MAX_SHARDS = 4096
#: Most steps one segment spans (and so losses one report carries).
MAX_SEGMENT_STEPS = 10_000
#: Most node ids of each list in a ``JobProgress`` carried by a ``TaskSummary``.
SUMMARY_WORKERS = 32
#: Most group changes one record (or a ``JobProgress``) lists.
MAX_EVENTS = 2 * MAX_GROUP
#: Most group changes a ``JobProgress`` in a ``TaskSummary`` lists.
PROGRESS_EVENTS = 16
#: Most ``--job-arg`` options.
MAX_OPTIONS = 64
CODEC = Str(64, pattern=r"[a-z0-9+_-]+")
MODE = Str(16, pattern=r"sync|diloco")
DATA_KIND = Str(16, pattern=r"text|tokens")
#: Most members a ``JobSpec`` names as holding its data blob.
MAX_DATA_HOLDERS = 16


class ExportQuantize(enum.IntEnum):
    NONE = 0
    INT8 = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Option(Struct):
    """One ``--job-arg KEY=VALUE`` (passed to the job's function as strings)."""

    key: str = spec(Str(64, pattern=r"[A-Za-z_][A-Za-z0-9_.-]*"))
    value: str = spec(Str(1024))


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardCursor(Struct):
    """The next batch position of one virtual data shard."""

    shard: int = spec(UInt(32))
    position: int = spec(UInt(64))


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec(Struct):
    """What ``python -m node train`` submits (the task's one input)."""

    options: tuple[Option, ...] = spec(ListOf(StructOf(Option), max_len=MAX_OPTIONS), default=())
    steps: int = spec(UInt(32))
    """Optimizer steps of the whole job (DiLoCo: inner steps, counted per worker)."""
    workers_min: int = spec(UInt(16), default=1)
    workers_max: int = spec(UInt(16), default=MAX_GROUP)
    mode: str = spec(MODE, default="sync")
    inner_steps: int = spec(UInt(32), default=50)
    """DiLoCo's H: inner steps between outer steps (one segment)."""
    outer_lr: float = spec(Float(0.0, 100.0), default=0.7)
    outer_momentum: float = spec(Float(0.0, 1.0), default=0.9)
    codec: str = spec(CODEC, default="int8+zstd")
    segment_steps: int = spec(UInt(32), default=20)
    """Sync mode: steps per segment (a group change or a resume happens at segment ends)."""
    batch: int = spec(UInt(16), default=0)
    """The global batch: micro-batches (each the job's own batch) per optimizer step over the
    whole group, split over whoever is present (``node.training.elastic.shares``); 0: one per
    worker (the global batch then grows with the group)."""
    checkpoint_every: int = spec(UInt(32), default=100)
    """Steps between checkpoints kept pinned with copies on two nodes."""
    eval_every: int = spec(UInt(32), default=100)
    shards: int = spec(UInt(32), default=64)
    seed: int = spec(UInt(32), default=0)
    gpus_per_worker: int = spec(UInt(8), default=0)
    local_ranks: int = spec(UInt(8), default=0)
    """Local ranks (processes) per worker, which split each step's micro-batches (0: one per GPU
    of ``gpus_per_worker``, or one on a CPU job; on a CPU job k > 0 gloo ranks share its CPUs)."""
    threads: int = spec(UInt(16), default=0)
    """Torch threads per worker (0: the worker's CPU slots)."""
    prune: float = spec(Float(0.0, 0.99), default=0.0)
    quantize: ExportQuantize = spec(EnumOf(ExportQuantize), default=ExportQuantize.NONE)
    resume_state: bytes | None = spec(Optional(DIGEST), default=None)
    """Start from this shared state blob (``--resume``) at ``resume_step``."""
    resume_step: int = spec(UInt(32), default=0)
    resume_cursors: tuple[ShardCursor, ...] = spec(ListOf(StructOf(ShardCursor), max_len=MAX_SHARDS),
                                                   default=())
    resume_from: bytes | None = spec(Optional(TASK_ID), default=None)
    """The job a ``--resume`` continues (shown by ``jobs``)."""
    data: bytes | None = spec(Optional(DIGEST), default=None)
    """The job's training data as a blob (``--data FILE|DIR``); None: the job's own (built in)."""
    data_kind: str = spec(DATA_KIND, default="text")
    """What ``data`` holds: ``text`` (the file) or ``tokens`` (a tar of integer arrays)."""
    data_name: str = spec(Str(255), default="")
    """The data's file or directory name, for people."""
    data_bytes: int = spec(UInt(64), default=0)
    """The data blob's size."""
    data_holders: tuple[bytes, ...] = spec(ListOf(NODE_ID, max_len=MAX_DATA_HOLDERS), default=())
    """Members the submitter put ``data`` on (fetch hints; any holder serves it)."""

    def __post_init__(self) -> None:
        Struct.__post_init__(self)
        problems = []
        if self.steps < 1:
            problems.append("steps must be at least 1")
        if not 1 <= self.workers_min <= self.workers_max <= MAX_GROUP:
            problems.append(f"workers must satisfy 1 <= min <= max <= {MAX_GROUP}")
        if self.mode == "diloco" and not 1 <= self.inner_steps <= MAX_SEGMENT_STEPS:
            problems.append(f"inner_steps must be 1..{MAX_SEGMENT_STEPS}")
        if not 1 <= self.segment_steps <= MAX_SEGMENT_STEPS:
            problems.append(f"segment_steps must be 1..{MAX_SEGMENT_STEPS}")
        if not 1 <= self.shards <= MAX_SHARDS:
            problems.append(f"shards must be 1..{MAX_SHARDS}")
        if self.workers_min > min(self.shards, self.batch or self.workers_min):
            problems.append(f"workers_min {self.workers_min} exceeds the shards or the global batch "
                            "(a worker needs at least one of each): the job could never start")
        if self.gpus_per_worker and self.local_ranks > self.gpus_per_worker:
            problems.append(f"local_ranks {self.local_ranks} exceeds gpus_per_worker {self.gpus_per_worker} "
                            "(one local rank per GPU)")
        if self.resume_step > self.steps:
            problems.append("resume_step is past the job's steps")
        if self.data is None and (self.data_name or self.data_bytes or self.data_holders):
            problems.append("data_name, data_bytes and data_holders need data")
        if problems:
            raise LocalProtocolError("JobSpec: " + "; ".join(problems))

    @property
    def seg(self) -> int:
        """Steps per segment: H in DiLoCo (one outer step), ``segment_steps`` in sync mode."""
        return self.inner_steps if self.mode == "diloco" else self.segment_steps


@dataclass(frozen=True, slots=True, kw_only=True)
class Seat(Struct):
    """One worker's part of one segment (a ``WorkItem.input``)."""

    job: bytes = spec(TASK_ID)
    epoch: int = spec(UInt(32))
    """The coordinator's ballot epoch: round keys include it, so a successor's rounds never mix
    with a deposed coordinator's."""
    segment: int = spec(UInt(32))
    plan: int = spec(UInt(32))
    """The coordinator's count of segment plans: a retried segment's rounds never meet a stale try's."""
    start: int = spec(UInt(32))
    end: int = spec(UInt(32))
    group: tuple[bytes, ...] = spec(ListOf(NODE_ID, max_len=MAX_GROUP))
    """The committed group of every round of this segment, in rank order."""
    rank: int = spec(UInt(16))
    state: bytes | None = spec(Optional(DIGEST), default=None)
    """The shared state blob at ``start`` (None: build fresh from the seed)."""
    holders: tuple[bytes, ...] = spec(ListOf(NODE_ID, max_len=MAX_GROUP), default=())
    """Members known to hold ``state`` (the last segment's group)."""
    cursors: tuple[ShardCursor, ...] = spec(ListOf(StructOf(ShardCursor), max_len=MAX_SHARDS))
    """This worker's shards and where each continues."""
    evaluate: bool = spec(Bool(), default=False)
    """Compute the validation loss at ``end`` (rank 0)."""
    checkpoint: bool = spec(Bool(), default=False)
    """``end`` is a checkpoint: pin the state and keep copies on two nodes."""
    final: bool = spec(Bool(), default=False)
    """The job's last segment: rank 0 also exports the model."""
    job_spec: JobSpec | None = spec(Optional(StructOf(JobSpec)), default=None)
    """The job (a worker need not hold the task): options, mode, codec, exports."""
    shares: tuple[int, ...] = spec(ListOf(UInt(16), max_len=MAX_GROUP), default=())
    """Micro-batches per step of each rank (``()``: one each); 0 marks a *listener*, a newcomer
    that fetches ``state`` while the segment runs and replays its rounds (PROTOCOL.md §15)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Export(Struct):
    """What the job's last segment exported (rank 0)."""

    model: bytes = spec(DIGEST)
    """The exported model (safetensors) as a blob."""
    sample: str = spec(Str(4096), default="")
    params: int = spec(UInt(64), default=0)
    nonzeros: int = spec(UInt(64), default=0)
    file_bytes: int = spec(UInt(64), default=0)
    report: bytes = spec(Bytes(16384), default=b"")
    """Before/after figures of pruning and quantization (a packed map)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SeatReport(Struct):
    """A seat's outcome value."""

    end: int = spec(UInt(32))
    losses: tuple[float, ...] = spec(ListOf(Float(), max_len=MAX_SEGMENT_STEPS))
    """This worker's training loss at each step of the segment."""
    cursors: tuple[ShardCursor, ...] = spec(ListOf(StructOf(ShardCursor), max_len=MAX_SHARDS))
    state: bytes = spec(DIGEST)
    """The shared state blob at ``end`` (identical on every worker of the group)."""
    val_loss: float | None = spec(Optional(Float()), default=None)
    tokens: int = spec(UInt(64), default=0)
    bytes_sent: int = spec(UInt(64), default=0)
    compute_s: float = spec(Float(0.0), default=0.0)
    comm_s: float = spec(Float(0.0), default=0.0)
    rounds: int = spec(UInt(32), default=0)
    contributors_min: int = spec(UInt(16), default=0)
    """The fewest contributors any round of the segment averaged."""
    export: Export | None = spec(Optional(StructOf(Export)), default=None)
    rounds_of: tuple[int, ...] = spec(ListOf(UInt(32), max_len=MAX_GROUP), default=())
    """Per rank of the group: the rounds of the seat whose result it contributed to, as this
    worker's node saw them (how the coordinator counts a lost worker's batches)."""
    fetch_s: float = spec(Float(0.0), default=0.0)
    """A listener's seconds from the seat's start until its state had arrived."""


class GroupChange(enum.IntEnum):
    JOINED = 0
    """Entered the group as a listener (``seconds``: since the coordinator first saw it able)."""
    ACTIVE = 1
    """Its first segment with a share of the batch (``seconds``: since it was first seen)."""
    GONE = 2
    """Left the mesh or died during the segment (``reason``)."""
    FAILED = 3
    """Its seat failed (``reason``): dropped from the group."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupEvent(Struct):
    """One change of a job's group, at the segment that starts at ``step``."""

    change: GroupChange = spec(EnumOf(GroupChange))
    node: bytes = spec(NODE_ID)
    step: int = spec(UInt(32))
    seconds: float = spec(Float(0.0), default=0.0)
    reason: str = spec(Str(200), default="")


@dataclass(frozen=True, slots=True, kw_only=True)
class SegmentRecord(Struct):
    """A committed segment: a log entry of the job."""

    segment: int = spec(UInt(32))
    start: int = spec(UInt(32))
    end: int = spec(UInt(32))
    group: tuple[bytes, ...] = spec(ListOf(NODE_ID, max_len=MAX_GROUP))
    finished: tuple[bytes, ...] = spec(ListOf(NODE_ID, max_len=MAX_GROUP))
    """The group members whose seat reported (the others died or were dropped)."""
    losses: tuple[float, ...] = spec(ListOf(Float(), max_len=MAX_SEGMENT_STEPS))
    """The mean over ``finished`` of each step's training loss."""
    cursors: tuple[ShardCursor, ...] = spec(ListOf(StructOf(ShardCursor), max_len=MAX_SHARDS))
    """Every shard's next position after the segment."""
    state: bytes = spec(DIGEST)
    val_loss: float | None = spec(Optional(Float()), default=None)
    tokens: int = spec(UInt(64), default=0)
    bytes_sent: int = spec(UInt(64), default=0)
    wall_s: float = spec(Float(0.0), default=0.0)
    """Coordinator's seconds from dispatching the segment to its last report."""
    compute_s: float = spec(Float(0.0), default=0.0)
    comm_s: float = spec(Float(0.0), default=0.0)
    checkpoint: bool = spec(Bool(), default=False)
    export: Export | None = spec(Optional(StructOf(Export)), default=None)
    shares: tuple[int, ...] = spec(ListOf(UInt(16), max_len=MAX_GROUP), default=())
    """The seats' shares (``Seat.shares``), in rank order."""
    events: tuple[GroupEvent, ...] = spec(ListOf(StructOf(GroupEvent), max_len=MAX_EVENTS), default=())
    """How the group changed in this segment."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SeatProgress(Struct):
    """A worker's latest step of its seat (on heartbeats; soft state)."""

    segment: int = spec(UInt(32))
    step: int = spec(UInt(32))
    loss: float = spec(Float())
    tokens_s: float = spec(Float(0.0), default=0.0)
    bytes_sent: int = spec(UInt(64), default=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobProgress(Struct):
    """A training job as its holders report it (``TaskSummary.progress``)."""

    function: str = spec(FUNCTION)
    mode: str = spec(MODE)
    step: int = spec(UInt(32))
    """Committed steps (``live_step``: the furthest a worker reported)."""
    steps: int = spec(UInt(32))
    live_step: int = spec(UInt(32), default=0)
    loss: float | None = spec(Optional(Float()), default=None)
    val_loss: float | None = spec(Optional(Float()), default=None)
    workers: tuple[bytes, ...] = spec(ListOf(NODE_ID, max_len=MAX_GROUP), default=())
    """The current (or last) group."""
    workers_seen: tuple[bytes, ...] = spec(ListOf(NODE_ID, max_len=4 * MAX_GROUP), default=())
    tokens_s: float = spec(Float(0.0), default=0.0)
    bytes_sent: int = spec(UInt(64), default=0)
    state: bytes | None = spec(Optional(DIGEST), default=None)
    checkpoint: bytes | None = spec(Optional(DIGEST), default=None)
    """The newest checkpoint's state blob (what ``--resume`` starts from)."""
    checkpoint_step: int = spec(UInt(32), default=0)
    waiting: str = spec(Str(300), default="")
    export: Export | None = spec(Optional(StructOf(Export)), default=None)
    segments: int = spec(UInt(32), default=0)
    """Committed segments (each is one ``results`` outcome: its ``SegmentRecord``)."""
    group_size: int = spec(UInt(16), default=0)
    """Members of the current group (``workers`` lists at most ``SUMMARY_WORKERS`` of them)."""
    seen: int = spec(UInt(32), default=0)
    """Members ever in the group (``workers_seen`` lists at most ``SUMMARY_WORKERS``)."""
    events: tuple[GroupEvent, ...] = spec(ListOf(StructOf(GroupEvent), max_len=MAX_EVENTS), default=())
    """The newest group changes (at most ``PROGRESS_EVENTS`` in a ``TaskSummary``)."""
    listeners: tuple[bytes, ...] = spec(ListOf(NODE_ID, max_len=MAX_GROUP), default=())
    """Newcomers of the segment in flight, fetching the state while it runs."""
    batch: int = spec(UInt(16), default=0)
    """Micro-batches per step over the group in flight (the global batch)."""


#: Sizes the seat reports and records must fit in (an ``Outcome.value``, a log entry).
MAX_REPORT_BYTES = MAX_VALUE_BYTES
