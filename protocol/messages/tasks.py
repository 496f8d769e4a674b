"""Task messages: submitting work, the coordinator's replication and its workers, bundles.

Who sends what (PROTOCOL.md §12 has the whole exchange):

* A **client** (``python -m node submit``) sends ``TaskSubmit`` on a CLIENT link to any node
  (the *entry* node) and gets ``TaskAccepted`` or ``TaskError``. It follows the task with
  ``TaskQuery`` (list, status, wait, results; answered by ``TaskQueryReply``) and may send a
  signed ``TaskCancel``. The entry node relays queries it cannot answer, unchanged but for
  ``req``, to a member that holds the task, on a CONTROL link.
* The **coordinator** of a task (rendezvous hashing of the task id over the live members) keeps
  the task's log and copies it to its replicas with ``TaskReplicate`` (each answers
  ``TaskReplicateAck``); it hands subtasks to **workers** with ``TaskAssign``. A worker renews
  the lease of each attempt it runs with ``TaskHeartbeat``, answers with ``TaskResult``, or
  refuses with ``TaskReject`` (e.g. an assignment from a lower ballot). ``TaskAbort`` stops a
  worker's attempts of a task. ``TaskAnnounce`` tells every member a task's summary.
* A worker without a task's bundle fetches it from the coordinator with ``BundleGet``,
  answered by ``BundleChunk`` pieces.

Values (a task's inputs and results) travel as msgpack-encoded bytes, never pickle; the
submission a submitter signs is a ``Submission`` encoded on its own (``encode_struct``), so the
signed bytes are exactly what every node decodes and checks.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import msgpack

from protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocol.messages.gossip import NODE_ID
from protocol.schema import (
    Bool,
    Bytes,
    EnumOf,
    Float,
    ListOf,
    Message,
    Optional,
    SchemaViolation,
    Str,
    Struct,
    StructOf,
    UInt,
    register,
    spec,
    unpack_body,
)
from protocol.tags import MsgType

S = TypeVar("S", bound=Struct)

TASK_ID_BYTES = 16
TASK_ID = Bytes(TASK_ID_BYTES, min_len=TASK_ID_BYTES)
DIGEST = Bytes(32, min_len=32)
PUBLIC_KEY = Bytes(32, min_len=32)
SIGNATURE = Bytes(64, min_len=64)
#: ``module:function``; ``module`` a dotted Python module name.
#: A task's kind (``node.tasks.kinds.KINDS``): "map", "train".
KIND = Str(32, pattern=r"[a-z][a-z0-9_]*")
FUNCTION = Str(200, pattern=r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
REQ = UInt(32)

#: Largest msgpack encoding of one input or one result.
MAX_VALUE_BYTES = 1024 * 1024
#: Largest packed bundle (``node.bundles``).
MAX_BUNDLE_BYTES = 4 * 1024 * 1024
#: Most subtasks (inputs) in one task.
MAX_SUBTASKS = 65_536
#: Largest total of a task's encoded inputs: inputs and bundle travel in one frame.
MAX_INPUTS_BYTES = 3 * 1024 * 1024
#: Most items in one ``TaskAssign`` / ``TaskResult`` / results page.
MAX_BATCH = 4096
#: Largest text fields of a failure: its traceback and each captured output tail.
MAX_TRACEBACK_CHARS = 8192
MAX_OUTPUT_TAIL_CHARS = 4096
#: Bytes of bundle in one ``BundleChunk``.
BUNDLE_CHUNK_BYTES = 1024 * 1024
#: Most entries in one ``TaskReplicate``; its entries are also cut by size (4 MiB).
MAX_LOG_BATCH = 4096
MAX_LOG_ENTRY_BYTES = MAX_VALUE_BYTES + 16 * 1024
#: Most replicas of a task (coordinator not counted).
MAX_REPLICAS = 8
#: Bytes of a kind's live figures in a ``TaskSummary`` / a ``TaskHeartbeat``.
MAX_PROGRESS_BYTES = 4096
MAX_HEARTBEAT_PROGRESS = 1024


class TaskState(enum.IntEnum):
    """A task's state as its coordinator sees it."""

    WAITING = 0
    """No live member can run it (resources): it waits, visibly."""
    RUNNING = 1
    DONE = 2
    """Every subtask succeeded."""
    FAILED = 3
    """Every subtask ended, some failed for good."""
    CANCELLED = 4


