"""``AllReduceConfig``: every knob of one all-reduce round (deadlines, window, exclusion).

Deadlines are measured from the local start of the round (``join``, ``part``) or from the
local receipt of the latest commit (``gather``); the leader waits ``report_grace`` longer
than the members it waits for, and a member waits ``leader_timeout`` longer than the leader
before it suspects the leader. ``round_timeout`` bounds everything: no round outlives it.

Size the transfer deadlines from the data: a member uploads about ``(N-1)/N`` of the tensor
in each phase, so ``part_timeout`` and ``gather_timeout`` should be a few times
``4 * numel / link_bytes_per_s`` (``AllReduceConfig.for_transfer`` does this).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from protocol.errors import ConfigError
from protocol.messages.tensor import MAX_EPOCHS

#: Elements per chunk unless told otherwise (4 MiB of fp32; matches the codecs' default).
DEFAULT_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class AllReduceConfig:
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    """Elements per AR_PART / AR_AVERAGE chunk (the codec's ``chunk_elements``)."""
    window_bytes: int = 8 << 20
    """Most raw (fp32) bytes of tensor chunks emitted to one destination and not yet
    acknowledged by ``on_sent`` (two default chunks: one on the wire, one being encoded).
    At least one chunk is always allowed in flight. Encoded bytes held by an adapter are
    bounded by ``window_bytes x (N - 1)``."""
    join_timeout: float = 5.0
    """Seconds after the local start: a member whose AR_BEGIN has not arrived is STALLED."""
    part_timeout: float = 30.0
    """Seconds after the local start: a member reports what it holds even if incomplete."""
    gather_timeout: float = 30.0
    """Seconds after accepting a commit: a member reports even if averages are missing."""
    report_grace: float = 2.0
    """Extra seconds the leader waits for reports after the members' own deadline."""
    leader_timeout: float = 5.0
    """Extra seconds a member waits for the leader's decision before suspecting it."""
    round_timeout: float = 300.0
    """Hard bound: the round fails with a timeout this many seconds after the local start."""
    max_epochs: int = 8
    """Most commits in one round (each failure after a commit costs one)."""
    early_averages: bool = True
    """An initial owner averages each chunk of its slice as soon as every member's part of it
    is in, and streams it before any commit (epoch 0), so the all-gather overlaps the
    reduce-scatter; the first commit keeps those averages when S is the whole group."""
    outlier_factor: float | None = 100.0
    """A candidate whose L2 norm exceeds this times the median candidate norm is excluded
    (NORM_OUTLIER). Needs >= 3 candidates; ``None`` disables the check. Must be > 1. Honest
    small-batch gradients vary more than one might think: in ``simulations train`` (batch 32,
    3 workers) the largest norm reached 11.6x the median once in 400 steps (p99 4.3x), so the
    default only catches what is off by orders of magnitude (a scaling bug, garbage)."""

    def __post_init__(self) -> None:
        if type(self.chunk_elements) is not int or not 1 <= self.chunk_elements <= 1 << 24:
            raise ConfigError(f"chunk_elements must be in 1..2**24, got {self.chunk_elements!r}")
        if type(self.window_bytes) is not int or self.window_bytes < 1:
            raise ConfigError(f"window_bytes must be a positive int, got {self.window_bytes!r}")
        for name in ("join_timeout", "part_timeout", "gather_timeout", "report_grace",
                     "leader_timeout", "round_timeout"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {v!r}")
        if type(self.max_epochs) is not int or not 1 <= self.max_epochs <= MAX_EPOCHS:
            raise ConfigError(f"max_epochs must be in 1..{MAX_EPOCHS}, got {self.max_epochs!r}")
        if type(self.early_averages) is not bool:
            raise ConfigError(f"early_averages must be a bool, got {self.early_averages!r}")
        f = self.outlier_factor
        if f is not None and (not isinstance(f, int | float) or not math.isfinite(f) or f <= 1):
            raise ConfigError(f"outlier_factor must be > 1 or None, got {f!r}")

    def replace(self, **changes: object) -> AllReduceConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def lan(cls) -> AllReduceConfig:
        """Defaults: a LAN or a datacenter, tensors up to a few GB."""
        return cls()

    @classmethod
    def local(cls) -> AllReduceConfig:
        """Nodes on one host (loopback): short deadlines."""
        return cls(join_timeout=2.0, part_timeout=10.0, gather_timeout=10.0, report_grace=0.5,
                   leader_timeout=2.0, round_timeout=60.0)

    @classmethod
    def test(cls) -> AllReduceConfig:
        """Unit tests on virtual time: small chunks, short deadlines (seconds of virtual time)."""
        return cls(chunk_elements=64, window_bytes=1024, join_timeout=1.0, part_timeout=3.0,
                   gather_timeout=3.0, report_grace=0.5, leader_timeout=1.0, round_timeout=60.0)

    @classmethod
    def for_transfer(cls, *, numel: int, bytes_per_s: float, slack: float = 4.0,
                     base: AllReduceConfig | None = None) -> AllReduceConfig:
        """``base`` with ``part_timeout`` and ``gather_timeout`` at least ``slack`` times the
        time to move the whole fp32 tensor at ``bytes_per_s`` (an upper bound on one phase)."""
        b = base or cls()
        if numel < 0 or bytes_per_s <= 0 or slack <= 0:
            raise ConfigError("for_transfer needs numel >= 0, bytes_per_s > 0 and slack > 0")
        need = slack * 4.0 * numel / bytes_per_s
        part, gather = max(b.part_timeout, need), max(b.gather_timeout, need)
        total = b.join_timeout + part + gather + 4 * (b.report_grace + b.leader_timeout)
        return b.replace(part_timeout=part, gather_timeout=gather,
                         round_timeout=max(b.round_timeout, 2 * total))


@dataclass(frozen=True, slots=True, kw_only=True)
class AllReduceSettings:
    """Node-wide all-reduce defaults (``NodeConfig.allreduce``; every field is a CLI flag):
    what a round gets when its caller passes no ``AllReduceConfig``."""

    link_bytes_per_s: float = 12.5e6
    """Assumed bytes per second of a member's link (default 100 Mbit/s); the transfer
    deadlines of a round default to a few times the time its tensor takes at this speed."""
    window_bytes: int = 8 << 20
    """Raw (fp32) bytes of tensor chunks in flight per destination (``AllReduceConfig``)."""
    early_averages: bool = True
    """Owners stream each chunk's average as soon as every part of it is in."""
    outlier_factor: float | None = 100.0
    """Exclude a contribution whose L2 norm exceeds this times the median; None: never."""

    def __post_init__(self) -> None:
        if not (isinstance(self.link_bytes_per_s, int | float) and math.isfinite(self.link_bytes_per_s)
                and self.link_bytes_per_s > 0):
            raise ConfigError(f"link_bytes_per_s must be a positive number, got {self.link_bytes_per_s!r}")
        AllReduceConfig(window_bytes=self.window_bytes, early_averages=self.early_averages,
                        outlier_factor=self.outlier_factor)  # the same checks as a round's

    def round_config(self, numel: int) -> AllReduceConfig:
        """The config of a round of ``numel`` elements whose caller gave none."""
        base = AllReduceConfig(window_bytes=self.window_bytes, early_averages=self.early_averages,
                               outlier_factor=self.outlier_factor)
        return AllReduceConfig.for_transfer(numel=numel, bytes_per_s=self.link_bytes_per_s, base=base)
