"""Member records: the mutable row the SWIM core keeps, and the frozen view it hands out."""

from __future__ import annotations

from dataclasses import dataclass

from discovery.suspicion import Suspicion
from protocol.messages.gossip import MemberState, MemberStatus, NodeMeta, encoded_size

__all__ = ["Member", "MemberStatus", "MemberView"]


@dataclass(frozen=True, slots=True)
class MemberView:
    """A snapshot of one member as this node sees it."""

    node_id: bytes
    """32-byte Ed25519 public key."""
    address: str
    """"host:port" to reach it."""
    status: MemberStatus
    incarnation: int
    """The member's own version counter; only it may raise it (refutation, meta update)."""
    meta: NodeMeta
    last_heard: float
    """The ``now`` when this node last heard from the member directly (or learned of it)."""


class Member:
    """Mutable state of one member inside ``Swim`` (memberlist's ``nodeState``)."""

    __slots__ = (
        "_size",
        "_sized",
        "_state",
        "address",
        "confirmed",
        "incarnation",
        "last_heard",
        "meta",
        "node_id",
        "state_change",
        "status",
        "suspicion",
    )

    def __init__(
        self,
        *,
        node_id: bytes,
        address: str,
        incarnation: int,
        meta: NodeMeta,
        status: MemberStatus,
        now: float,
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.incarnation = incarnation
        self.meta = meta
        self.status = status
        self.last_heard = now
        self.state_change = now
        """When ``status`` last changed (drives gossip-to-the-dead and reaping)."""
        self.suspicion: Suspicion | None = None
        self.confirmed = False
        """We received a message from this node id itself, not only news about it. A member
        never confirmed may not exist (a fake-member flood): ``Swim`` prefers confirmed
        members as gossip targets, helpers and sync partners, and our own accusations of an
        unconfirmed member stay local (``MemberTable.suspect``/``dead``)."""
        self._state: MemberState | None = None
        self._sized: MemberState | None = None
        self._size = 0

    @property
    def live(self) -> bool:
        """Alive or suspect: probed, gossiped to, counted in N."""
        return self.status is MemberStatus.ALIVE or self.status is MemberStatus.SUSPECT

    def view(self) -> MemberView:
        return MemberView(
            node_id=self.node_id,
            address=self.address,
            status=self.status,
            incarnation=self.incarnation,
            meta=self.meta,
            last_heard=self.last_heard,
        )

    def state(self) -> MemberState:
        """This member as carried in a push/pull sync (cached while nothing changed)."""
        c = self._state
        if (
            c is not None
            and c.incarnation == self.incarnation
            and c.status is self.status
            and c.meta is self.meta
            and c.address == self.address
        ):
            return c
        c = self._state = MemberState(
            node=self.node_id,
            address=self.address,
            incarnation=self.incarnation,
            status=self.status,
            meta=self.meta,
        )
        return c

    def state_size(self) -> int:
        """Bytes of ``state()`` encoded (cached with it): what this entry adds to a sync."""
        state = self.state()
        if self._sized is not state:
            self._sized, self._size = state, encoded_size(state)
        return self._size
