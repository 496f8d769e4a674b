"""Who may submit, on a running node: the owner-signed log, kept equal on every member.

``SubmitterService(ctx, owner=...)`` loads ``<data_dir>/submitters.log`` into a
``SubmitterLog`` (``node.submitters.log``; entries that no longer verify, e.g. after the mesh
key file changed owner, are dropped with a warning) and serves:

* anti-entropy on CONTROL links: a ``SubmittersSync`` with our version goes to a member when it
  joins (or refutes a suspicion), to one random live member every ``sync_interval`` seconds,
  and to every live member after a client's update. A SYNC from a member with less than us is
  answered with one ``SubmittersEntries`` page (at most 256 entries); a member with more gets
  our SYNC back, so it pushes to us. A node that applied a page answers with its new SYNC,
  which pulls the next page: catching up is paced one page per round trip, so a long log never
  floods the CONTROL link that SWIM shares. One page in flight per member.
* on CLIENT links: ``SubmittersUpdate`` (apply one owner-signed entry, persist it, spread it;
  reply ok or the reason) and ``SubmittersList`` (owner, version, a page of entries).

Every change is persisted (``node.submitters.store``, one writer at a time on the io pool) and
logged once at INFO. The task service asks ``authorized(key)`` before it runs a submission.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from discovery.events import EventKind, MemberEvent
from node.context import Handlers, NodeContext
from node.core import Stats
from node.submitters.keys import public_key_to_text
from node.submitters.log import SubmitterLog, SubmitterLogError
from node.submitters.store import load_log_entries, log_path, store_log_entries
from node.transport import Link
from protocol.connection import Channel
from protocol.crypto import short_id
from protocol.errors import ConfigError, ErrorCode, RemoteProtocolError, StarmeshError
from protocol.messages.submitters import (
    MAX_ENTRIES_PER_MESSAGE,
    MAX_REPLY_MESSAGE_CHARS,
    SignedEntry,
    SubmitterAction,
    SubmittersEntries,
    SubmittersList,
    SubmittersReply,
    SubmittersSync,
    SubmittersUpdate,
    decode_entry,
)
from protocol.schema import Message
from protocol.tags import MsgType

log = logging.getLogger("starmesh.submitters")

#: Seconds between two anti-entropy syncs with a random live member.
SYNC_INTERVAL_S = 10.0
#: Longest a closing service waits for its last write.
CLOSE_FLUSH_S = 2.0


class SubmitterService:
    """The submitter log of one node (module docstring)."""

    name = "submitters"

    def __init__(self, ctx: NodeContext, *, owner: bytes | None, rng: random.Random | None = None,
                 sync_interval: float = SYNC_INTERVAL_S) -> None:
        self._ctx = ctx
        self._log = SubmitterLog(owner)
        self._rng = rng if rng is not None else random.Random(ctx.node_id)
        self._sync_interval = sync_interval
        self._path = log_path(ctx.data_dir)
        self._closed = asyncio.Event()
        self._paging: set[bytes] = set()
        """Members we are sending a page of entries to (one at a time each)."""
        self._dirty = False
        self._writing = False
        self._written = asyncio.Event()
        """Set while no write is running or due."""
        self._written.set()
        self._reported: set[int] = set()
        self.counters = {"syncs_sent": 0, "pages_sent": 0, "entries_applied": 0,
                         "entries_rejected": 0, "updates": 0, "lists": 0, "persist_failures": 0}
        self._load()

    # ---- the public API (the task service) -----------------------------------------------

    @property
    def owner(self) -> bytes | None:
        """The mesh owner from the key file; None: nobody may submit."""
        return self._log.owner

    @property
    def version(self) -> int:
        return self._log.version

    def authorized(self, key: bytes) -> bool:
        """Whether ``key`` may submit work now: the owner, or granted and not since revoked."""
        return self._log.is_authorized(key)

    def describe(self, key: bytes) -> str:
        """``key`` as people read it (``ed25519:<base64url>``), for errors and logs."""
        return public_key_to_text(key)

    def log_view(self) -> SubmitterLog:
        """The log itself (read it, do not ``apply`` to it: nothing would be persisted)."""
        return self._log

    # ---- Service --------------------------------------------------------------------------

    def handlers(self) -> Handlers:
        return {
            (Channel.CONTROL, MsgType.SUBMITTERS_SYNC): self._on_sync,
            (Channel.CONTROL, MsgType.SUBMITTERS_ENTRIES): self._on_entries,
            (Channel.CLIENT, MsgType.SUBMITTERS_UPDATE): self._on_update,
            (Channel.CLIENT, MsgType.SUBMITTERS_LIST): self._on_list,
        }

    def on_member_event(self, event: MemberEvent) -> None:
        if (event.kind in (EventKind.JOINED, EventKind.REFUTED) and not self._closed.is_set()
                and event.member.node_id != self._ctx.node_id):
            self._ctx.spawn(self._send_sync(event.member.node_id))

    async def start(self) -> None:
        if self._log.owner is None:
            log.warning("the mesh key file names no owner: nobody may submit work to this node; "
                        "run: python -m node mesh-key set-owner MESH_KEY_FILE (then copy the file "
                        "to every node and restart them)")
        self._ctx.spawn(self._sync_loop())

    async def close(self) -> None:
        """Stop syncing; wait (at most ``CLOSE_FLUSH_S``) for the last change to be written."""
        self._closed.set()
        if self._writing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._written.wait(), CLOSE_FLUSH_S)

    def stats(self) -> Stats:
        out: dict[str, float] = dict(self._log.stats())
        out.update({f"submitters_{k}_total": float(v) for k, v in self.counters.items()})
        return out

    # ---- persistence ------------------------------------------------------------------------

    def _load(self) -> None:
        entries, problem = load_log_entries(self._path)
        if problem is not None:
            log.warning("submitters log: %s; keeping the %d entries before it (members send "
                        "the rest)", problem, len(entries))
        for i, entry in enumerate(entries):
            try:
                if not self._log.apply(entry):
                    raise SubmitterLogError(f"entry {i + 1} is out of order")
            except SubmitterLogError as exc:
                log.warning("%s: dropping entries from #%d on: %s", self._path, i + 1, exc)
                self._mark_dirty()
                break
        if self._log.version:
            log.info("submitters log: %d entries, %d keys granted", self._log.version,
                     len(self._log.submitters()))

    def _mark_dirty(self) -> None:
        self._dirty = True
        if not self._writing:
            self._writing = True
            self._written.clear()
            self._ctx.spawn(self._persist())

    async def _persist(self) -> None:
        """Write the log until no change is left unwritten; one writer at a time."""
        loop = asyncio.get_running_loop()
        try:
            while self._dirty:
                self._dirty = False
                snapshot = self._log.entries_after(0, self._log.version)
                try:
                    await loop.run_in_executor(self._ctx.executors.io, store_log_entries,
                                               self._path, snapshot)
                except ConfigError as exc:  # a full disk must not stop the node
                    self.counters["persist_failures"] += 1
                    log.error("%s", exc)
        finally:
            self._writing = False
            self._written.set()

    # ---- applying -----------------------------------------------------------------------

    def _apply(self, entry: SignedEntry, *, source: str) -> bool:
        """Apply one entry; log it once if new. ``SubmitterLogError`` passes through."""
        try:
            changed = self._log.apply(entry)
        except SubmitterLogError:
            self.counters["entries_rejected"] += 1
            raise
        if changed:
            self.counters["entries_applied"] += 1
            body = self._log.entry(self._log.version)
            what = "granted" if body.action is SubmitterAction.GRANT else "revoked"
            name = f" ({body.name})" if body.name else ""
            log.info("submitter %s%s %s (entry #%d, from %s)", public_key_to_text(body.key), name,
                     what, body.seq, source)
            self._mark_dirty()
        return changed

    # ---- anti-entropy -------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        while not self._closed.is_set():
            delay = self._sync_interval * self._rng.uniform(0.8, 1.2)
            try:
                await asyncio.wait_for(self._closed.wait(), delay)
                return
            except TimeoutError:
                pass
            peers = [m.node_id for m in self._ctx.members()
                     if m.node_id != self._ctx.node_id and self._ctx.is_live(m.node_id)]
            if peers:
                await self._send_sync(self._rng.choice(peers))

    def spread(self) -> None:
        """Send our version to every live member now (after a local change)."""
        for m in self._ctx.members():
            if m.node_id != self._ctx.node_id and self._ctx.is_live(m.node_id):
                self._ctx.spawn(self._send_sync(m.node_id))

    async def _send_sync(self, node_id: bytes) -> None:
        self.counters["syncs_sent"] += 1
        try:
            await self._ctx.send(node_id, SubmittersSync(version=self._log.version),
                                 channel=Channel.CONTROL)
        except StarmeshError as exc:
            log.debug("submitters sync to %s failed: %s", short_id(node_id), exc)

    async def _on_sync(self, link: Link, message: Message) -> None:
        assert isinstance(message, SubmittersSync) and link.peer is not None
        peer = link.peer.node_id
        ours = self._log.version
        if message.version < ours:
            if peer in self._paging:
                return
            page = tuple(self._log.entries_after(message.version, MAX_ENTRIES_PER_MESSAGE))
            self._paging.add(peer)
            self._ctx.spawn(self._reply(link, SubmittersEntries(entries=page), peer=peer))
        elif message.version > ours:
            self._ctx.spawn(self._reply(link, SubmittersSync(version=ours)))

    async def _reply(self, link: Link, message: Message, *, peer: bytes | None = None) -> None:
        try:
            await link.send(message)
            if isinstance(message, SubmittersEntries):
                self.counters["pages_sent"] += 1
            else:
                self.counters["syncs_sent"] += 1
        except StarmeshError as exc:
            log.debug("%s: submitters reply failed: %s", link.describe(), exc)
        finally:
            if peer is not None:
                self._paging.discard(peer)

    async def _on_entries(self, link: Link, message: Message) -> None:
        assert isinstance(message, SubmittersEntries) and link.peer is not None
        source = short_id(link.peer.node_id)
        applied = 0
        for entry in message.entries:
            try:
                applied += self._apply(entry, source=source)
            except SubmitterLogError as exc:
                self._report(exc, entry, source)
                break
        if applied:  # pull the next page (the sender has nothing more: it stays quiet)
            self._ctx.spawn(self._reply(link, SubmittersSync(version=self._log.version)))

    def _report(self, exc: SubmitterLogError, entry: SignedEntry, source: str) -> None:
        """Warn once per entry number: a fork or a forged entry is news, its repeats are not."""
        try:
            seq = decode_entry(entry.body).seq
        except RemoteProtocolError:
            seq = 0
        if seq not in self._reported and len(self._reported) < 1024:
            self._reported.add(seq)
            log.warning("submitter entry from %s refused: %s", source, exc)

    # ---- clients --------------------------------------------------------------------------

    async def _on_update(self, link: Link, message: Message) -> None:
        assert isinstance(message, SubmittersUpdate)
        self.counters["updates"] += 1
        ok, text = self._update(message.entry, source=link.describe())
        if ok:
            self.spread()
        self._answer(link, SubmittersReply(req=message.req, ok=ok, message=text[:MAX_REPLY_MESSAGE_CHARS],
                                           owner=self._log.owner, version=self._log.version))

    def _update(self, entry: SignedEntry, *, source: str) -> tuple[bool, str]:
        """(accepted, what to tell the client)."""
        try:
            changed = self._apply(entry, source=f"client {source}")
        except SubmitterLogError as exc:
            return False, str(exc)
        seq = decode_entry(entry.body).seq  # verified by apply
        if changed:
            return True, f"entry #{seq} applied; spreading it to the live members"
        if seq <= self._log.version:
            return True, f"entry #{seq} was already here"
        return False, (f"entry #{seq} does not follow this node's last entry #{self._log.version}; "
                       "list the submitters again and re-sign")

    async def _on_list(self, link: Link, message: Message) -> None:
        assert isinstance(message, SubmittersList)
        self.counters["lists"] += 1
        page = tuple(self._log.entries_after(message.after, MAX_ENTRIES_PER_MESSAGE))
        self._answer(link, SubmittersReply(req=message.req, ok=True, owner=self._log.owner,
                                           version=self._log.version, entries=page))

    def _answer(self, link: Link, reply: SubmittersReply) -> None:
        if not link.send_nowait(reply):  # never wait on a client that does not read its replies
            link.abort(ErrorCode.LIMIT_EXCEEDED, "submitters client is not reading its replies")
