"""Rendezvous (highest-random-weight) hashing: who is responsible for a key.

Every node ranks the same candidates for the same key in the same order from its own view,
with no coordination: each candidate's weight is a hash of (key, node id), and the order is
by weight, highest first (node id breaks the impossible tie). A member that joins or leaves
moves only the keys it ranks first for (Thaler & Ravishankar 1998). Tasks use it to pick a
coordinator and its replicas (``node.tasks``); a ballot of a takeover ranks by
``(epoch, weight)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(key: bytes, node_id: bytes) -> int:
    """The candidate's 64-bit weight for ``key``."""
    digest = hashlib.blake2b(node_id, digest_size=8, key=key[:64], person=b"starmesh-hrw").digest()
    return int.from_bytes(digest, "big")


def rank(key: bytes, candidates: Iterable[bytes]) -> list[bytes]:
    """``candidates`` (node ids, duplicates dropped) in rendezvous order for ``key``."""
    return sorted(set(candidates), key=lambda n: (weight(key, n), n), reverse=True)


def ballot_key(key: bytes, epoch: int, node_id: bytes) -> tuple[int, int, bytes]:
    """How ballots of ``key`` order: by epoch, then by the node's weight for the key."""
    return (epoch, weight(key, node_id), node_id)
