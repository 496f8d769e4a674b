"""The owner-signed, versioned log of who may submit work.

Theory of operation
-------------------
A mesh's key file names its **owner** (an Ed25519 public key; ``node.submitters.keys``). The
owner may always submit. Everyone else may submit once the owner has signed a GRANT of their
key, until a later REVOKE. Grants and revocations form one log, numbered ``seq`` 1, 2, 3...
with no gap and no fork: entry n+1 is accepted only by a log of version n, so every node that
has version v holds exactly the same v entries and the same answer to ``is_authorized``.

Invariants:

* ``version == len(entries)``; ``entries[i]`` has ``seq == i + 1``, verifies under the owner
  and names ``entry_digest(entries[i - 1].body)`` as its ``prev`` (a hash chain: two logs of
  one version are the same log).
* An entry is checked whole before it changes anything: the signature over
  ``SIGN_CONTEXT + body`` first (``BadSignature``), then the body's schema (``BadEntry``).
* ``apply`` is idempotent: an entry already held (same ``seq``, same bytes) is ignored; a
  different entry under a held ``seq``, or a next entry whose ``prev`` is not our head, is a
  fork (``ForkedEntry``: the owner signed two entries with one number, e.g. from two machines
  at once; the first one a node holds stays); an entry past ``version + 1`` is ignored
  (anti-entropy brings the missing ones first).
* At most ``MAX_LOG_ENTRIES`` entries (``LogFull`` after).

Members converge by anti-entropy (``node.submitters.service``): a node offline during a grant
catches up from any member when it comes back, because the log only grows.
"""

from __future__ import annotations

from typing import NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from node.submitters.keys import public_key_to_text
from protocol.errors import RemoteProtocolError, StarmeshError
from protocol.messages.submitters import (
    NO_PREV,
    SIGN_CONTEXT,
    SignedEntry,
    SubmitterAction,
    SubmitterEntry,
    decode_entry,
    encode_entry,
    entry_digest,
)

#: Most entries one log holds (grants and revocations together).
MAX_LOG_ENTRIES = 65_536


class SubmitterLogError(StarmeshError):
    """An entry the log cannot take; ``str()`` says why."""


class NoOwner(SubmitterLogError):
    """The mesh key file names no owner, so no entry can be verified (nobody may submit)."""


class BadSignature(SubmitterLogError):
    """The entry is not signed by this mesh's owner (tampered, or another mesh's)."""


class BadEntry(SubmitterLogError):
    """Signed by the owner but not a valid entry (schema, ``seq`` 0)."""


class ForkedEntry(SubmitterLogError):
    """The owner signed two different entries with the same ``seq``; the first one held stays."""


class LogFull(SubmitterLogError):
    """The log holds ``MAX_LOG_ENTRIES`` entries."""


class Submitter(NamedTuple):
    """A key the log authorizes now (the owner not included unless granted)."""

    key: bytes
    name: str
    granted_at: float
    """``signed_at`` of its latest GRANT."""


def sign_payload(body: bytes) -> bytes:
    """What the owner's signature covers."""
    return SIGN_CONTEXT + body


def make_entry(owner_key: Ed25519PrivateKey, *, seq: int, action: SubmitterAction, key: bytes,
               name: str = "", now: float, prev: bytes = NO_PREV) -> SignedEntry:
    """Sign one entry with the owner's private key (``now``: Unix time, ``signed_at``;
    ``prev``: ``SubmitterLog.head`` of the log it extends, as ``seq`` is its ``version + 1``)."""
    body = encode_entry(SubmitterEntry(seq=seq, prev=prev, action=action, key=key, name=name,
                                       signed_at=now))
    return SignedEntry(body=body, signature=owner_key.sign(sign_payload(body)))


