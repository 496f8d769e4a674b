"""One fault-tolerant butterfly all-reduce round: a sans-I/O state machine (PROTOCOL.md §11).

Theory of operation
-------------------
The group is ``n`` members (node ids ascending); the flattened fp32 tensor is cut into
``n`` contiguous slices (``layout.slice_sizes``), slice ``s`` initially owned by member
``s``, each slice into chunks of ``chunk_elements``. The *leader* is the first member of
the current receivers R that this member does not consider failed.

States::

    REDUCE_SCATTER --commit accepted--> ALL_GATHER --finish--> FINISHED
          |                               |  ^  |
          |                               +--+  +--dropped / abort / cancel / timeout--> FAILED
          +--dropped / abort / cancel / timeout--> FAILED      (a later commit: next epoch)

REDUCE_SCATTER (epoch 0)
    On start a member sends AR_BEGIN to everyone. Once owner ``o``'s AR_BEGIN has arrived
    (same layout), the member streams its contribution to slice ``o`` to ``o`` as AR_PART
    chunks, at most ``window_bytes`` unacknowledged per destination (``on_sent``). Owners
    collect complete, finite contributions per sender (a NaN/Inf chunk marks its sender
    NON_FINITE). A member *reports* (AR_REPORT: contributions held with squared norms,
    exclusions) to the leader once its own slice is complete from every member it is not
    failing, or at ``part_timeout``; it reports again whenever that content changes.
    Early averages (``config.early_averages``): an owner averages chunk k of its slice as
    soon as it holds chunk k from every member and streams it as AR_AVERAGE of epoch 0,
    parts and averages to one member taking turns on its link; so the all-gather overlaps
    the reduce-scatter. They count only if the first commit's S is the whole group
    (``contributors_since`` 0); otherwise the epoch's averages are computed as below.
ALL_GATHER (epoch e >= 1)
    The leader's AR_COMMIT fixes S (contributors), R (receivers), the owner of each slice,
    and who must resend which slice to a new owner. An owner, once it holds complete
    contributions from all of S, averages them (fp64, member order) and streams AR_AVERAGE
    chunks to every receiver (computing each chunk as it first goes out, so reducing
    pipelines with sending). A member reports when it holds every average, when it is
    blocked on a failed member, or at ``gather_timeout`` (then ``timed_out``). A commit with higher
    (epoch, leader) replaces the current one; averages stay valid while S and their owner
    are unchanged (``contributors_since``).
Leader
    Decides with ``decide.decide`` (pure) on what it knows after every input, and at its deadline
    (``report_grace`` after the members' deadline, extended once while reports are
    missing): FINISH (AR_FINISH: everyone returns this epoch's averages), the next COMMIT,
    or ABORT. A FINISHED member answers late reports, commits and takeovers with its
    AR_FINISH, once per member, for those that missed it (its ``Epilogue``, which the node's
    ``RoundTable`` keeps after the round's buffers are gone).
Failures
    ``peer_failed`` (DIED), AR_CANCEL (CANCELLED), a malformed message (PROTOCOL_ERROR), a
    missing AR_BEGIN at ``join_timeout`` (STALLED) and commits dropping a member mark it
    failed here: nothing more is sent to it or awaited from it. A member that waits for the
    leader past the leader's own (possibly extended) deadline (or learns it died) fails it;
    the next member of R becomes leader, announces AR_TAKEOVER, and re-decides from the
    reports sent to it.

Progress and deadlines
    Every input runs the round's steps (follow the leader, reduce owned slices, report,
    decide) pass after pass until a pass changes nothing: a fixpoint. A pass changes
    something only by moving the round forward (a new leader, an average started, the
    leader's own new report, a decision), so the fixpoint comes within a few passes; a pass
    bound exceeded is a bug and raises ``RuntimeError``, never a silent stop. Reports are
    built from the current state each time. Every wait is one entry of one deadline table keyed by ``Deadline``;
    ``next_deadline()`` is its minimum. Outputs are ``node.core.Send``: control messages on
    CONTROL, ``OutgoingChunk`` (a chunk to encode) on BULK. With a lossy codec the adapter
    makes the owner's result what its receivers decode (``rounds.same_as_receivers``).

Invariants
    * Failure and exclusion sets only grow; R only shrinks; epochs only increase.
    * Every average of one epoch is over the same S, summed in member order, so every
      survivor's result is bit-identical and independent of arrival order.
    * A member returns a result only on the leader's AR_FINISH for the commit it holds,
      with every average valid under that commit.
    * Every wait has a deadline, and ``round_timeout`` bounds the round: it never hangs.
    * Buffers are bounded by the round: at most one buffer per (slice, sender) and one per
      slice average; in-flight chunks per destination by ``window_bytes``.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from node.allreduce import layout
from node.allreduce.buffers import SliceBuffer
from node.allreduce.config import AllReduceConfig
from node.allreduce.decide import DecisionKind, LeaderView, decide
from node.allreduce.events import (
    AllReduceError,
    AllReduceResult,
    Event,
    Floats,
    PeerDropped,
    RoundFailed,
    RoundFinished,
    RoundSend,
    TensorKind,
)
from node.allreduce.outbox import Job, Outbox
from node.allreduce.slices import SliceStore
from node.allreduce.validate import check_commit, check_report
from node.core import Send
from protocol.connection import Channel
from protocol.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from protocol.messages.tensor import (
    ALLREDUCE_CONTROL_TYPES,
    ALLREDUCE_TENSOR_TYPES,
    ArAverage,
    ArBegin,
    ArCancel,
    ArCommit,
    ArFinish,
    ArPart,
    ArReport,
    ArTakeover,
    DropReason,
    Exclusion,
)
from protocol.schema import Message

#: Reasons another member's report can make us fail a member (evidence, not opinion).
_EXPLICIT = (DropReason.DIED, DropReason.CANCELLED)
#: What a member that missed the AR_FINISH sends a finished member (it answers with it).
_ASKING = (ArReport, ArCommit, ArTakeover)


class RoundState(enum.Enum):
    REDUCE_SCATTER = "reduce-scatter"
    ALL_GATHER = "all-gather"
    FINISHED = "finished"
    FAILED = "failed"


class Deadline(enum.Enum):
    """The round's waits: one entry each in its deadline table."""

    ROUND = "round"
    """``round_timeout`` after the local start: the round fails."""
    JOIN = "join"
    """``join_timeout`` after the start: members whose AR_BEGIN has not arrived are STALLED."""
    REPORT = "report"
    """``part_timeout`` / ``gather_timeout``: report what we hold, complete or not."""
    DECIDE = "decide"
    """The leader decides even if reports are missing (``report_grace`` after the members)."""
    SUSPECT = "suspect"
    """A member gives up on a leader that has not decided (``leader_timeout`` after it)."""


