"""Who trains the next segment, with how much of the batch, and which data it reads: pure.

Theory of operation
-------------------
A training job's group may change only at a segment boundary (``trainkind``); this module is
the rule for each boundary, as functions of what the coordinator knows, so the coordinator,
the workers and the tests compute the same thing.

*Admission* (``admit``). The members that finished the last segment hold its end state in
memory: they are the *incumbents* and keep their ranks, in order. Any other able member is a
*newcomer*. While the incumbents alone are at least ``workers_min``, a newcomer enters as a
*listener*: share 0, no data; it fetches the state the segment starts from (through the blob
cache, striped over the incumbents, who all hold the same bytes) while the others train, takes
part in every round with nothing to add, keeps each round's mean, and once its state has
arrived replays them through the same optimizer step on the same bytes. At the segment's end
its state is the others' bit for bit (the coordinator checks: its report's state digest must
agree), and from the next segment it has a share. So nobody waits for a newcomer's download:
the rule that closes the gap is *replay of the averaged updates of the segment it listened
to*. When the incumbents are fewer than ``workers_min`` (the start, a resume, or too many
losses) the segment cannot run without newcomers, so enough of them enter with a share and
load the state before their first step (a blocking join: the others could not train anyway).
The group never exceeds ``cap`` (``workers_max``, the shards, and the global batch: a worker
without a micro-batch adds nothing).

*The global batch* (``shares``). A job's optimizer step is over ``batch`` micro-batches (each
the job's own batch), whoever is present: the active ranks split them as evenly as they can
(rank r gets ``batch // W`` plus one for the first ``batch % W`` ranks) and each accumulates
its share. A round's mean is weighted by share (the node scales each contribution by its share
and the mean by the contributors' total), so a step is the mean gradient over exactly
``batch`` micro-batches, also in DiLoCo where a round's pseudo-gradients are weighted by the
inner micro-batches behind them. A worker lost mid-segment leaves the rounds after its loss
with the survivors' micro-batches only (the exact mean over them), until the next boundary
restores ``batch``. ``batch`` 0 keeps one micro-batch per active rank.

*Data* (``step_reads``, ``advance``). The ``shards`` virtual shards are dealt round-robin to
the active ranks (shard k to active rank k mod W). A rank reads, at local step i, the
micro-batches j = i*share .. i*share + share - 1 of its shards in turn (shard ``order[j mod
L]``), each at that shard's next position. Positions move only with committed records: a
reporting rank reports its shards' next positions; a rank lost or failed mid-segment moved
its shards by exactly the micro-batches of the rounds it contributed to (``rounds_of`` in the
survivors' reports: sync has one round per step, DiLoCo one per segment, counting all its
inner steps), so no micro-batch that went into a committed update is read again, and none that
did not is skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def shares(batch: int, workers: int) -> tuple[int, ...]:
    """Micro-batches per step of each of ``workers`` active ranks (``batch`` 0: one each)."""
    if workers < 1:
        return ()
    if batch <= 0:
        return (1,) * workers
    base, extra = divmod(batch, workers)
    return tuple(base + (1 if r < extra else 0) for r in range(workers))


def group_shares(shares: Sequence[int], size: int) -> tuple[int, ...]:
    """A seat's ``shares`` for its group of ``size`` ranks (``()`` in a seat: one each)."""
    return tuple(shares) if shares else (1,) * size


def step_reads(order: Sequence[int], positions: dict[int, int], share: int, step: int) -> list[tuple[int, int]]:
    """The ``(shard, position)`` micro-batches of local step ``step`` (0-based), advancing
    ``positions`` past them. Steps must be taken in order from 0."""
    out = []
    for j in range(step * share, (step + 1) * share):
        shard = order[j % len(order)]
        out.append((shard, positions[shard]))
        positions[shard] += 1
    return out


def advance(order: Sequence[int], positions: Mapping[int, int], share: int, steps: int) -> dict[int, int]:
    """Where ``order``'s shards continue after ``steps`` local steps of ``share`` micro-batches
    (what ``step_reads`` leaves, in closed form)."""
    total, n = steps * share, len(order)
    out = {k: positions.get(k, 0) for k in order}
    if n == 0:
        return out
    base, extra = divmod(total, n)
    for i, shard in enumerate(order):
        out[shard] += base + (1 if i < extra else 0)
    return out


def deal(shards: int, active: int) -> list[list[int]]:
    """Shard k to active rank k mod ``active``."""
    return [list(range(r, shards, active)) for r in range(active)]


@dataclass(frozen=True, slots=True)
class Admission:
    """The group of the next segment: ``group`` in rank order, ``shares`` aligned with it."""

    group: tuple[bytes, ...]
    shares: tuple[int, ...]
    blocking: frozenset[bytes]
    """Newcomers that enter with a share (they load the state before their first step)."""

    @property
    def listeners(self) -> tuple[bytes, ...]:
        return tuple(n for n, s in zip(self.group, self.shares, strict=True) if s == 0)

    @property
    def active(self) -> tuple[bytes, ...]:
        return tuple(n for n, s in zip(self.group, self.shares, strict=True) if s > 0)


def admit(incumbents: Sequence[bytes], newcomers: Sequence[bytes], *, workers_min: int, cap: int,
          batch: int, listen: bool) -> Admission | None:
    """The next segment's group (module docstring), or None while fewer than ``workers_min``
    can train. ``incumbents`` are live members holding the state (last group first), in rank
    order; ``newcomers`` the other able members in preference order; ``listen`` False admits
    every newcomer with a share (the first segment: everyone starts from the seed or a resume
    state, nobody holds it in memory)."""
    cap = max(0, cap)
    incumbents = list(incumbents[:cap])
    room = cap - len(incumbents)
    newcomers = list(newcomers[:room])
    if not listen:
        active, listeners = incumbents + newcomers, []
    else:
        need = max(0, workers_min - len(incumbents))
        active, listeners = incumbents + newcomers[:need], newcomers[need:]
    if len(active) < workers_min or not active:
        return None
    blocking = frozenset(n for n in active if n not in set(incumbents)) if listen else frozenset()
    group = tuple(active + listeners)
    return Admission(group=group, shares=shares(batch, len(active)) + (0,) * len(listeners),
                     blocking=blocking)