def verify_entry(owner: bytes, entry: SignedEntry) -> SubmitterEntry:
    """The entry ``entry`` carries, if ``owner`` signed it; ``BadSignature`` / ``BadEntry``."""
    try:
        Ed25519PublicKey.from_public_bytes(owner).verify(entry.signature, sign_payload(entry.body))
    except (InvalidSignature, ValueError):
        raise BadSignature(
            f"submitter entry not signed by the mesh owner {public_key_to_text(owner)}") from None
    try:
        body = decode_entry(entry.body)
    except RemoteProtocolError as exc:
        raise BadEntry(f"submitter entry signed by the owner but malformed: {exc}") from None
    if body.seq == 0:
        raise BadEntry("submitter entry with seq 0 (entries are numbered from 1)")
    return body


class SubmitterLog:
    """Who may submit, from the owner and the log (module docstring)."""

    def __init__(self, owner: bytes | None, *, max_entries: int = MAX_LOG_ENTRIES) -> None:
        self.owner = owner
        self.max_entries = max_entries
        self._entries: list[SignedEntry] = []
        self._decoded: list[SubmitterEntry] = []
        self.head = NO_PREV
        """``entry_digest`` of the last entry's body: the ``prev`` of the next one."""
        self._latest: dict[bytes, SubmitterEntry] = {}
        """Each key's latest entry."""
        self.forks = 0
        """``ForkedEntry`` refusals so far."""

    make_entry = staticmethod(make_entry)

    @property
    def version(self) -> int:
        """Entries held: the ``seq`` of the last one (0 when empty)."""
        return len(self._entries)

    def apply(self, entry: SignedEntry) -> bool:
        """Take ``entry`` if it is the next one; True if it changed the log.

        False for an entry already held or one past ``version + 1``. Raises ``NoOwner``,
        ``BadSignature``, ``BadEntry``, ``ForkedEntry`` or ``LogFull``; nothing changes then.
        """
        if self.owner is None:
            raise NoOwner("this mesh has no owner (its key file has no owner line): nobody may "
                          "submit; run: python -m node mesh-key set-owner MESH_KEY_FILE")
        body = verify_entry(self.owner, entry)
        if body.seq <= self.version:
            if self._entries[body.seq - 1] != entry:
                self.forks += 1
                raise ForkedEntry(f"the owner signed two different entries #{body.seq}; "
                                  "keeping the first one this node got")
            return False
        if body.seq != self.version + 1:
            return False
        if body.prev != self.head:
            self.forks += 1
            raise ForkedEntry(f"entry #{body.seq} was signed on top of another entry "
                              f"#{self.version} than this node holds; refused")
        if self.version >= self.max_entries:
            raise LogFull(f"the submitter log is full ({self.max_entries} entries)")
        self._entries.append(entry)
        self._decoded.append(body)
        self.head = entry_digest(entry.body)
        self._latest[body.key] = body
        return True

    def entry(self, seq: int) -> SubmitterEntry:
        """The decoded entry number ``seq`` (1-based)."""
        return self._decoded[seq - 1]

    def entries_after(self, version: int, limit: int) -> list[SignedEntry]:
        """The entries with ``seq > version``, at most ``limit`` of them, in order."""
        if version < 0 or limit <= 0:
            return []
        return self._entries[version:version + limit]

    def is_authorized(self, key: bytes) -> bool:
        """The owner always; any other key when its latest entry is a GRANT."""
        if self.owner is not None and key == self.owner:
            return True
        latest = self._latest.get(key)
        return latest is not None and latest.action is SubmitterAction.GRANT

    def submitters(self) -> list[Submitter]:
        """The keys granted now, in the order of their latest grant."""
        granted = [e for e in self._latest.values() if e.action is SubmitterAction.GRANT]
        return [Submitter(e.key, e.name, e.signed_at) for e in sorted(granted, key=lambda e: e.seq)]

    def stats(self) -> dict[str, float]:
        return {"submitters_log_version": float(self.version),
                "submitters_granted": float(sum(e.action is SubmitterAction.GRANT
                                                for e in self._latest.values())),
                "submitters_forks_total": float(self.forks)}