class Epilogue:
    """What a finished round still does: answer each member that asks late (a report, a
    commit or a takeover: it missed the AR_FINISH) with that AR_FINISH, once per member.
    Small, so the node's ``RoundTable`` keeps it after the round's buffers are gone."""

    __slots__ = ("_answered", "_me", "_members", "finish")

    def __init__(self, finish: ArFinish, members: tuple[bytes, ...], me: bytes) -> None:
        self.finish = finish
        self._members = members
        self._me = me
        self._answered: set[bytes] = set()

    def answer(self, src: bytes, msg: Message) -> ArFinish | None:
        """The AR_FINISH to send ``src`` if ``msg`` asks for it and ``src`` was not answered yet."""
        if (not isinstance(msg, _ASKING) or msg.round_id != self.finish.round_id or src == self._me
                or src in self._answered or src not in self._members):
            return None
        self._answered.add(src)
        return self.finish


class AllReduceRound:
    """One member's side of one all-reduce round. Construct it to start the round.

    Feed it ``on_message`` / ``on_tensor`` / ``on_sent`` / ``peer_failed`` / ``cancel`` /
    ``handle_timer``; after each call drain ``messages_to_send()`` and ``next_event()`` and
    re-arm a timer at ``next_deadline()`` (``node.driver.Driver``). ``tensor`` (1-D,
    C-contiguous float32) is read, never written, and must stay unchanged until the round
    ends. ``out`` is where the result's average is written (it may be ``tensor`` itself: an
    in-place call; it is written only after the round finished), else a new array.
    """

    def __init__(self, *, node_id: bytes, group: Sequence[bytes], key: bytes, tensor: Floats,
                 now: float, config: AllReduceConfig | None = None,
                 weights: Mapping[bytes, float] | None = None, codec_name: str = "none",
                 out: Floats | None = None) -> None:
        self.config = cfg = config or AllReduceConfig()
        self.members = layout.canonical_group(group)
        if node_id not in self.members:
            raise ConfigError("this node is not in the all-reduce group")
        if not (isinstance(tensor, np.ndarray) and tensor.dtype == np.float32 and tensor.ndim == 1
                and tensor.flags.c_contiguous and tensor.size >= 1):
            raise ConfigError("all-reduce tensor must be a non-empty 1-D C-contiguous float32 array")
        self.round_id = layout.round_id(self.members, key)
        self._n, self._me = len(self.members), self.members.index(node_id)
        self._index = {m: i for i, m in enumerate(self.members)}
        self._sizes = layout.slice_sizes(tensor.size, layout.weights_for(self.members, weights))
        self._offsets = layout.offsets_of(self._sizes)
        self._nonempty = tuple(s for s, k in enumerate(self._sizes) if k)
        self._layout = layout.layout_digest(tensor.size, self._sizes, cfg.chunk_elements, codec_name)
        if out is not None and not (isinstance(out, np.ndarray) and out.dtype == np.float32
                                    and out.shape == tensor.shape and out.flags.c_contiguous
                                    and out.flags.writeable):
            raise ConfigError("all-reduce out must be a writable C-contiguous float32 array like tensor")
        self._out = out
        self._tensor: Floats = tensor.view()
        self._tensor.flags.writeable = False
        self.state = RoundState.REDUCE_SCATTER
        self._now = now
        #: Passes of the steps (or drains) one input may take before it is a bug (no fixpoint).
        self._max_passes = 16 + 4 * self._n * (cfg.max_epochs + 1)
        self._failed: dict[int, DropReason] = {}
        self._quiet: set[int] = set()
        self._begun: dict[int, float] = {self._me: now}
        self._store = SliceStore(self._sizes, cfg.chunk_elements)
        self._bad = self._store.bad
        self._commit: ArCommit | None = None
        self._reports: dict[int, ArReport] = {}
        self._sent_report: tuple[int, ArReport] | None = None
        self._report_forced = self._decide_forced = self._takeover = self._extending = False
        self._patient = True
        self._leader = 0
        self._control: deque[RoundSend] = deque()
        order = tuple(self.members[i] for i in layout.ring_order(self._n, self._me))
        self._outbox = Outbox(round_id=self.round_id, order=order, window_bytes=cfg.window_bytes,
                              chunk_elements=cfg.chunk_elements)
        self._events: deque[Event] = deque()
        self._result: AllReduceResult | None = None
        self._assembly: list[tuple[Floats, SliceBuffer]] = []
        self.error: AllReduceError | None = None
        self.epilogue: Epilogue | None = None
        """Once FINISHED after a commit: what answers late askers (keep it past the round)."""
        self._early: SliceBuffer | None = None
        if cfg.early_averages and self._n > 1 and self._sizes[self._me]:
            self._early = self._store.start_early(self._me, owner=self._me)
        self._own_contribution(self._me)
        self._deadlines: dict[Deadline, float] = {Deadline.ROUND: now + cfg.round_timeout}
        if self._n == 1:
            self._finish()
            return
        self._deadlines.update({Deadline.JOIN: now + cfg.join_timeout, Deadline.REPORT: now + cfg.part_timeout})
        self._set_leader_deadlines(now + cfg.part_timeout + cfg.report_grace)
        begin = ArBegin(round_id=self.round_id, numel=tensor.size, layout=self._layout)
        for m in layout.ring_order(self._n, self._me):
            self._send(m, begin)

    # ------------------------------------------------------------------ public API

    @property
    def active(self) -> bool:
        return self.state in (RoundState.REDUCE_SCATTER, RoundState.ALL_GATHER)

    @property
    def epoch(self) -> int:
        return self._commit.epoch if self._commit else 0

    @property
    def leader(self) -> bytes:
        return self.members[self._leader]

    def on_message(self, src: bytes, msg: Message, *, now: float) -> None:
        """A control message from member ``src`` (the authenticated peer of its connection).

        A FINISHED round still answers a member asking late (a report, commit or takeover)
        with the AR_FINISH it may have missed (``epilogue``)."""
        if not isinstance(msg, ALLREDUCE_CONTROL_TYPES):
            if isinstance(msg, ALLREDUCE_TENSOR_TYPES):
                raise LocalProtocolError("tensor messages go to on_tensor() with their decoded values")
            return
        i = self._index.get(src)
        if i is None or i == self._me or msg.round_id != self.round_id:
            return
        if not self.active:
            late = self.epilogue.answer(src, msg) if self.epilogue is not None else None
            if late is not None:
                self._send(i, late)
            return
        try:
            _ON_CONTROL[type(msg)](self, i, msg, now)
        except RemoteProtocolError as exc:
            self._mark_failed(i, DropReason.PROTOCOL_ERROR, detail=str(exc))
        self._advance(now)

    def on_tensor(self, src: bytes, msg: ArPart | ArAverage, values: Floats, *, now: float) -> None:
        """An AR_PART / AR_AVERAGE from ``src`` with ``values = decode_chunk(msg.data)``."""
        if not isinstance(values, np.ndarray) or values.dtype != np.float32 or values.ndim != 1:
            raise LocalProtocolError("on_tensor needs the decoded 1-D float32 values")
        i = self._index.get(src)
        if i is None or i == self._me or not self.active or msg.round_id != self.round_id:
            return
        if i in self._failed:
            return
        try:
            _ON_TENSOR[type(msg)](self, i, msg, values)
        except RemoteProtocolError as exc:
            self._mark_failed(i, DropReason.PROTOCOL_ERROR, detail=str(exc))
        self._advance(now)

    def on_sent(self, dest: bytes, nbytes: int, *, now: float) -> None:
        """An ``OutgoingChunk`` of ``nbytes`` to ``dest`` was written: it leaves the window."""
        self._now = now
        self._outbox.on_sent(dest, nbytes)

    def peer_failed(self, node: bytes, *, now: float, reason: DropReason = DropReason.DIED,
                    detail: str = "") -> None:
        """The transport or membership says ``node`` is gone (connection lost, SWIM dead), or
        (``reason=PROTOCOL_ERROR``) the adapter found its data undecodable."""
        i = self._index.get(node)
        if i is not None and self.active:
            self._mark_failed(i, reason, detail=detail)
            self._advance(now)

    def cancel(self, *, now: float) -> None:
        """Leave the round now; the others drop this member at once (AR_CANCEL)."""
        if not self.active:
            return
        self._broadcast(ArCancel(round_id=self.round_id))
        self._fail("cancelled", DropReason.CANCELLED)

    def handle_timer(self, *, now: float) -> None:
        for which, at in sorted(self._deadlines.items(), key=lambda kv: kv[1]):
            if at > now or not self.active or self._deadlines.get(which) != at:
                continue  # not due, the round ended, or an earlier one moved it
            del self._deadlines[which]
            _ON_DEADLINE[which](self, now)
        self._advance(now)

    def next_deadline(self) -> float | None:
        return min(self._deadlines.values()) if self.active and self._deadlines else None

    def messages_to_send(self) -> list[RoundSend]:
        """Drain: control messages, then every tensor chunk the windows allow (computing
        averages chunk by chunk as they go out), then what that progress caused."""
        out: list[RoundSend] = []
        for _ in range(self._max_passes):
            out.extend(self._control)
            self._control.clear()
            if not self.active:
                return out
            chunks = self._outbox.drain()
            if not chunks:
                return out
            out.extend(chunks)
            self._advance(self._now)  # computing those chunks may have completed an average
        raise RuntimeError(f"all-reduce round {self.round_id.hex()[:12]}: outputs do not settle (a bug)")

    def next_event(self, *, assemble: bool = True) -> Event | None:
        """Drain one event. A ``RoundFinished`` result's average is filled in here, unless
        ``assemble`` is false: then call ``assemble()`` (e.g. in a worker thread, after the
        leader's AR_FINISH went out) before reading it."""
        event = self._events.popleft() if self._events else None
        if assemble and isinstance(event, RoundFinished):
            self.assemble()
        return event

    @property
    def result(self) -> AllReduceResult | None:
        """The result once FINISHED (its average assembled on first access)."""
        self.assemble()
        return self._result

    def assemble(self) -> None:
        """Copy the averages into the result (once; a 100 MB copy for a 25M tensor). Touches
        nothing but the result and the averages it holds, so a worker thread may run it."""
        parts, self._assembly = self._assembly, []
        for out, buf in parts:
            buf.copy_into(out)

    # ------------------------------------------------------------------ inputs (``_ON_CONTROL``)

    def _on_begin(self, i: int, msg: ArBegin, now: float) -> None:
        if msg.numel != self._tensor.size or msg.layout != self._layout:
            self._mark_failed(i, DropReason.MISMATCH, detail="different tensor size or layout")
            return
        if i in self._failed or i in self._begun:
            return
        self._begun[i] = now
        if self.state is RoundState.REDUCE_SCATTER:
            self._outbox.add(self.members[i], self._part_job(i))
            if self._early is not None:
                early = self._early
                self._outbox.add(self.members[i], Job(
                    TensorKind.AVERAGE, 0, self._me, self._offsets[self._me], early.values,
                    ready=lambda index: bool(early.got[index])))
            if self._leader in (i, self._me):  # the leader decides relative to the latest start
                self._set_leader_deadlines(now + self.config.part_timeout + self.config.report_grace)

    def _on_report(self, i: int, rep: ArReport, now: float) -> None:
        check_report(rep, self._n)
        self._reports[i] = rep
        for ex in rep.exclusions:
            if ex.reason in _EXPLICIT and ex.member != i:
                self._mark_failed(ex.member, ex.reason, detail=f"reported by {i}")
        if self._commit and self._leader == self._me and rep.epoch < self._commit.epoch:
            self._send(i, self._commit)

    def _on_commit(self, i: int, c: ArCommit, now: float) -> None:
        check_commit(c, self._n)
        mine = self._ballot()
        if (c.epoch, c.leader) < mine and self._commit is not None:
            self._send(i, self._commit)
        elif (c.epoch, c.leader) > mine:
            self._accept_commit(c, now)

    def _on_finish(self, i: int, f: ArFinish, now: float) -> None:
        if not f.aborted and f.epoch < 1:
            raise RemoteProtocolError("AR_FINISH of epoch 0 must be an abort")
        ballot, mine = (f.epoch, f.leader), self._ballot()
        if f.aborted:
            if ballot >= mine:
                self._fail("the leader aborted the round", None)
        elif ballot == mine and self._done():
            self._finish()
        elif ballot >= mine:
            self._fail("the round finished without this member", DropReason.STALLED)

    def _on_cancel(self, i: int, msg: ArCancel, now: float) -> None:
        self._mark_failed(i, DropReason.CANCELLED)

    def _on_takeover(self, i: int, t: ArTakeover, now: float) -> None:
        if t.leader != i:
            raise RemoteProtocolError("AR_TAKEOVER must name its sender as leader")
        candidates = self._commit.receivers if self._commit else range(self._n)
        if i in self._failed or i not in candidates or i > self._me:
            return  # it failed us, or is not a member we follow: its commits will tell
        for m in candidates:
            if m < i:
                self._mark_failed(m, DropReason.STALLED, detail=f"superseded by leader {i}")
        if self._commit and self._commit.epoch > t.epoch:
            self._send(i, self._commit)
        self._sent_report = None

    # ------------------------------------------------------------------ inputs (``_ON_TENSOR``)

    def _on_part(self, i: int, msg: ArPart, values: Floats) -> None:
        self._store.put_part(i, msg.slice, msg.chunk, values)
        if msg.slice == self._me and self._early is not None:
            self._early_chunk(msg.chunk)

    def _on_average(self, i: int, msg: ArAverage, values: Floats) -> None:
        if msg.epoch == 0 and msg.slice != i:
            raise RemoteProtocolError(f"an early AR_AVERAGE of slice {msg.slice} from member {i}")
        owner = self._commit.owners[msg.slice] if self._commit and msg.slice < self._n else None
        self._store.put_average(i, msg.epoch, msg.slice, msg.chunk, values, committed_owner=owner)

    # ------------------------------------------------------------------ deadlines (``_ON_DEADLINE``)

    def _round_over(self, now: float) -> None:
        self._fail(f"round timed out after {self.config.round_timeout} s", None)

    def _join_over(self, now: float) -> None:
        for m in range(self._n):
            if m not in self._begun and m not in self._failed:
                self._quiet.add(m)
                self._mark_failed(m, DropReason.STALLED, detail="no AR_BEGIN")

    def _report_due(self, now: float) -> None:
        self._report_forced = True

    def _decide_due(self, now: float) -> None:
        if self._leader == self._me:
            self._decide_forced, self._extending = True, False

    def _leader_silent(self, now: float) -> None:
        if self._leader != self._me:
            self._quiet.add(self._leader)
            self._mark_failed(self._leader, DropReason.STALLED, detail="leader silent")

    # ------------------------------------------------------------------ progress

    def _advance(self, now: float) -> None:
        """Run every consequence of the last input: the steps, pass after pass, until a pass
        changes nothing (each step says whether it changed what the others look at)."""
        self._now = now
        for _ in range(self._max_passes):
            if not self.active:
                return
            changed = self._update_leader(now)
            changed |= self._reduce_owned()
            changed |= self._maybe_report()
            changed |= self._leader_step(now)
            if not changed:
                return
        raise RuntimeError(f"all-reduce round {self.round_id.hex()[:12]}: no fixpoint (a bug)")

    def _update_leader(self, now: float) -> bool:
        candidates = self._commit.receivers if self._commit else range(self._n)
        new = next(m for m in candidates if m not in self._failed)
        if new == self._leader:
            return False
        self._leader = new
        cfg = self.config
        if new == self._me:
            self._takeover = True
            self._broadcast(ArTakeover(round_id=self.round_id, epoch=self.epoch, leader=self._me))
            self._deadlines[Deadline.DECIDE] = max(self._deadlines.get(Deadline.DECIDE, now),
                                                   now + cfg.report_grace)
        else:
            self._sent_report = None
            self._deadlines[Deadline.SUSPECT] = max(
                self._deadlines.get(Deadline.SUSPECT, now),
                now + cfg.report_grace + self._extension + cfg.leader_timeout)
        return True

    def _reduce_owned(self) -> bool:
        """Start the average of every slice we own under the commit whose contributions are
        all in (streamed to every receiver, computed chunk by chunk as it goes out)."""
        c = self._commit
        if c is None:
            return False
        changed = False
        for s in self._nonempty:
            if c.owners[s] != self._me:
                continue
            if self._avg_valid(s, computing=True):
                if self._store.averages.get(s) is self._early:
                    changed |= self._early_rest()
                continue
            parts = self._store.complete_from(s, c.contributors)
            if parts is None:
                continue
            avg = self._store.start_average(s, parts, epoch=c.epoch, owner=self._me)
            receivers = [r for r in c.receivers if r != self._me and r not in self._failed]

            def prepare(index: int, avg: SliceBuffer = avg) -> None:
                if not avg.complete:
                    avg.ensure(index)

            for r in receivers:
                job = Job(TensorKind.AVERAGE, c.epoch, s, self._offsets[s], avg.values, prepare=prepare)
                self._outbox.add(self.members[r], job)
            if not receivers:
                avg.ensure_all()
            changed = True
        return changed

    def _maybe_report(self) -> bool:
        """Report to the leader when our report is final or due and differs from the last one."""
        if not (self._report_forced or self._status_final()):
            return False
        rep = self._report()
        if self._sent_report == (self._leader, rep):
            return False
        self._sent_report = (self._leader, rep)
        if self._leader == self._me:
            self._reports[self._me] = rep
            return True  # the leader step reads it
        self._send(self._leader, rep)
        return False

    def _leader_step(self, now: float) -> bool:
        """As leader, decide on what we know (``decide`` is pure: same knowledge, same answer)."""
        if self._leader != self._me or not self.active:
            return False
        reports = dict(self._reports)
        if self._decide_forced or self._report_forced or self._status_final():
            reports[self._me] = self._report()
        else:
            reports.pop(self._me, None)
        view = LeaderView(round_id=self.round_id, n=self._n, me=self._me, sizes=self._sizes,
                          commit=self._commit, failed=self._failed, reports=reports,
                          forced=self._decide_forced, quiet=frozenset(self._quiet),
                          takeover=self._takeover, patient=self._patient, extending=self._extending,
                          outlier_factor=self.config.outlier_factor, max_epochs=self.config.max_epochs)
        d = decide(view)
        if d.kind is DecisionKind.EXTEND:
            self._patient, self._extending = False, True
            self._deadlines[Deadline.DECIDE] = now + self._extension
            return True
        if d.kind is DecisionKind.WAIT or d.message is None:
            return False
        if d.kind is DecisionKind.FINISH and not self._done():
            return False  # unreachable: a finish needs every reporter done, this leader included
        self._broadcast(d.message)
        if isinstance(d.message, ArCommit):
            self._accept_commit(d.message, now)
        elif d.kind is DecisionKind.FINISH:
            self._finish()
        else:
            self._fail(f"round aborted: {d.detail}", None)
        return True

    def _accept_commit(self, c: ArCommit, now: float) -> None:
        self._commit = c
        why = {e.member: e.reason for e in c.dropped}
        if self._me not in c.receivers:
            self._fail("dropped from the round by the leader", why.get(self._me, DropReason.STALLED))
            return
        for m in range(self._n):
            if m not in c.receivers:
                self._mark_failed(m, why.get(m, DropReason.STALLED), detail=f"dropped at epoch {c.epoch}")
        receivers = set(c.receivers)
        self._outbox.cancel(lambda dest, job: job.kind is TensorKind.AVERAGE
                            and self._index[dest] in receivers and self._avg_valid(job.slice, computing=True)
                            and c.owners[job.slice] == self._me)
        for r in c.resend:
            owner = c.owners[r.slice]
            if self._me in r.senders and owner != self._me:
                self._outbox.add(self.members[owner], self._part_job(r.slice))
        for s in self._nonempty:
            if c.owners[s] == self._me:
                self._own_contribution(s)
        self.state = RoundState.ALL_GATHER
        self._report_forced = self._decide_forced = self._takeover = self._extending = False
        self._patient = True
        cfg = self.config
        self._deadlines[Deadline.REPORT] = now + cfg.gather_timeout
        self._set_leader_deadlines(now + cfg.gather_timeout + cfg.report_grace, reset=True)

    # ------------------------------------------------------------------ state queries

    def _ballot(self) -> tuple[int, int]:
        return (self._commit.epoch, self._commit.leader) if self._commit else (0, -1)

    def _avg_valid(self, s: int, *, computing: bool = False) -> bool:
        """Whether our average of slice ``s`` holds under the commit (complete, or with
        ``computing``, being computed here)."""
        c, buf = self._commit, self._store.averages.get(s)
        return (c is not None and buf is not None and buf.owner == c.owners[s]
                and (buf.complete or (computing and buf.owner == self._me))
                and c.contributors_since <= buf.epoch <= c.epoch)

    def _done(self) -> bool:
        return all(self._avg_valid(s) for s in self._nonempty)

    def _status_final(self) -> bool:
        """Whether this member's report would be final: complete, done, or blocked."""
        c = self._commit
        if c is None:
            have = self._store.contrib.get(self._me, {})
            return not self._sizes[self._me] or all(
                m in self._failed or m in self._bad or (m in have and have[m].complete)
                for m in range(self._n))
        if self._done():
            return True
        gone = self._failed.keys() | self._bad.keys()
        for s in self._nonempty:
            if self._avg_valid(s):
                continue
            if c.owners[s] in self._failed or (c.owners[s] == self._me and gone & set(c.contributors)):
                return True
        return False

    def _report(self) -> ArReport:
        excl = {**self._bad, **self._failed}
        return ArReport(
            round_id=self.round_id, epoch=self.epoch, leader=self._leader,
            holdings=self._store.holdings(),
            averages=tuple(s for s in self._nonempty if self._avg_valid(s)),
            exclusions=tuple(Exclusion(member=m, reason=r) for m, r in sorted(excl.items())),
            timed_out=self._report_forced)

    # ------------------------------------------------------------------ helpers

    def _part_job(self, s: int) -> Job:
        lo = self._offsets[s]
        return Job(TensorKind.PART, 0, s, lo, self._tensor[lo:lo + self._sizes[s]])

    def _early_chunk(self, index: int) -> bool:
        """Average chunk ``index`` of our slice early, if every member's part of it is in."""
        early = self._early
        if early is None or early.got[index] or self._store.averages.get(self._me) is not early:
            return False
        chunks = self._store.chunk_from(self._me, index, range(self._n))
        if chunks is None:
            return False
        early.put_mean(index, chunks)
        return True  # a ready chunk for the outbox; our own average may be whole

    def _early_rest(self) -> bool:
        """A commit kept our early average: compute what arrival order left out (if any)."""
        early, changed = self._early, False
        if early is not None and not early.complete:
            for index in range(len(early.got)):
                changed |= self._early_chunk(index)
        return changed

    def _own_contribution(self, s: int) -> None:
        lo = self._offsets[s]
        self._store.put_own(self._me, s, self._tensor[lo:lo + self._sizes[s]])

    @property
    def _extension(self) -> float:
        """How much longer a leader missing reports at its deadline waits (once per epoch)."""
        return self.config.report_grace + self.config.leader_timeout

    def _set_leader_deadlines(self, decide_at: float, *, reset: bool = False) -> None:
        cur = self._deadlines.get(Deadline.DECIDE)
        at = decide_at if reset or cur is None else max(cur, decide_at)
        self._deadlines[Deadline.DECIDE] = at
        self._deadlines[Deadline.SUSPECT] = at + self._extension + self.config.leader_timeout

    def _mark_failed(self, m: int, reason: DropReason, *, detail: str = "") -> None:
        if m == self._me or m in self._failed:
            return
        self._failed[m] = reason
        dest = self.members[m]
        self._outbox.cancel(lambda d, _job: d != dest)
        self._events.append(PeerDropped(dest, reason, detail))

    def _send(self, m: int, msg: Message) -> None:
        self._control.append(Send(dest=self.members[m], channel=Channel.CONTROL, message=msg))

    def _broadcast(self, msg: Message) -> None:
        for m in layout.ring_order(self._n, self._me):
            if self._failed.get(m) not in _EXPLICIT:
                self._send(m, msg)

    def _finish(self) -> None:
        c = self._commit
        dropped: tuple[Exclusion, ...] = ()
        if c is None:  # a group of one
            average, epoch, contributors = self._tensor.copy(), 0, tuple(range(self._n))
            if self._out is not None:
                np.copyto(self._out, average)
                average = self._out
        else:
            average = np.empty_like(self._tensor) if self._out is None else self._out
            epoch, contributors, dropped = c.epoch, c.contributors, c.dropped
            self._assembly = [(average[self._offsets[s]:self._offsets[s] + self._sizes[s]], self._store.averages[s])
                              for s in self._nonempty]  # filled by ``assemble``: AR_FINISH goes out first
            finish = ArFinish(round_id=self.round_id, epoch=c.epoch, leader=c.leader)
            self.epilogue = Epilogue(finish, self.members, self.members[self._me])
        self._result = AllReduceResult(
            round_id=self.round_id, average=average, epoch=epoch,
            contributors=tuple(self.members[m] for m in contributors), contributed=self._me in contributors,
            dropped={self.members[e.member]: e.reason for e in dropped})
        self._end(RoundState.FINISHED)
        self._events.append(RoundFinished(self._result))

    def _fail(self, msg: str, reason: DropReason | None) -> None:
        self.error = AllReduceError(msg, reason=reason)
        self._end(RoundState.FAILED)
        self._events.append(RoundFailed(self.error))

    def _end(self, state: RoundState) -> None:
        self.state = state
        self._outbox.clear()
        self._store.clear()
        self._deadlines.clear()