TERMINAL_STATES = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED})


class SubtaskState(enum.IntEnum):
    PENDING = 0
    RUNNING = 1
    DONE = 2
    FAILED = 3
    """Failed for good (retries spent, or cancelled)."""


class QueryOp(enum.IntEnum):
    LIST = 0
    """Summaries of the tasks this node knows (``after``: a task id cursor)."""
    STATUS = 1
    """One task's summary and its subtasks' reports, from subtask ``after_index``."""
    WAIT = 2
    """One task's summary once its ``version`` exceeds ``version`` (or after ``wait_s``)."""
    RESULTS = 3
    """A finished task's outcomes, in index order, from ``after_index``."""


class TaskErrorCode(enum.IntEnum):
    """Why a submission, a query or a cancel was refused (``TaskError.code``)."""

    INTERNAL = 0
    UNAUTHORIZED = 1
    """The submitter key is not authorized (or the signature is wrong)."""
    BAD_SUBMISSION = 2
    """Malformed: digests that do not match, an unknown kind, bad options."""
    TOO_LARGE = 3
    UNKNOWN_TASK = 4
    NOT_FINISHED = 5
    """Results asked of a task that is still running."""
    UNAVAILABLE = 6
    """No live member holds the task, or it cannot be reached now: retry."""
    NOT_ALLOWED = 7
    """The function's module is neither in the bundle nor allowed (``--allow-module``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Resources(Struct):
    """What one subtask needs of a worker."""

    cpus: float = spec(Float(0.0, 1024.0), default=1.0)
    gpus: int = spec(UInt(8), default=0)
    memory_mb: int = spec(UInt(32), default=0)
    """0: no limit; else the worker process's address-space limit."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Submission(Struct):
    """What a submitter signs: everything that decides what runs and on what."""

    kind: str = spec(KIND, default="map")
    function: str = spec(FUNCTION)
    bundle: bytes | None = spec(Optional(DIGEST), default=None)
    """The bundle's content id (``node.bundles``); None: the function is an installed module."""
    inputs_digest: bytes = spec(DIGEST)
    """``inputs_digest(inputs)``."""
    count: int = spec(UInt(32))
    retries: int = spec(UInt(8), default=3)
    """Attempts after the first, per subtask."""
    timeout_s: float = spec(Float(0.001, 7 * 86400.0), default=600.0)
    """Wall time of one attempt of one subtask."""
    resources: Resources = spec(StructOf(Resources), default=Resources())
    batch: int = spec(UInt(16), default=0)
    """Subtasks per assignment; 0: the coordinator chooses."""
    submitter: bytes = spec(PUBLIC_KEY)
    created: float = spec(Float(0.0))
    """Unix time the submitter signed it."""
    nonce: bytes = spec(Bytes(16, min_len=16))


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSeed(Struct):
    """A signed submission with everything a holder of the task needs to run it."""

    body: bytes = spec(Bytes(4096))
    """``encode_struct(Submission)``: the signed bytes."""
    signature: bytes = spec(SIGNATURE)
    inputs: tuple[bytes, ...] = spec(ListOf(Bytes(MAX_VALUE_BYTES), max_len=MAX_SUBTASKS))
    bundle: bytes = spec(Bytes(MAX_BUNDLE_BYTES), default=b"")
    """The packed bundle (``b""`` when the submission names none)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Ballot(Struct):
    """Who coordinates a task, and since when: ``epoch`` grows with every takeover. Ballots
    order by ``(epoch, rendezvous weight of node)`` (``node.placement.ballot_key``)."""

    epoch: int = spec(UInt(32))
    node: bytes = spec(NODE_ID)


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure(Struct):
    """Why an attempt failed: an exception's type and message, or what the worker saw."""

    type: str = spec(Str(200))
    """The exception's class name, or ``Timeout``, ``WorkerCrashed``, ``WorkerLost``,
    ``NotSerializable``, ``ResultTooLarge``, ``BadResult``, ``Cancelled``, ``NotAllowed``."""
    message: str = spec(Str(4096))
    traceback: str = spec(Str(MAX_TRACEBACK_CHARS), default="")
    stdout: str = spec(Str(MAX_OUTPUT_TAIL_CHARS), default="")
    """The tail of the worker process's stdout / stderr around the failure."""
    stderr: str = spec(Str(MAX_OUTPUT_TAIL_CHARS), default="")


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkItem(Struct):
    index: int = spec(UInt(32))
    input: bytes = spec(Bytes(MAX_VALUE_BYTES))


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome(Struct):
    """One subtask's result (``ok``, ``value``) or one attempt's failure."""

    index: int = spec(UInt(32))
    ok: bool = spec(Bool())
    value: bytes = spec(Bytes(MAX_VALUE_BYTES), default=b"")
    """The result, msgpack-encoded (when ``ok``)."""
    failure: Failure | None = spec(Optional(StructOf(Failure)), default=None)
    attempts: int = spec(UInt(16), default=1)
    worker: bytes | None = spec(Optional(NODE_ID), default=None)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSummary(Struct):
    task_id: bytes = spec(TASK_ID)
    function: str = spec(FUNCTION)
    submitter: bytes = spec(PUBLIC_KEY)
    coordinator: bytes = spec(NODE_ID)
    epoch: int = spec(UInt(32))
    state: TaskState = spec(EnumOf(TaskState))
    total: int = spec(UInt(32))
    done: int = spec(UInt(32))
    """Subtasks that succeeded."""
    failed: int = spec(UInt(32))
    """Subtasks that failed for good."""
    running: int = spec(UInt(32))
    retried: int = spec(UInt(32))
    """Attempts that failed and were tried again."""
    created: float = spec(Float(0.0))
    updated: float = spec(Float(0.0))
    """Unix time of the last change the answering node knows of."""
    version: int = spec(UInt(64))
    """Grows with every change of the summary (WAIT's cursor)."""
    waiting_reason: str = spec(Str(300), default="")
    kind: str = spec(KIND, default="map")
    progress: bytes = spec(Bytes(MAX_PROGRESS_BYTES), default=b"")
    """The kind's live figures, opaque here (a ``"train"`` task: an encoded ``JobProgress``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SubtaskReport(Struct):
    index: int = spec(UInt(32))
    state: SubtaskState = spec(EnumOf(SubtaskState))
    attempts: int = spec(UInt(16))
    worker: bytes | None = spec(Optional(NODE_ID), default=None)
    failure: Failure | None = spec(Optional(StructOf(Failure)), default=None)
    """The last failure, if any."""


# ---- client <-> node ----------------------------------------------------------------


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSubmit(Message):
    TAG: ClassVar[MsgType] = MsgType.TASK_SUBMIT
    req: int = spec(REQ)
    seed: TaskSeed = spec(StructOf(TaskSeed))


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskAccepted(Message):
    TAG: ClassVar[MsgType] = MsgType.TASK_ACCEPTED
    req: int = spec(REQ)
    task_id: bytes = spec(TASK_ID)
    coordinator: bytes = spec(NODE_ID)


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskError(Message):
    TAG: ClassVar[MsgType] = MsgType.TASK_ERROR
    req: int = spec(REQ)
    code: TaskErrorCode = spec(EnumOf(TaskErrorCode))
    message: str = spec(Str(1000))


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskQuery(Message):
    TAG: ClassVar[MsgType] = MsgType.TASK_QUERY
    req: int = spec(REQ)
    op: QueryOp = spec(EnumOf(QueryOp))
    task_id: bytes | None = spec(Optional(TASK_ID), default=None)
    after: bytes | None = spec(Optional(TASK_ID), default=None)
    """LIST: list the tasks whose id sorts after this one."""
    after_index: int = spec(UInt(32), default=0)
    """STATUS / RESULTS: from this subtask index on."""
    version: int = spec(UInt(64), default=0)
    """WAIT: answer once the summary's version exceeds this."""
    wait_s: float = spec(Float(0.0, 30.0), default=0.0)
    """WAIT: answer after this long anyway."""
    limit: int = spec(UInt(16), default=1024)
    relayed: bool = spec(Bool(), default=False)
    """Set by an entry node relaying a client's query: answer it yourself, never relay again."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskQueryReply(Message):
    TAG: ClassVar[MsgType] = MsgType.TASK_QUERY_REPLY
    req: int = spec(REQ)
    tasks: tuple[TaskSummary, ...] = spec(ListOf(StructOf(TaskSummary), max_len=1024), default=())
    subtasks: tuple[SubtaskReport, ...] = spec(ListOf(StructOf(SubtaskReport), max_len=MAX_BATCH),
                                               default=())
    outcomes: tuple[Outcome, ...] = spec(ListOf(StructOf(Outcome), max_len=MAX_BATCH), default=())
    next_after: bytes | None = spec(Optional(TASK_ID), default=None)
    """LIST: more tasks follow this id."""
    next_index: int | None = spec(Optional(UInt(32)), default=None)
    """STATUS / RESULTS: more follow from this index."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskCancel(Message):
    """Signed by the task's submitter or the mesh owner over ``cancel_body(task_id, signed_at)``."""

    TAG: ClassVar[MsgType] = MsgType.TASK_CANCEL
    req: int = spec(REQ)
    task_id: bytes = spec(TASK_ID)
    key: bytes = spec(PUBLIC_KEY)
    signed_at: float = spec(Float(0.0))
    signature: bytes = spec(SIGNATURE)
    relayed: bool = spec(Bool(), default=False)


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskCancelled(Message):
    TAG: ClassVar[MsgType] = MsgType.TASK_CANCELLED
    req: int = spec(REQ)
    summary: TaskSummary = spec(StructOf(TaskSummary))


