"""The member table and its SWIM state transitions (memberlist state.go: aliveNode,
suspectNode, deadNode, refute).

Theory of operation
-------------------
Each member has a status (ALIVE, SUSPECT, DEAD, LEFT) and an *incarnation* that only the
member itself raises. News about a member is ordered by incarnation first (SWIM section
4.2), then by status severity:

=========================  ===========================================================
news about member M        accepted when
=========================  ===========================================================
``Alive(inc)``             ``inc > M.inc`` (any status -> ALIVE; JOINED if it was dead/
                           left, REFUTED if it was suspect, UPDATED if meta changed), or
                           M is unknown (JOINED)
``Suspect(inc, sender)``   M is ALIVE and ``inc >= M.inc`` (-> SUSPECT, a timer starts);
                           if M is already SUSPECT, ``sender`` confirms the timer (Lifeguard)
``Dead(inc, sender)``      M is ALIVE/SUSPECT and ``inc >= M.inc`` (-> DEAD, or LEFT when
                           ``sender == M``, memberlist's rule for a graceful leave)
=========================  ===========================================================

Every accepted piece of news is re-queued for dissemination (``BroadcastQueue``). News
about *ourselves* that is not our current truth (a Suspect or Dead at or above our
incarnation, an Alive claiming something else) is *refuted*: we raise our incarnation
above the accusation and broadcast Alive; Lifeguard also raises our local health score,
because being suspected hints that we are the slow one. After ``leave()`` we refute
nothing. A suspicion timer that fires declares the member DEAD at its current
incarnation. DEAD and LEFT members stay ``dead_reap_after`` seconds, then are REAPED.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from discovery.broadcast import BroadcastQueue
from discovery.config import FloodPolicy, SwimConfig
from discovery.events import EventKind, MemberEvent
from discovery.incarnation import refutation_incarnation
from discovery.members import Member
from discovery.suspicion import Suspicion, expected_confirmations, suspicion_timeout
from protocol.messages.gossip import Alive, Dead, MemberStatus, NodeMeta, Suspect
from protocol.schema import Message

_log = logging.getLogger("discovery.swim")

ALIVE, SUSPECT, DEAD, LEFT = (
    MemberStatus.ALIVE,
    MemberStatus.SUSPECT,
    MemberStatus.DEAD,
    MemberStatus.LEFT,
)

Send = Callable[[str, Message], None]


class MemberTable:
    """All known members (ourselves included) and the transitions between their states."""

    def __init__(
        self,
        *,
        me: Member,
        config: SwimConfig,
        send: Send,
        on_added: Callable[[bytes], None],
        flood: FloodPolicy | None = None,
    ) -> None:
        self.me = me
        self.config = config
        self.flood = flood or FloodPolicy()
        self._send = send
        self._on_added = on_added
        self.members: dict[bytes, Member] = {me.node_id: me}
        self.others: list[bytes] = []
        """Ids of every known member but us, for random choice (kept in sync with ``members``)."""
        self.by_address: dict[str, bytes] = {}
        self.heard: dict[bytes, Member] = {}
        """The confirmed members (a message from them arrived), for choices among them alone:
        they may be a few among many members only heard of (a fake-member flood)."""
        self.broadcasts = BroadcastQueue(
            retransmit_mult=config.retransmit_mult, max_size=config.max_broadcasts
        )
        self.events: deque[MemberEvent] = deque()
        self.events_dropped = 0
        self.num_live = 1
        """Alive + suspect members, ourselves included: the N of every formula."""
        self.suspects: dict[bytes, Member] = {}
        """Members with a running suspicion timer."""
        self.gone: dict[bytes, Member] = {}
        """Dead and left members in the order they died (the first is reaped first)."""
        self.left = False
        """We left the mesh: refute nothing any more."""
        self.health = 0
        """Lifeguard local health score (awareness), in ``[0, awareness_max - 1]``."""
        self.suspicions = 0
        """Suspicions started here (a member went ALIVE -> SUSPECT), by our probes or gossip."""
        self.refutations = 0
        """Claims about us refuted (each raised our incarnation)."""
        self.claims_refused = 0
        """Claims about us refused as implausible (``refutation_incarnation`` is None)."""
        self.unknown_refused = 0
        """Members unknown to us that a sender introduced beyond ``max_new_per_sender``."""
        self._introduced: dict[bytes, int] = {}
        """Members each sender introduced in the current admission window."""
        self._window_end = float("-inf")

    # ----------------------------------------------------------------- helpers

    def emit(
        self, kind: EventKind, member: Member, now: float, seeds: tuple[str, ...] = ()
    ) -> None:
        if len(self.events) >= self.config.max_events:
            self.events.popleft()
            self.events_dropped += 1
        self.events.append(MemberEvent(kind, member.view(), now, seeds))
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("%s %s inc=%d", kind.name, member.node_id.hex()[:10], member.incarnation)

    def adjust_health(self, delta: int) -> None:
        self.health = min(max(self.health + delta, 0), self.config.awareness_max - 1)

    def _set_status(self, m: Member, status: MemberStatus, now: float) -> None:
        if status is m.status:
            return
        was_live = m.live
        m.status = status
        m.state_change = now
        if was_live and not m.live:
            self.num_live -= 1
        elif m.live and not was_live:
            self.num_live += 1
        self.gone.pop(m.node_id, None)
        if not m.live:
            self.gone[m.node_id] = m
        if status is not SUSPECT and m.suspicion is not None:
            m.suspicion = None
            self.suspects.pop(m.node_id, None)

    def admit(self, sender: bytes, now: float) -> bool:
        """Whether ``sender`` may introduce one more member unknown to us now (and count it):
        at most ``max_new_per_sender`` per ``admission_window``. Local policy against a member
        that floods the mesh with node ids that do not exist; refusals are counted."""
        cfg = self.flood
        if cfg.max_new_per_sender == 0:
            return True
        if now >= self._window_end:  # a new window for every sender (the dict stays small)
            self._introduced.clear()
            self._window_end = now + cfg.admission_window
        count = self._introduced.get(sender, 0)
        if count >= cfg.max_new_per_sender:
            self.unknown_refused += 1
            return False
        self._introduced[sender] = count + 1
        return True

    def _add(
        self, node: bytes, inc: int, address: str, meta: NodeMeta, now: float
    ) -> Member | None:
        if len(self.members) >= self.config.max_members:
            _log.warning("member table full (%d); ignoring %s", len(self.members), node.hex()[:10])
            return None
        m = Member(node_id=node, address=address, incarnation=inc, meta=meta, status=ALIVE, now=now)
        self.members[node] = m
        self.others.append(node)
        self.by_address[address] = node
        self.num_live += 1
        self._on_added(node)
        return m

    # -------------------------------------------------------------- transitions

    def alive(
        self,
        node: bytes,
        inc: int,
        address: str,
        meta: NodeMeta,
        *,
        now: float,
        src: bytes | None = None,
        msg: Alive | None = None,
        gossip: bool = True,
        urgent: bool = False,
        admit_from: bytes | None = None,
    ) -> None:
        """Apply ``Alive(inc, node, address, meta)``; ``src`` is who handed it to us and
        ``msg`` the message itself, if it came as one (re-gossiped as is). ``gossip=False``
        applies it without queueing it for dissemination (state learned from a sync);
        ``urgent`` queues it as urgent news even when it is not a refutation. An unknown
        ``node`` introduced by ``admit_from`` (not by itself) counts against that sender's
        admission bound (``admit``) and is ignored beyond it."""
        if node == self.me.node_id:
            self._alive_about_me(inc, address, meta, now)
            return
        m = self.members.get(node)
        if m is None:
            if admit_from is not None and admit_from != node and not self.admit(admit_from, now):
                return
            m = self._add(node, inc, address, meta, now)
            if m is not None:
                if gossip:
                    news = msg or Alive(incarnation=inc, node=node, address=address, meta=meta)
                    self.broadcasts.queue(node, news, urgent=urgent)
                self.emit(EventKind.JOINED, m, now)
            return
        if inc <= m.incarnation:
            if src == node and inc < m.incarnation:
                self._tell_stale(m)
            elif msg is not None and inc == m.incarnation:
                self.broadcasts.heard(node, msg)
            return
        old_status, changed = m.status, (m.meta != meta or m.address != address)
        if m.address != address:
            if self.by_address.get(m.address) == node:
                del self.by_address[m.address]
            self.by_address[address] = node
        m.incarnation, m.address, m.meta = inc, address, meta
        self._set_status(m, ALIVE, now)
        if gossip:
            news = msg or Alive(incarnation=inc, node=node, address=address, meta=meta)
            self.broadcasts.queue(node, news, urgent=urgent or old_status is not ALIVE)
        if old_status is DEAD or old_status is LEFT:
            self.emit(EventKind.JOINED, m, now)
        elif old_status is SUSPECT:
            self.emit(EventKind.REFUTED, m, now)
        elif changed:
            self.emit(EventKind.UPDATED, m, now)

    def _tell_stale(self, m: Member) -> None:
        """A member announced itself with an incarnation below what we know (it restarted):
        tell it our newer view so it refutes it, instead of waiting for a push/pull."""
        node = m.node_id
        msg: Message
        if m.status is ALIVE:
            msg = Alive(incarnation=m.incarnation, node=node, address=m.address, meta=m.meta)
        elif m.status is SUSPECT:
            msg = Suspect(incarnation=m.incarnation, node=node, sender=self.me.node_id)
        else:
            msg = Dead(incarnation=m.incarnation, node=node, sender=self.me.node_id)
        self._send(m.address, msg)

    def _alive_about_me(self, inc: int, address: str, meta: NodeMeta, now: float) -> None:
        me = self.me
        if inc < me.incarnation or self.left:
            return
        if inc == me.incarnation and address == me.address and meta == me.meta:
            return
        self.refute(inc, now)  # someone speaks for us with another version of us

    def suspect(
        self, node: bytes, inc: int, sender: bytes, *, now: float, msg: Suspect | None = None
    ) -> None:
        """Apply ``Suspect(inc, node, sender)`` (``msg``: the message, if it came as one)."""
        m = self.members.get(node)
        if m is None or inc < m.incarnation:
            return
        if m.suspicion is not None:
            if m.suspicion.confirm(sender):  # a new independent suspector: spread it too
                news = msg or Suspect(incarnation=inc, node=node, sender=sender)
                self.broadcasts.queue(node, news, urgent=True)
            elif msg is not None:
                self.broadcasts.heard(node, msg)
            return
        if m.status is not ALIVE:
            return
        if m is self.me:
            if not self.left:
                self.refute(inc, now)
            return
        if msg is not None or self._speaks_of(m, sender):
            news = msg or Suspect(incarnation=inc, node=node, sender=sender)
            self.broadcasts.queue(node, news, urgent=True)
        m.incarnation = inc
        self._set_status(m, SUSPECT, now)
        n = self.num_live
        min_t = suspicion_timeout(self.config.suspicion_mult, n, self.config.probe_interval)
        max_t = self.config.suspicion_max_timeout_mult * min_t
        k = expected_confirmations(self.config.suspicion_mult, n)
        m.suspicion = Suspicion(sender=sender, k=k, min_timeout=min_t, max_timeout=max_t, now=now)
        self.suspects[node] = m
        self.suspicions += 1
        self.emit(EventKind.SUSPECTED, m, now)

    def dead(
        self, node: bytes, inc: int, sender: bytes, *, now: float, msg: Dead | None = None
    ) -> None:
        """Apply ``Dead(inc, node, sender)``; ``sender == node`` means the member left."""
        m = self.members.get(node)
        if m is None or inc < m.incarnation:
            return
        if not m.live:
            if msg is not None:
                self.broadcasts.heard(node, msg)
            return
        if m is self.me and not self.left:
            self.refute(inc, now)
            return
        if msg is not None or self._speaks_of(m, sender):
            self.broadcasts.queue(
                node, msg or Dead(incarnation=inc, node=node, sender=sender), urgent=True
            )
        m.incarnation = inc
        status = LEFT if sender == node else DEAD
        self._set_status(m, status, now)
        self.emit(EventKind.LEFT if status is LEFT else EventKind.DEAD, m, now)

    def _speaks_of(self, m: Member, sender: bytes) -> bool:
        """Whether an accusation of ``m`` that did not come as a message is gossiped: always,
        except our own (``sender`` is us) about a member we never heard from directly. Such a
        member may not exist (fake-member floods): it is suspected and declared dead here
        only, quietly, instead of filling everyone's queues with news nobody can refute."""
        return m.confirmed or m is self.me or sender != self.me.node_id

    def refute(self, accused_inc: int, now: float) -> None:
        """Raise our incarnation above ``accused_inc`` and broadcast Alive (memberlist refute),
        unless the claim is implausible (``refutation_incarnation``): then only count it."""
        me = self.me
        inc = refutation_incarnation(me.incarnation, accused_inc)
        if inc is None:
            self.claims_refused += 1
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug("refused a claim about us at incarnation %d (ours: %d)", accused_inc, me.incarnation)
            return
        me.incarnation = inc
        self.refutations += 1
        self.adjust_health(+1)
        self.broadcasts.queue(
            me.node_id,
            Alive(incarnation=me.incarnation, node=me.node_id, address=me.address, meta=me.meta),
            urgent=True,
        )
        self.emit(EventKind.REFUTED, me, now)

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        best: float | None = None
        for m in self.suspects.values():
            assert m.suspicion is not None
            if best is None or m.suspicion.deadline < best:
                best = m.suspicion.deadline
        if self.gone:
            first = next(iter(self.gone.values()))
            reap_at = first.state_change + self.config.dead_reap_after
            best = reap_at if best is None else min(best, reap_at)
        return best

    def handle_timer(self, now: float) -> None:
        """Fire due suspicion timers (-> DEAD) and reap members dead long enough."""
        due = [
            m
            for m in self.suspects.values()
            if m.suspicion is not None and m.suspicion.deadline <= now
        ]
        for m in due:
            if m.suspicion is not None and m.status is SUSPECT:
                assert m.suspicion is not None
                _log.debug(
                    "suspicion timeout %s after %d confirmations",
                    m.node_id.hex()[:10],
                    m.suspicion.confirmations,
                )
                self.dead(m.node_id, m.incarnation, self.me.node_id, now=now)
        reap_after = self.config.dead_reap_after
        while self.gone:
            m = next(iter(self.gone.values()))
            # The same sum as next_deadline(): ``now - reap_after`` can round differently,
            # and a deadline that never fires is a timer spinning at one instant.
            if m.state_change + reap_after > now:
                break
            self._forget(m, now)

    def _forget(self, m: Member, now: float) -> None:
        node = m.node_id
        del self.gone[node]
        del self.members[node]
        self.heard.pop(node, None)
        self.others.remove(node)
        if self.by_address.get(m.address) == node:
            del self.by_address[m.address]
        self.emit(EventKind.REAPED, m, now)

    # ---------------------------------------------------------------- queries

    def confirm(self, m: Member) -> None:
        """``m`` (not us) sent us a message itself: it exists."""
        if not m.confirmed and m is not self.me:
            m.confirmed = True
            self.heard[m.node_id] = m

    def num_confirmed_live(self) -> int:
        """Live members we heard from directly, ourselves included (O(confirmed))."""
        return 1 + sum(1 for m in self.heard.values() if m.live)

    def gossip_target(self, m: Member, now: float) -> bool:
        """Live members, and the confirmed dead for ``gossip_to_dead`` seconds (so they can
        refute; a member never heard from that died quietly is no target)."""
        return m.live or (m.confirmed and now - m.state_change < self.config.gossip_to_dead)
