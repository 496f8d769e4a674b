"""The bookkeeping of one SWIM probe (ours) and of indirect probes we run for others."""

from __future__ import annotations

from discovery.config import SwimConfig


def relay_timeout(config: SwimConfig) -> float:
    """How long a helper waits for the target's ack before answering ``Nack``.

    ``min(probe_timeout, 0.8 * (probe_interval - probe_timeout))``: the requester sent its
    PingReq ``probe_timeout`` into its probe period, so the nack must come back within the
    rest of that period to count (memberlist waits a full probe_timeout and so often misses
    it with its default 0.5 s / 1 s).
    """
    return min(config.probe_timeout, 0.8 * (config.probe_interval - config.probe_timeout))


class Probe:
    """The probe in flight: one target, one sequence number."""

    __slots__ = ("end_at", "expected_nacks", "indirect", "nacks", "seq", "target", "timeout_at")

    def __init__(self, *, target: bytes, seq: int, timeout_at: float, end_at: float) -> None:
        self.target = target
        self.seq = seq
        self.timeout_at = timeout_at
        self.end_at = end_at
        self.indirect = False
        self.expected_nacks = 0
        self.nacks = 0


class Relay:
    """An indirect probe we perform for someone else (we received their PingReq)."""

    __slots__ = ("deadline", "nack", "requester", "seq", "target_address")

    def __init__(
        self, *, requester: str, seq: int, nack: bool, deadline: float, target_address: str
    ) -> None:
        self.requester = requester
        self.seq = seq
        self.nack = nack
        self.deadline = deadline
        self.target_address = target_address


__all__ = ["Probe", "Relay", "relay_timeout"]