# ---- coordinator <-> replicas -------------------------------------------------------


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskReplicate(Message):
    """Coordinator -> replica: the task's log from entry ``first`` on, and how far it is committed."""

    TAG: ClassVar[MsgType] = MsgType.TASK_REPLICATE
    task_id: bytes = spec(TASK_ID)
    ballot: Ballot = spec(StructOf(Ballot))
    replicas: tuple[bytes, ...] = spec(ListOf(NODE_ID, max_len=MAX_REPLICAS))
    seed: TaskSeed | None = spec(Optional(StructOf(TaskSeed)), default=None)
    """Sent until the replica acknowledges it has the task."""
    first: int = spec(UInt(64), default=0)
    entries: tuple[bytes, ...] = spec(ListOf(Bytes(MAX_LOG_ENTRY_BYTES), max_len=MAX_LOG_BATCH), default=())
    committed: int = spec(UInt(64), default=0)
    """Entries before this index are committed (held by every replica)."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskReplicateAck(Message):
    TAG: ClassVar[MsgType] = MsgType.TASK_REPLICATE_ACK
    task_id: bytes = spec(TASK_ID)
    ballot: Ballot = spec(StructOf(Ballot))
    """Ok: the ballot acknowledged. Refused: the higher ballot the replica follows."""
    ok: bool = spec(Bool())
    through: int = spec(UInt(64))
    """The replica holds every entry before this index (and the seed when > 0 or ``has_seed``)."""
    has_seed: bool = spec(Bool(), default=True)


# ---- coordinator <-> workers --------------------------------------------------------


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskAssign(Message):
    TAG: ClassVar[MsgType] = MsgType.TASK_ASSIGN
    task_id: bytes = spec(TASK_ID)
    ballot: Ballot = spec(StructOf(Ballot))
    attempt: int = spec(UInt(64))
    function: str = spec(FUNCTION)
    bundle: bytes | None = spec(Optional(DIGEST), default=None)
    timeout_s: float = spec(Float(0.001, 7 * 86400.0))
    lease_s: float = spec(Float(0.1, 3600.0))
    """Renew the lease with a heartbeat at least this often, or the attempt is presumed lost."""
    resources: Resources = spec(StructOf(Resources), default=Resources())
    items: tuple[WorkItem, ...] = spec(ListOf(StructOf(WorkItem), max_len=MAX_BATCH))
    kind: str = spec(KIND, default="map")
    """The task's kind: which runner the worker hands the items to."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskHeartbeat(Message):
    TAG: ClassVar[MsgType] = MsgType.TASK_HEARTBEAT
    task_id: bytes = spec(TASK_ID)
    ballot: Ballot = spec(StructOf(Ballot))
    attempts: tuple[int, ...] = spec(ListOf(UInt(64), max_len=MAX_BATCH))
    progress: bytes = spec(Bytes(MAX_HEARTBEAT_PROGRESS), default=b"")
    """The worker's live figures for the task, opaque here (``"train"``: a ``SeatProgress``)."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskResult(Message):
    TAG: ClassVar[MsgType] = MsgType.TASK_RESULT
    task_id: bytes = spec(TASK_ID)
    ballot: Ballot = spec(StructOf(Ballot))
    attempt: int = spec(UInt(64))
    outcomes: tuple[Outcome, ...] = spec(ListOf(StructOf(Outcome), max_len=MAX_BATCH))


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskReject(Message):
    TAG: ClassVar[MsgType] = MsgType.TASK_REJECT
    task_id: bytes = spec(TASK_ID)
    ballot: Ballot = spec(StructOf(Ballot))
    """The ballot the worker follows (higher than the assignment's when it refused it as stale)."""
    attempt: int = spec(UInt(64))
    reason: str = spec(Str(500))


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskAbort(Message):
    TAG: ClassVar[MsgType] = MsgType.TASK_ABORT
    task_id: bytes = spec(TASK_ID)
    ballot: Ballot = spec(StructOf(Ballot))
    attempts: tuple[int, ...] = spec(ListOf(UInt(64), max_len=MAX_BATCH), default=())
    """Empty: every attempt of the task."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskAnnounce(Message):
    TAG: ClassVar[MsgType] = MsgType.TASK_ANNOUNCE
    summary: TaskSummary = spec(StructOf(TaskSummary))


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BundleGet(Message):
    TAG: ClassVar[MsgType] = MsgType.BUNDLE_GET
    digest: bytes = spec(DIGEST)
    offset: int = spec(UInt(32), default=0)


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class BundleChunk(Message):
    """A piece of a packed bundle; ``total`` 0 and no data: the sender does not have it."""

    TAG: ClassVar[MsgType] = MsgType.BUNDLE_CHUNK
    BLOB: ClassVar[tuple[str, ...]] = ("data",)
    digest: bytes = spec(DIGEST)
    offset: int = spec(UInt(32))
    total: int = spec(UInt(32))
    data: bytes | memoryview = spec(Bytes(BUNDLE_CHUNK_BYTES, views=True))


# ---- helpers ---------------------------------------------------------------------------


def encode_struct(value: Struct) -> bytes:
    """One struct on its own, as msgpack (what a submitter signs, what a log entry holds)."""
    data: bytes = msgpack.packb(value.to_wire(), use_bin_type=True)
    return data


def decode_struct(cls: type[S], data: bytes, *, what: str) -> S:
    """``encode_struct``'s inverse, as bounded as every decode; ``RemoteProtocolError``."""
    raw = unpack_body(data, what=what)
    try:
        value = cls.from_wire(raw, what)
    except SchemaViolation as exc:
        raise RemoteProtocolError(str(exc), code=ErrorCode.SCHEMA_VIOLATION) from None
    except LocalProtocolError as exc:
        raise RemoteProtocolError(str(exc), code=exc.code) from None
    assert isinstance(value, cls)
    return value


def inputs_digest(inputs: Sequence[bytes]) -> bytes:
    """SHA-256 over the inputs, each length-prefixed (8 bytes, big-endian)."""
    h = hashlib.sha256(b"starmesh inputs v1")
    for item in inputs:
        h.update(len(item).to_bytes(8, "big"))
        h.update(item)
    return h.digest()


def signed_submission(body: bytes) -> bytes:
    """What a submitter's Ed25519 signature covers: a domain tag, then the encoded ``Submission``."""
    return b"starmesh submission v1" + body


def task_id_of(body: bytes) -> bytes:
    """A task's id: the first 16 bytes of SHA-256 over its signed submission."""
    return hashlib.sha256(b"starmesh task v1" + body).digest()[:TASK_ID_BYTES]


def cancel_body(task_id: bytes, signed_at: float) -> bytes:
    """What a ``TaskCancel`` signs."""
    return b"starmesh cancel v1" + task_id + struct.pack(">d", float(signed_at))


def pack_value(value: Any) -> bytes:
    """A JSON-like value as msgpack (``LocalProtocolError`` if it cannot be encoded)."""
    try:
        data: bytes = msgpack.packb(value, use_bin_type=True)
        return data
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"value is not msgpack-serializable: {exc}",
                                 code=ErrorCode.SCHEMA_VIOLATION) from None


def unpack_value(data: bytes) -> Any:
    """``pack_value``'s inverse, with the wire's caps (``RemoteProtocolError``)."""
    return unpack_body(data, what="value")
