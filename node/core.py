"""The one output convention of every sans-I/O core in ``node/`` (tasks, blobs, all-reduce...).

A core is a synchronous object fed inputs with an explicit ``now=`` and asked for outputs:

* ``messages_to_send() -> list[Send]``: what to write, addressed by node id, with a channel;
* ``next_event() -> Event | None``: what happened, oldest first, one at a time;
* ``next_deadline() -> float | None`` and ``handle_timer(*, now)``: its one timer;
* ``stats() -> Mapping[str, float]``: pure counters and gauges (``node.metrics`` serves them).

``node.driver.Driver`` runs one on the event loop. ``discovery.Swim`` keeps its address-based
outputs (there an address is the right key: SWIM talks to members it has not met yet).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeAlias, TypeVar

from protocol.connection import Channel

P = TypeVar("P", covariant=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class Send(Generic[P]):
    """One output of a core: ``message`` for member ``dest`` on ``channel``.

    ``message`` is a wire ``Message`` for control traffic; a core that hands its adapter
    work to do before sending (a tensor chunk still to encode) puts that description here.
    """

    dest: bytes
    channel: Channel
    message: P


class Core(Protocol):
    """What ``Driver`` needs of a sans-I/O core: its one deadline and its timer input."""

    def next_deadline(self) -> float | None: ...

    def handle_timer(self, *, now: float) -> None: ...


@dataclass(slots=True)
class Histogram:
    """A pure cumulative histogram a core keeps for ``stats()`` (Prometheus semantics:
    ``counts[i]`` observations were <= ``bounds[i]``; the last bucket is +Inf)."""

    bounds: Sequence[float]
    counts: list[int] = field(init=False)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, count <= le), ..., ("+Inf", count)]`` as Prometheus exposes them."""
        out, running = [], 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


Stat: TypeAlias = "float | Mapping[str, float] | Histogram"
"""One metric's value: a number, numbers by one label's value, or a histogram."""

Stats: TypeAlias = "Mapping[str, Stat]"
"""What ``stats()`` returns: metric name (without ``starmesh_``) -> value (``node.metrics``
has every name's kind, label and help)."""


class HasStats(Protocol):
    """Anything that reports counters and gauges by name (cores, services, the pool)."""

    def stats(self) -> Stats: ...
