"""SWIM failure detection and gossip with the Lifeguard refinements, sans I/O.

Theory of operation
-------------------
``Swim`` is one member of a mesh. It never touches a socket or a clock: the runtime feeds
it messages (``on_message``), transport hints (``on_unreachable``) and time
(``handle_timer(now=)``), drains ``messages_to_send()`` and ``next_event()``, and arms a
single timer at ``next_deadline()``. Destinations are "host:port" addresses.

Failure detector (SWIM section 3, memberlist state.go ``probeNode``). Every probe period
(``probe_interval`` times the Lifeguard local health multiplier) one member is probed,
round robin over a shuffled list (new members are inserted at a random place; the list is
reshuffled at each wrap). A probe is a ``Ping``; with no ``Ack`` after ``probe_timeout``
we send ``PingReq`` to ``indirect_checks`` random alive members, who ping the target for
us and relay its ``Ack`` or answer ``Nack`` (Lifeguard) when it stays silent. If no ack
arrives by the end of the period the target is *suspected*. A suspect target also gets
its ``Suspect`` with the ping (Lifeguard "buddy system"), so it can refute at once.

Suspicion, refutation, death: see ``discovery/state.py`` (transitions) and
``discovery/suspicion.py`` (Lifeguard timer shrinking with independent confirmations).

Local health (Lifeguard LHA-Probe, memberlist awareness.go): a score in
``[0, awareness_max - 1]``; +1 per failed probe (or per missing nack when nacks were
expected), +1 per refutation of a claim about us, -1 per successful probe. The probe
period is multiplied by ``score + 1``, so a node that is itself slow probes less and
accuses less.

Dissemination (SWIM section 4.1): state changes are queued in a transmit-limited
``BroadcastQueue`` and piggybacked, up to ``max_piggyback`` per message, on every Ping,
Ack, PingReq and Nack we send; a gossip round sends queued news to ``gossip_nodes`` random
members (dead ones too for ``gossip_to_dead`` seconds) every ``gossip_interval`` while
the queue is not empty. The gossip timer is not armed while the queue is empty, so news
reaching an idle node goes out at once, then at most one round per interval (memberlist
ticks regardless: here a quiet mesh relays fresh news at network speed).

Anti-entropy: every ``push_pull_interval`` (stretched linearly above
``push_pull_scale_threshold`` confirmed members, so sync bytes per node stay flat) a full
``PushPull`` with one random alive member (in a share ``push_pull_confirmed_share`` of
the rounds, one we heard from directly), and one with a random confirmed member we believe
DEAD (Serf's reconnect: a healed partition finds itself again); the answer has ``reply`` set.
A table larger than one message allows (``MAX_SYNC_BYTES`` encoded,
``MAX_MEMBERS_PER_SYNC`` entries) goes in several parts, cut by encoded size; every part
after the first has ``reply`` set, so only the first is answered.
Joining is the same exchange with the seeds (``join`` set, and kept set on the answer:
only ``join and reply`` ends a join), retried every ``join_retry_interval`` while no seed
answers (``SEED_UNREACHABLE``). ``join_sync_after`` seconds later we *pull* once more
from the seed that answered (a PushPull carrying only our own entry; retried), which
catches members that joined elsewhere meanwhile. Alive entries a sync teaches us are
re-gossiped only when they are few (``<= max_piggyback``): a joiner must not flood the
mesh with its whole new member list (memberlist's mergeState re-gossips all).

Stale claims: a Suspect/Dead about an incarnation of ours we already refuted is answered
with our current Alive, sent straight back to whoever handed it to us and queued for
gossip again (someone missed our refutation and would otherwise declare us dead alone).

Incarnation bounds (``discovery/incarnation.py``): our incarnation saturates at
``MAX_INCARNATION`` and a claim about us far above it is refused (``implausible_claims_total``),
so no claim can overflow it or make us persist what a restart would reject.

Leaving: ``leave()`` marks us LEFT and broadcasts ``Dead(node=us, sender=us)`` at once;
after it we stop probing and syncing but keep answering pings and gossiping.

Unconfirmed members (fake-member floods): a member is *confirmed* once a message from it
arrives (``src == node``). A member only heard of second hand may not exist: a failed probe
of it does not raise our local health, a helper never heard from is not expected to nack,
our own Suspect/Dead about it is not gossiped (it dies here, quietly), a failed dial to it
is no probe hint, and once dead it is neither a gossip-to-the-dead nor a reconnect target.
Such members can outnumber the real ones, so three things do not rely on random gossip
targets alone: a gossip round that carries urgent news (a suspicion, death or refutation)
and picked nobody confirmed adds one confirmed target; a Suspect we accept about a confirmed
member (or start by our own probe) is also sent to that member itself, so it refutes even if
the gossip misses it; and our refutation goes straight to whoever handed us the claim and to
its accuser, whose suspicion timer runs out first; a restarted member (incarnation > 0)
announcing itself in a sync is spread as urgent news. None of this happens in a quiet mesh, so
honest joins are unchanged (``python -m simulations gossip`` gives the same rounds).
Floods are also bounded where they enter (local policy, ``FloodPolicy``): one sender
introduces at most ``max_new_per_sender`` members unknown to us per ``admission_window``,
through gossip or a sync we did not ask for (a member announcing itself, and the answers to
the syncs we sent, are not counted; ``unknown_members_refused``). And since fakes would
otherwise make most of the table, the push/pull period scales with confirmed members only
and every second sync (``push_pull_confirmed_share``) goes to a confirmed member, drawn
from the confirmed alone: a member someone forgot is learned again within a few sync
periods, whatever the flood.

Transport hints: ``on_unreachable(address)`` (a failed dial or dropped connection) makes
that member the next probe target, and skips the wait for a direct ack when it is the
current one. A hint never declares anything dead by itself.

Observation: ``stats()`` reads the member counts by status, the drop counters of every bounded
queue and the probe / suspicion / refutation counters without changing anything (the node
serves them as Prometheus metrics).
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import ClassVar

from discovery.config import FloodPolicy, SwimConfig
from discovery.events import EventKind, MemberEvent
from discovery.incarnation import MAX_INCARNATION, bumped_incarnation
from discovery.members import Member, MemberView
from discovery.probes import Probe, Relay, relay_timeout
from discovery.state import MemberTable
from protocol.limits import MAX_MEMBERS_PER_SYNC
from protocol.messages.gossip import (
    MAX_SYNC_BYTES,
    PUSH_PULL_FIXED_BYTES,
    Ack,
    Alive,
    Dead,
    MemberStatus,
    Nack,
    NodeMeta,
    Ping,
    PingReq,
    PushPull,
    Suspect,
    split_by_size,
)
from protocol.schema import Message

_log = logging.getLogger("discovery.swim")

ALIVE, SUSPECT = MemberStatus.ALIVE, MemberStatus.SUSPECT
_STATE_NAMES = {status: status.name.lower() for status in MemberStatus}
_SEQ_MOD = 1 << 32
_MAX_SEEDS = 64
_FOLLOW_UP_TRIES = 5


def push_pull_period(config: SwimConfig, n_confirmed: int) -> float:
    """Seconds between periodic syncs: ``push_pull_interval``, stretched linearly above
    ``push_pull_scale_threshold`` members. ``n_confirmed`` counts the live members we heard
    from directly and ourselves: members only heard of (maybe a flood of ids that do not
    exist) cannot stretch it."""
    return config.push_pull_interval * max(1.0, n_confirmed / config.push_pull_scale_threshold)


class Swim:
    """One SWIM member. See the module docstring for the protocol."""

    def __init__(
        self,
        *,
        node_id: bytes,
        address: str,
        meta: NodeMeta,
        config: SwimConfig,
        rng: random.Random,
        now: float,
        incarnation: int = 0,
        flood: FloodPolicy | None = None,
    ) -> None:
        """``incarnation``: where our own incarnation starts, in ``[0, MAX_INCARNATION]``. A
        restarted node passes one more than the last it used (``start_incarnation``), so its
        Alive beats every claim others hold about its last run. ``flood``: the local defences
        against fake-member floods (default ``FloodPolicy()``)."""
        if not 0 <= incarnation <= MAX_INCARNATION:
            raise ValueError(f"incarnation {incarnation} is outside [0, {MAX_INCARNATION}]")
        self._cfg = config
        self._rng = rng
        self._me = Member(
            node_id=node_id, address=address, incarnation=incarnation, meta=meta, status=ALIVE, now=now
        )
        self._outbox: list[tuple[str, Message]] = []
        self.dropped_messages = 0
        """Outgoing messages dropped because ``max_outbox`` was reached between drains."""
        self._probes = 0
        self._probe_failures = 0
        self._indirect_probes = 0
        self._push_pulls = 0
        self._probe_order: list[bytes] = []
        self._probe_index = 0
        self._table = MemberTable(
            me=self._me, config=config, send=self._send, on_added=self._on_added, flood=flood
        )
        self._flood = self._table.flood
        self._probe: Probe | None = None
        self._last_probe_start = now - config.probe_interval
        self._hints: deque[bytes] = deque()
        self._seq = 0
        self._relays: dict[int, Relay] = {}
        self._join_seeds: tuple[str, ...] = ()
        self._join_at: float | None = None
        self._sync_next: str | None = None
        self._sync_tries = 0
        self._confirmed_credit = 0.0
        """Accumulates ``push_pull_confirmed_share`` per sync; a whole one buys a confirmed partner."""
        self._asked: dict[str, float] = {}
        """Addresses we sent a sync that asks for an answer -> until when its answer is
        exempt from the admission bound (``admission_window`` seconds)."""
        # Stagger the periodic timers so that nodes started together do not move in step.
        self._next_probe = now + rng.random() * config.probe_interval
        self._next_gossip = now + rng.random() * config.gossip_interval
        self._next_push_pull = now + (1.0 + rng.random()) * self._push_pull_period()
        self._table.broadcasts.queue(
            node_id, Alive(incarnation=incarnation, node=node_id, address=address, meta=meta)
        )

    # ------------------------------------------------------------ public API

    def join(self, seeds: Sequence[str], *, now: float) -> None:
        """Push/pull our state with every seed; retried until one answers. No seeds: we are first."""
        mine = self._me.address
        self._join_seeds = tuple(dict.fromkeys(s for s in seeds if s != mine))[:_MAX_SEEDS]
        if self._join_seeds:
            self._send_join(now)

    def leave(self, *, now: float) -> None:
        """Leave gracefully: we become LEFT and broadcast ``Dead(node=us, sender=us)`` now."""
        if self._table.left:
            return
        self._table.left = True
        self._probe = None
        self._join_at = None
        me = self._me
        self._table.dead(me.node_id, me.incarnation, me.node_id, now=now)
        self._gossip(now)

    def on_message(self, src_address: str, src_node: bytes, msg: Message, *, now: float) -> None:
        """Handle one message from the authenticated member ``src_node`` reachable at ``src_address``."""
        members = self._table.members
        sender = members.get(src_node)
        if sender is not None and sender is not self._me:
            sender.last_heard = now
            self._table.confirm(sender)  # it spoke to us itself
        handler = self._handlers.get(type(msg))
        if handler is None:
            _log.debug("ignoring %s from %s", type(msg).__name__, src_address)
            return
        handler(self, src_address, src_node, msg, now)
        introduced = members.get(src_node) if sender is None else None
        if introduced is not None:
            self._table.confirm(introduced)  # it introduced itself with this message

    def on_unreachable(self, address: str, *, now: float) -> None:
        """Transport hint: a dial to ``address`` failed or its connection dropped. Probe it soon."""
        for seq, relay in list(self._relays.items()):
            if relay.target_address == address:
                del self._relays[seq]
                if relay.nack:
                    self._send_with_gossip(relay.requester, Nack(seq=relay.seq))
        node = self._table.by_address.get(address)
        m = self._table.members.get(node) if node is not None else None
        if m is None or m is self._me or not m.live or self._table.left:
            return
        probe = self._probe
        if probe is not None and probe.target == m.node_id:
            if not probe.indirect:
                self._send_indirect(probe, now)
            return
        if not m.confirmed:
            return  # a failed dial to a member never heard from is no reason to probe it first
        if m.node_id not in self._hints and len(self._hints) < self._cfg.max_hints:
            self._hints.append(m.node_id)
        if probe is None:
            soonest = self._last_probe_start + self._cfg.probe_interval / 4
            self._next_probe = min(self._next_probe, max(now, soonest))

    def handle_timer(self, *, now: float) -> None:
        """Run everything due at ``now`` (probe phases, gossip, push/pull, suspicion, reaping)."""
        if self._join_at is not None and now >= self._join_at:
            self._table.emit(EventKind.SEED_UNREACHABLE, self._me, now, self._join_seeds)
            self._send_join(now)
        self._probe_timers(now)
        if now >= self._next_gossip:
            self._gossip(now)
            nxt = self._next_gossip + self._cfg.gossip_interval
            self._next_gossip = nxt if nxt > now else now + self._cfg.gossip_interval
        if self._cfg.push_pull_interval > 0 and now >= self._next_push_pull:
            self._next_push_pull = now + self._push_pull_period()
            if not self._table.left:
                self._push_pull(now)
        while self._relays:
            seq, relay = next(iter(self._relays.items()))
            if relay.deadline > now:
                break
            del self._relays[seq]
            if relay.nack:
                self._send_with_gossip(relay.requester, Nack(seq=relay.seq))
        self._table.handle_timer(now)

    def next_deadline(self) -> float | None:
        """The earliest ``now`` at which ``handle_timer`` has something to do."""
        table = self._table
        best = table.next_deadline()
        probe = self._probe
        if probe is not None:
            d = probe.end_at if probe.indirect else probe.timeout_at
        elif not table.left:
            d = self._next_probe
        else:
            d = None
        if d is not None and (best is None or d < best):
            best = d
        if self._join_at is not None and (best is None or self._join_at < best):
            best = self._join_at
        if len(table.broadcasts) and (best is None or self._next_gossip < best):
            best = self._next_gossip
        syncing = self._cfg.push_pull_interval > 0 and not table.left
        if syncing and (best is None or self._next_push_pull < best):
            best = self._next_push_pull
        if self._relays:
            d = next(iter(self._relays.values())).deadline
            if best is None or d < best:
                best = d
        return best

    def messages_to_send(self) -> list[tuple[str, Message]]:
        """Drain the outgoing messages: ``(destination address, message)`` in send order."""
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> MemberEvent | None:
        """Drain one membership event, oldest first; None when there is none."""
        events = self._table.events
        return events.popleft() if events else None

    def members(self) -> list[MemberView]:
        """Everyone we know, ourselves included, sorted by node id."""
        return [self._table.members[k].view() for k in sorted(self._table.members)]

    def member(self, node_id: bytes) -> MemberView | None:
        """One member's view, or None if unknown (or reaped)."""
        m = self._table.members.get(node_id)
        return None if m is None else m.view()

    def update_meta(self, meta: NodeMeta, *, now: float) -> None:
        """Advertise new metadata: bump our incarnation and gossip Alive."""
        me = self._me
        me.meta = meta
        me.incarnation = bumped_incarnation(me.incarnation)
        self._table.broadcasts.queue(
            me.node_id,
            Alive(incarnation=me.incarnation, node=me.node_id, address=me.address, meta=meta),
        )
        self._table.emit(EventKind.UPDATED, me, now)

    def stats(self) -> dict[str, float | dict[str, float]]:
        """Counters and gauges, read without changing anything (names as ``node.metrics``
        serves them, without its prefix): ``members`` by status, ourselves included; the
        ``*_dropped_*`` counters of the outbox (``max_outbox``), the broadcast queue
        (``max_broadcasts``) and the event queue (``max_events``); our probes and what became
        of them; suspicions we started, claims about us we refuted and those we refused as
        implausible (``discovery/incarnation.py``)."""
        table = self._table
        members = dict.fromkeys(_STATE_NAMES.values(), 0.0)
        for m in table.members.values():
            members[_STATE_NAMES[m.status]] += 1
        return {
            "members": members,
            "incarnation": self._me.incarnation,
            "local_health": table.health,
            "gossip_pending_broadcasts": len(table.broadcasts),
            "gossip_dropped_messages_total": self.dropped_messages,
            "gossip_broadcasts_dropped_total": table.broadcasts.dropped,
            "gossip_events_dropped_total": table.events_dropped,
            "probes_total": self._probes,
            "probe_failures_total": self._probe_failures,
            "indirect_probes_total": self._indirect_probes,
            "suspicions_total": table.suspicions,
            "refutations_total": table.refutations,
            "implausible_claims_total": table.claims_refused,
            "push_pull_rounds_total": self._push_pulls,
            "unknown_members_refused_total": self.unknown_members_refused,
        }

    @property
    def node_id(self) -> bytes:
        return self._me.node_id

    @property
    def incarnation(self) -> int:
        return self._me.incarnation

    @property
    def health(self) -> int:
        """Lifeguard local health score; the probe period is multiplied by ``health + 1``."""
        return self._table.health

    @property
    def num_live(self) -> int:
        """Alive + suspect members, ourselves included (the N of the formulas)."""
        return self._table.num_live

    @property
    def joining(self) -> bool:
        """A join is in progress: no seed has answered yet."""
        return self._join_at is not None

    @property
    def join_seeds(self) -> tuple[str, ...]:
        """The seeds of the last ``join()``: deduplicated, our own address left out, at most 64."""
        return self._join_seeds

    @property
    def left(self) -> bool:
        return self._table.left

    @property
    def unknown_members_refused(self) -> int:
        """Members unknown to us that we ignored because their sender had introduced
        ``max_new_per_sender`` others this ``admission_window`` (only grows)."""
        return self._table.unknown_refused

    @property
    def events_dropped(self) -> int:
        """Events dropped so far because ``max_events`` were waiting (only grows): a consumer
        that tracks state from events rebuilds it from ``members()`` when this moved."""
        return self._table.events_dropped

    @property
    def pending_broadcasts(self) -> int:
        """Gossip messages still queued (after ``leave()``: wait for 0 before closing, briefly)."""
        return len(self._table.broadcasts)

    # ------------------------------------------------------------- sending

    def _send(self, address: str, msg: Message) -> None:
        if len(self._outbox) >= self._cfg.max_outbox:
            self.dropped_messages += 1
            return
        self._outbox.append((address, msg))

    def _send_with_gossip(
        self, address: str, msg: Message, *, first: Message | None = None
    ) -> None:
        """Send ``msg`` with piggybacked broadcasts (``first``, if given, goes before them)."""
        self._send(address, msg)
        budget = self._cfg.max_piggyback
        if first is not None:
            self._send(address, first)
            budget -= 1
        if budget > 0:
            for g in self._table.broadcasts.get(budget, n_members=self._table.num_live):
                self._send(address, g)

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % _SEQ_MOD
        return self._seq

    # ---------------------------------------------------------------- probes

    def _on_added(self, node: bytes) -> None:
        """Insert a new member at a random place in the probe order (memberlist)."""
        order = self._probe_order
        order.append(node)
        j = self._rng.randrange(len(order))
        order[j], order[-1] = order[-1], order[j]

    def _next_target(self) -> Member | None:
        members = self._table.members
        while self._hints:
            m = members.get(self._hints.popleft())
            if m is not None and m.live:
                return m
        for _ in range(2):
            order = self._probe_order
            while self._probe_index < len(order):
                m = members.get(order[self._probe_index])
                self._probe_index += 1
                if m is not None and m.live:
                    return m
            # Wrapped: reshuffle the live members (memberlist resetNodes).
            self._probe_order = [k for k in self._table.others if members[k].live]
            self._rng.shuffle(self._probe_order)
            self._probe_index = 0
        return None

    def _probe_timers(self, now: float) -> None:
        probe = self._probe
        # (If the whole period has passed, e.g. we were stalled, asking helpers is pointless.)
        if probe is not None and not probe.indirect and probe.timeout_at <= now < probe.end_at:
            self._send_indirect(probe, now)
        if probe is not None and now >= probe.end_at:
            self._probe_failed(probe, now)
        if self._probe is None and not self._table.left and now >= self._next_probe:
            self._start_probe(now)

    def _start_probe(self, now: float) -> None:
        cfg = self._cfg
        period = cfg.probe_interval * (self._table.health + 1)
        self._next_probe = now + period
        target = self._next_target()
        if target is None:
            return
        self._last_probe_start = now
        self._probes += 1
        seq = self._next_seq()
        self._probe = Probe(
            target=target.node_id, seq=seq, timeout_at=now + cfg.probe_timeout, end_at=now + period
        )
        buddy = None
        if target.status is SUSPECT:  # Lifeguard: tell a suspect, so it can refute
            buddy = Suspect(
                incarnation=target.incarnation, node=target.node_id, sender=self._me.node_id
            )
        self._send_with_gossip(target.address, Ping(seq=seq, target=target.node_id), first=buddy)

    def _send_indirect(self, probe: Probe, now: float) -> None:
        probe.indirect = True
        target = self._table.members.get(probe.target)
        if target is None or not target.live:
            return
        helpers = self._sample(
            self._cfg.indirect_checks, lambda m: m.status is ALIVE and m.node_id != probe.target
        )
        # Only a confirmed helper's missing nack says something about us (Lifeguard).
        probe.expected_nacks = sum(1 for m in helpers if m.confirmed)
        if helpers:
            self._indirect_probes += 1
        for m in helpers:
            req = PingReq(seq=probe.seq, target=probe.target, address=target.address, nack=True)
            self._send_with_gossip(m.address, req)

    def _probe_failed(self, probe: Probe, now: float) -> None:
        self._probe = None
        self._probe_failures += 1
        target = self._table.members.get(probe.target)
        if target is None or not target.confirmed:
            pass  # a member never heard from may not exist: its silence says nothing of us
        elif probe.expected_nacks > 0:
            self._table.adjust_health(max(0, probe.expected_nacks - probe.nacks))
        else:
            self._table.adjust_health(+1)
        if target is not None and target.live:
            _log.debug("probe of %s failed (%d nacks)", probe.target.hex()[:10], probe.nacks)
            was_alive = target.status is ALIVE
            me = self._me.node_id
            self._table.suspect(target.node_id, target.incarnation, me, now=now)
            if was_alive and target.status is SUSPECT and target.confirmed:
                # Lifeguard's buddy system, at once: a member that was only slow or frozen
                # reads this first when it wakes and refutes, instead of waiting for our
                # next probe of it or for the gossip to find it.
                self._send(target.address, Suspect(incarnation=target.incarnation,
                                                   node=target.node_id, sender=me))  # fmt: skip

    def _sample(self, k: int, ok: Callable[[Member], bool]) -> list[Member]:
        """Up to ``k`` distinct random members (not us) satisfying ``ok`` (memberlist kRandomNodes)."""
        if k <= 0:
            return []
        members, others = self._table.members, self._table.others
        n = len(others)
        if n <= 4 * k + 16:
            cands = [m for m in (members[i] for i in others) if ok(m)]
            return self._rng.sample(cands, min(k, len(cands)))
        picked: dict[bytes, Member] = {}
        for _ in range(8 * k + 32):
            m = members[others[self._rng.randrange(n)]]
            if m.node_id not in picked and ok(m):
                picked[m.node_id] = m
                if len(picked) == k:
                    break
        return list(picked.values())

    def _sample_confirmed(self, k: int, ok: Callable[[Member], bool]) -> list[Member]:
        """Up to ``k`` distinct random confirmed members satisfying ``ok``. Drawn from the
        confirmed alone (O(confirmed)): rejection sampling over every member misses them
        when a flood of members never heard from outnumbers them."""
        cands = [m for m in self._table.heard.values() if ok(m)]
        return self._rng.sample(cands, min(k, len(cands)))

    # ---------------------------------------------------- gossip and push/pull

    def _gossip(self, now: float) -> None:
        table = self._table
        if not len(table.broadcasts):
            return
        targets = self._sample(self._cfg.gossip_nodes, lambda m: table.gossip_target(m, now))
        if table.broadcasts.has_urgent() and not any(m.confirmed for m in targets):
            # News that starts or stops a timer must reach someone real even when members
            # never heard from (a fake-member flood) outnumber the rest: one more target.
            targets += self._sample_confirmed(
                1, lambda m: table.gossip_target(m, now) and m not in targets
            )
        for m in targets:
            msgs = table.broadcasts.get(self._cfg.max_piggyback, n_members=table.num_live)
            if not msgs:
                break
            for g in msgs:
                self._send(m.address, g)

    def _push_pull_period(self) -> float:
        return push_pull_period(self._cfg, self._table.num_confirmed_live())

    def _push_pull(self, now: float) -> None:
        """One anti-entropy round: a sync with a random alive member (or the join follow-up
        pull), and one with a member we believe dead."""
        self._push_pulls += 1
        if self._sync_next is not None:
            # Right after a join: *pull* from the seed, which knows the most. The seed
            # knows us already, so we send only our own entry; it answers with everything.
            # Retried (at most _FOLLOW_UP_TRIES times) until an answer arrives.
            self._ask(self._sync_next, now)
            self._send(self._sync_next, PushPull(members=(self._me.state(),)))
            self._sync_tries += 1
            if self._sync_tries < _FOLLOW_UP_TRIES:
                self._next_push_pull = now + self._cfg.join_retry_interval
            else:
                self._sync_next = None
        else:
            peers: list[Member] = []
            if self._confirmed_turn():
                # Members never heard from may be a flood of ids that do not exist: a sync
                # with one of them is lost, and the sync is what repairs a forgotten member.
                peers = self._sample_confirmed(1, lambda m: m.status is ALIVE)
            if not peers:
                peers = self._sample(1, lambda m: m.status is ALIVE)
            if peers:
                self._ask(peers[0].address, now)
                self._send_state(peers[0].address, join=False, reply=False)
        # Reconnect (Serf's reconnect_interval): also sync with one member we think is dead,
        # so two sides of a healed partition find each other before the dead are reaped.
        def dead(m: Member) -> bool:
            return m.status is MemberStatus.DEAD and m.confirmed

        gone = self._sample(1, dead) or self._sample_confirmed(1, dead)  # (the scan: floods)
        if gone:
            self._ask(gone[0].address, now)
            self._send_state(gone[0].address, join=False, reply=False)

    def _confirmed_turn(self) -> bool:
        """Whether this round's partner is drawn from the confirmed: a share
        ``push_pull_confirmed_share`` of the rounds, spread evenly (no random draw)."""
        share = self._flood.push_pull_confirmed_share
        self._confirmed_credit += share
        if self._confirmed_credit >= 1.0:
            self._confirmed_credit -= 1.0
            return True
        return False

    def _ask(self, address: str, now: float) -> None:
        """Remember that we asked ``address`` for its table: its answer is admitted whole."""
        asked = self._asked
        if len(asked) >= 2 * _MAX_SEEDS:  # (joins ask <= 64 seeds, a round 2 members)
            for a in [a for a, until in asked.items() if until <= now]:
                del asked[a]
            while len(asked) >= 2 * _MAX_SEEDS:
                del asked[next(iter(asked))]  # the oldest
        asked.pop(address, None)
        asked[address] = now + self._flood.admission_window

    def _send_state(self, address: str, *, join: bool, reply: bool) -> None:
        """Our full member table, in as many PushPull messages as the caps need: each encodes
        to at most ``MAX_SYNC_BYTES`` and carries at most ``MAX_MEMBERS_PER_SYNC`` entries.
        Only the first may ask for an answer; the rest are marked ``reply`` (and keep
        ``join`` only when they are part of the answer to a join)."""
        members = list(self._table.members.values())
        runs = split_by_size(
            [m.state_size() for m in members],
            budget=MAX_SYNC_BYTES - PUSH_PULL_FIXED_BYTES,
            max_items=MAX_MEMBERS_PER_SYNC,
        )
        for i, run in enumerate(runs):
            more = i > 0
            chunk = tuple(members[k].state() for k in run)
            msg = PushPull(join=join and (reply or not more), reply=reply or more, members=chunk)
            self._send(address, msg)

    def _send_join(self, now: float) -> None:
        for seed in self._join_seeds:
            self._ask(seed, now)
            self._send_state(seed, join=True, reply=False)
        self._join_at = now + self._cfg.join_retry_interval

    # -------------------------------------------------------------- handlers

    def _on_ping(self, src_address: str, src_node: bytes, msg: Ping, now: float) -> None:
        if msg.target != self._me.node_id:
            _log.debug("ping for %s reached us; ignored", msg.target.hex()[:10])
            return
        self._send_with_gossip(src_address, Ack(seq=msg.seq))

    def _on_ping_req(self, src_address: str, src_node: bytes, msg: PingReq, now: float) -> None:
        if msg.target == self._me.node_id:
            self._send_with_gossip(src_address, Ack(seq=msg.seq))
            return
        if len(self._relays) >= self._cfg.max_relays:
            return
        seq = self._next_seq()
        self._relays[seq] = Relay(
            requester=src_address,
            seq=msg.seq,
            nack=msg.nack,
            deadline=now + relay_timeout(self._cfg),
            target_address=msg.address,
        )
        self._send_with_gossip(msg.address, Ping(seq=seq, target=msg.target))

    def _on_ack(self, src_address: str, src_node: bytes, msg: Ack, now: float) -> None:
        probe = self._probe
        if probe is not None and msg.seq == probe.seq:
            self._probe = None
            self._table.adjust_health(-1)
            return
        relay = self._relays.pop(msg.seq, None)
        if relay is not None:
            self._send_with_gossip(relay.requester, Ack(seq=relay.seq))

    def _on_nack(self, src_address: str, src_node: bytes, msg: Nack, now: float) -> None:
        probe = self._probe
        if probe is not None and msg.seq == probe.seq:
            probe.nacks += 1

    def _on_alive(self, src_address: str, src_node: bytes, msg: Alive, now: float) -> None:
        self._table.alive(
            msg.node, msg.incarnation, msg.address, msg.meta, now=now, src=src_node, msg=msg,
            admit_from=src_node,
        )

    def _on_suspect(self, src_address: str, src_node: bytes, msg: Suspect, now: float) -> None:
        self._stale_claim_about_us(src_address, msg.node, msg.incarnation)
        inc = self._me.incarnation
        m = self._table.members.get(msg.node)
        was_alive = m is not None and m.status is ALIVE
        self._table.suspect(msg.node, msg.incarnation, msg.sender, now=now, msg=msg)
        self._tell_accuser(src_address, msg.node, msg.sender, inc)
        if was_alive and m is not None and m.status is SUSPECT and m.confirmed:
            # Hand the suspicion to the suspect itself: if it is there, its refutation (or,
            # when it refuted already, its answer to a stale claim) comes straight back to
            # us even when the gossip of it misses us (diluted by members that do not exist).
            self._send(m.address, msg)

    def _on_dead(self, src_address: str, src_node: bytes, msg: Dead, now: float) -> None:
        self._stale_claim_about_us(src_address, msg.node, msg.incarnation)
        inc = self._me.incarnation
        self._table.dead(msg.node, msg.incarnation, msg.sender, now=now, msg=msg)
        self._tell_accuser(src_address, msg.node, msg.sender, inc)

    def _tell_accuser(self, src_address: str, node: bytes, sender: bytes, before: int) -> None:
        """We just refuted a claim about us (our incarnation rose past ``before``): send the
        refutation straight to whoever handed us the claim and to its accuser, whose timer
        runs out first, besides gossiping it (which members never heard from, such as a
        flood of fakes, can dilute)."""
        me = self._me
        if node != me.node_id or me.incarnation == before:
            return
        alive = Alive(incarnation=me.incarnation, node=me.node_id, address=me.address, meta=me.meta)
        self._send(src_address, alive)
        accuser = self._table.members.get(sender)
        if accuser is not None and accuser is not me and accuser.address != src_address:
            self._send(accuser.address, alive)

    def _stale_claim_about_us(self, src_address: str, node: bytes, inc: int) -> None:
        """A Suspect/Dead about an incarnation of ours we already refuted: some members
        missed our refutation (its Alive may have stopped spreading) and would declare us
        dead when their timers run out. Tell the sender directly and gossip it again."""
        me = self._me
        if node == me.node_id and inc < me.incarnation and not self._table.left:
            alive = Alive(
                incarnation=me.incarnation, node=me.node_id, address=me.address, meta=me.meta
            )
            self._send(src_address, alive)
            self._table.broadcasts.queue(me.node_id, alive, urgent=True)

    def _on_push_pull(self, src_address: str, src_node: bytes, msg: PushPull, now: float) -> None:
        if not msg.reply:  # answer; the answer to a join keeps ``join`` set
            self._send_state(src_address, join=msg.join, reply=True)
        elif msg.join and self._join_at is not None:  # a seed answered: we are in
            self._join_at = None
            if self._cfg.join_sync_after > 0:
                self._next_push_pull = min(self._next_push_pull, now + self._cfg.join_sync_after)
                self._sync_next = src_address  # the follow-up sync goes to the same seed
                self._sync_tries = 0
        elif self._sync_next is not None and not msg.join:  # the follow-up was answered
            self._sync_next = None
        table = self._table
        # Members we never heard of count against the sender's admission bound, unless this
        # answers a sync we sent to that address (our join, follow-up or periodic sync).
        asked = self._asked.get(src_address)
        admit_from = None if msg.reply and asked is not None and asked > now else src_node
        # memberlist re-gossips everything a sync taught it. That is right for a few
        # entries (probably news to others too) but a joiner learning a mesh of N would
        # flood everyone with N stale Alives: beyond max_piggyback new entries only the
        # sender's own entry (how a seed spreads its joiner) is re-gossiped.
        news = self._count_news(msg)
        regossip_all = news <= self._cfg.max_piggyback
        for s in msg.members:
            if s.status is ALIVE:
                own = s.node == src_node
                # A restarted member (incarnation > 0) announcing itself is spread as urgent
                # news, so it reaches the members that forgot it through any fake-member flood.
                table.alive(s.node, s.incarnation, s.address, s.meta, now=now,
                            gossip=regossip_all or own, urgent=own and s.incarnation > 0,
                            admit_from=admit_from)  # fmt: skip
            elif s.status is MemberStatus.LEFT:
                table.dead(s.node, s.incarnation, s.node, now=now)
            else:  # memberlist mergeState: a remote "dead" only makes us suspect
                table.suspect(s.node, s.incarnation, src_node, now=now)

    def _count_news(self, msg: PushPull) -> int:
        """How many ALIVE entries of a sync would change our table."""
        members = self._table.members
        news = 0
        for s in msg.members:
            if s.status is ALIVE:
                m = members.get(s.node)
                if m is None or s.incarnation > m.incarnation:
                    news += 1
        return news

    _handlers: ClassVar[dict[type, Callable[..., None]]] = {
        Ping: _on_ping,
        PingReq: _on_ping_req,
        Ack: _on_ack,
        Nack: _on_nack,
        Alive: _on_alive,
        Suspect: _on_suspect,
        Dead: _on_dead,
        PushPull: _on_push_pull,
    }