#: Message type -> its handler (``on_message`` / ``on_tensor``); deadline -> what it ends.
_ON_CONTROL: dict[type[Message], Callable[[AllReduceRound, int, Any, float], None]] = {
    ArBegin: AllReduceRound._on_begin,
    ArReport: AllReduceRound._on_report,
    ArCommit: AllReduceRound._on_commit,
    ArFinish: AllReduceRound._on_finish,
    ArCancel: AllReduceRound._on_cancel,
    ArTakeover: AllReduceRound._on_takeover,
}
_ON_TENSOR: dict[type[Message], Callable[[AllReduceRound, int, Any, Floats], None]] = {
    ArPart: AllReduceRound._on_part,
    ArAverage: AllReduceRound._on_average,
}
_ON_DEADLINE: dict[Deadline, Callable[[AllReduceRound, float], None]] = {
    Deadline.ROUND: AllReduceRound._round_over,
    Deadline.JOIN: AllReduceRound._join_over,
    Deadline.REPORT: AllReduceRound._report_due,
    Deadline.DECIDE: AllReduceRound._decide_due,
    Deadline.SUSPECT: AllReduceRound._leader_silent,
}
if (set(_ON_CONTROL) != set(ALLREDUCE_CONTROL_TYPES) or set(_ON_TENSOR) != set(ALLREDUCE_TENSOR_TYPES)
        or set(_ON_DEADLINE) != set(Deadline)):
    raise RuntimeError("an all-reduce message type or deadline has no handler")
