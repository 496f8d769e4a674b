"""SWIM/Lifeguard timing and bounds: one frozen config with named presets.

The names follow HashiCorp memberlist's ``Config`` (``ProbeInterval``, ``SuspicionMult``,
``RetransmitMult`` ...) so its tuning advice carries over. Every duration is in seconds of
the ``now`` clock the runtime feeds the core. Formulas that use these fields live in
``discovery/suspicion.py`` and ``discovery/broadcast.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from protocol.errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class SwimConfig:
    """Timing and bounds of one SWIM member. Build with a preset, vary with ``replace``."""

    probe_interval: float = 1.0
    """Seconds between failure-detector probes (SWIM's protocol period T'). One member is
    probed per interval, round robin over a shuffled list, so every member is probed by
    each peer at least once every ``N * probe_interval``. Scaled by the local health
    multiplier (Lifeguard LHM) while this node itself looks unhealthy."""

    probe_timeout: float = 0.5
    """Seconds to wait for the direct ``Ack`` before asking ``indirect_checks`` peers to
    probe the target for us (``PingReq``). Must be below ``probe_interval``; should be a few
    round-trip times. Not scaled by awareness (memberlist's choice). A helper asked to
    probe indirectly answers ``Nack`` after ``min(probe_timeout, 0.8 * (probe_interval -
    probe_timeout))`` without an ack, so the nack arrives within the requester's period."""

    indirect_checks: int = 3
    """k of SWIM: how many random peers are asked to probe a target that missed its
    direct ack. Each answers with an ``Ack`` relayed from the target or a ``Nack``."""

    gossip_interval: float = 0.2
    """Seconds between gossip rounds: each round sends up to ``max_piggyback`` queued
    broadcasts to ``gossip_nodes`` random members. Nothing is sent when the queue is empty."""

    gossip_nodes: int = 3
    """Fanout of a gossip round. Fixed, so per-node traffic does not grow with N; a
    broadcast still reaches everyone in O(log N) rounds."""

    gossip_to_dead: float = 30.0
    """Seconds after a member is declared dead (or left) during which it remains a gossip
    target, so a falsely-declared member hears the news and refutes it."""

    max_piggyback: int = 8
    """Most gossip messages (Alive/Suspect/Dead) attached to one outgoing Ping/Ack/PingReq
    or sent in one gossip round to one member. Bounds bytes per packet (each gossip
    message is a few hundred bytes at most)."""

    retransmit_mult: int = 4
    """A broadcast is sent ``retransmit_mult * ceil(log10(N + 1))`` times before it is
    dropped from the queue (memberlist's retransmit limit), enough for an epidemic to reach
    everyone with high probability."""

    suspicion_mult: int = 4
    """Minimum suspicion timeout = ``suspicion_mult * max(1, log10(N)) * probe_interval``.
    Also sets how many independent confirmations are expected: ``k = suspicion_mult - 2``
    (0 when fewer than k other members could confirm)."""

    suspicion_max_timeout_mult: int = 6
    """Maximum suspicion timeout = this * minimum. A fresh suspicion starts at the maximum
    and shrinks towards the minimum as independent suspectors confirm it (Lifeguard LHA-
    Suspicion): ``max - log(c+1)/log(k+1) * (max - min)`` after c confirmations."""

    push_pull_interval: float = 30.0
    """Seconds between full state syncs (anti-entropy) with one random live member, for up
    to ``push_pull_scale_threshold`` members. Above that the interval grows linearly with N
    (``interval * N / threshold``), so push/pull bytes per node per second stay flat while a
    sync itself carries O(N) members. N counts the live members we heard from directly
    (confirmed) and ourselves, so members only heard of (a fake-member flood) cannot stretch
    it. 0 disables periodic push/pull (joins still sync)."""

    join_sync_after: float = 5.0
    """Seconds after a join completes at which one extra push/pull with the seed that
    answered runs (then the periodic schedule resumes). Members that joined elsewhere at the same
    time may have finished gossiping their Alive before anyone knew about us; this one
    sync picks them up without waiting a full ``push_pull_interval``. 0 disables it."""

    push_pull_scale_threshold: int = 32
    """Member count above which ``push_pull_interval`` is stretched (see there)."""

    dead_reap_after: float = 60.0
    """Seconds a dead or left member is kept (and reported) before it is forgotten
    (``REAPED``). Must be at least ``gossip_to_dead``."""

    join_retry_interval: float = 1.0
    """Seconds between join attempts while no seed has answered; each failed attempt
    emits a ``SEED_UNREACHABLE`` event and resends the join to every seed."""

    awareness_max: int = 8
    """Lifeguard local health multiplier bound: the health score lives in
    ``[0, awareness_max - 1]`` and the probe interval is multiplied by ``score + 1``.
    Failed probes without the expected nacks and refutations raise it; acks lower it."""

    max_members: int = 65_536
    """Most members kept (dead ones included). Alive news about more is ignored."""

    max_broadcasts: int = 4_096
    """Bound of the broadcast queue; beyond it the most-retransmitted entries are dropped."""

    max_outbox: int = 16_384
    """Bound of ``messages_to_send()`` between drains; overflow is dropped (and counted)."""

    max_events: int = 16_384
    """Bound of ``next_event()`` between drains; overflow drops the oldest event."""

    max_relays: int = 1_024
    """Most indirect probes this node relays for others at once (extra PingReqs dropped)."""

    max_hints: int = 16
    """Most ``on_unreachable`` hints remembered as members to probe next."""

    def __post_init__(self) -> None:
        positive = ("probe_interval", "probe_timeout", "gossip_interval", "join_retry_interval")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"SwimConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.probe_timeout >= self.probe_interval:
            raise ConfigError("SwimConfig.probe_timeout must be below probe_interval")
        at_least_one = (
            "gossip_nodes", "max_piggyback", "retransmit_mult", "suspicion_mult",
            "suspicion_max_timeout_mult", "awareness_max", "push_pull_scale_threshold",
            "max_members", "max_broadcasts", "max_outbox", "max_events", "max_relays", "max_hints",
        )  # fmt: skip
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ConfigError(f"SwimConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        nonneg = (
            self.indirect_checks,
            self.push_pull_interval,
            self.gossip_to_dead,
            self.join_sync_after,
        )
        if min(nonneg) < 0:
            raise ConfigError(
                "SwimConfig: indirect_checks, push_pull_interval, gossip_to_dead, join_sync_after must be >= 0"
            )
        if self.dead_reap_after < self.gossip_to_dead:
            raise ConfigError("SwimConfig.dead_reap_after must be >= gossip_to_dead")

    def replace(self, **changes: object) -> SwimConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def lan(cls) -> SwimConfig:
        """memberlist's DefaultLANConfig: a datacenter network, RTT well under 100 ms."""
        return cls()

    @classmethod
    def wan(cls) -> SwimConfig:
        """memberlist's DefaultWANConfig: RTTs of hundreds of ms, more loss, bigger meshes."""
        return cls(
            probe_interval=5.0,
            probe_timeout=3.0,
            gossip_interval=0.5,
            gossip_nodes=4,
            gossip_to_dead=60.0,
            suspicion_mult=6,
            push_pull_interval=60.0,
            join_sync_after=15.0,
            dead_reap_after=120.0,
            join_retry_interval=5.0,
        )

    @classmethod
    def local(cls) -> SwimConfig:
        """Loopback and small local meshes (the real-process benchmarks: 8 nodes).

        The numbers are chosen against three targets with N ~ 8:

        * one identical view in <= 2 s: joins are a push/pull with the seed, then news
          spreads at ``gossip_interval = 0.1`` s to 3 peers per round (~3-4 rounds for 8).
        * no false death when a member is frozen (SIGSTOP) for 3 s: the minimum suspicion
          timeout is ``suspicion_mult * probe_interval = 8 * 0.5 = 4.0`` s (log10(8) < 1, so
          no size scaling), above 3 s + one probe interval (3.5 s): a frozen member was
          suspected at the earliest one probe period after it froze, so it has >= 1.5 s
          after it thaws to read the Suspect queued on its sockets and gossip a refutation
          (a few 0.1 s gossip rounds) before any timer can fire.
        * a kill -9 seen dead by every survivor in <= 6 s: the transport's connection drop
          (``on_unreachable``) makes every survivor probe the victim within one
          ``probe_interval``; dial failures make relays answer Nack at once; the probe
          ends after 0.5 s and everyone suspects within ~1 s, so the k = 6 expected
          confirmations arrive together and each timer shrinks to the 4.0 s minimum
          (from an 8 s maximum, ``suspicion_max_timeout_mult = 2``): dead at ~5 s, plus
          one or two gossip rounds to reach the last survivor.

        ``probe_timeout = 0.2`` s leaves room for event-loop stalls of a busy host while
        staying below the interval; a push/pull every 5 s repairs anything gossip lost.
        """
        return cls(
            probe_interval=0.5,
            probe_timeout=0.2,
            gossip_interval=0.1,
            gossip_nodes=3,
            gossip_to_dead=10.0,
            retransmit_mult=4,
            suspicion_mult=8,
            suspicion_max_timeout_mult=2,
            push_pull_interval=5.0,
            join_sync_after=1.0,
            dead_reap_after=30.0,
            join_retry_interval=1.0,
        )

    @classmethod
    def test(cls) -> SwimConfig:
        """Fast timers with binary-exact values (sums of powers of two), for tests on
        virtual time (exact deadline assertions) and quick real-time integration tests.
        Minimum suspicion timeout 4 * 0.25 = 1.0 s, maximum 3.0 s."""
        return cls(
            probe_interval=0.25,
            probe_timeout=0.125,
            gossip_interval=0.0625,
            gossip_nodes=3,
            gossip_to_dead=2.0,
            retransmit_mult=4,
            suspicion_mult=4,
            suspicion_max_timeout_mult=3,
            push_pull_interval=2.0,
            join_sync_after=0.5,
            dead_reap_after=4.0,
            join_retry_interval=0.5,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class FloodPolicy:
    """Local defences against a member holding the mesh key that floods gossip with members
    that do not exist. Local policy, not protocol: a peer need not do the same, so these are
    not ``SwimConfig`` fields (whose every field PROTOCOL.md §8 and its vectors specify)."""

    max_new_per_sender: int = 64
    """Admission bound (local policy, not protocol): most members unknown to us that one
    sender may introduce per ``admission_window`` through gossip or a sync we did not ask
    for; more are ignored (``Swim.unknown_members_refused``). A member announcing itself
    and the answers to our own join and syncs are not counted. A member holding the mesh
    key can otherwise flood every table with node ids that do not exist. 0: no bound."""

    admission_window: float = 10.0
    """Seconds of one ``max_new_per_sender`` window (every sender's count restarts)."""

    push_pull_confirmed_share: float = 0.5
    """Share of the periodic push/pulls whose partner is drawn from the members we heard
    from directly (confirmed) rather than from every live member, spread evenly over the
    rounds (0.5: every second one, the first after a join not), so that a flood of members
    that do not exist cannot take every sync. In ``[0, 1]``."""

    def __post_init__(self) -> None:
        if not self.admission_window > 0 or self.max_new_per_sender < 0:
            raise ConfigError("FloodPolicy: admission_window must be > 0, max_new_per_sender >= 0")
        if not 0.0 <= self.push_pull_confirmed_share <= 1.0:
            raise ConfigError("FloodPolicy.push_pull_confirmed_share must be in [0, 1]")

    def replace(self, **changes: object) -> FloodPolicy:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


#: The named timing presets, the one table of them (``NodeConfig.preset``, ``--preset`` of the
#: node and of ``simulations gossip``): name -> constructor.
PRESETS: Mapping[str, Callable[[], SwimConfig]] = {
    "lan": SwimConfig.lan,
    "wan": SwimConfig.wan,
    "local": SwimConfig.local,
    "test": SwimConfig.test,
}
