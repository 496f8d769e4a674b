"""Test helpers for anything built on ``protocol.connection`` (like ``trio.testing``).

``ConnectionPair`` runs an initiator and a responder back to back, no sockets: bytes one
side writes are fed to the other. ``exchange`` asserts the peer saw exactly what was sent.
Everything is deterministic: identities and key material come from a seeded ``random.Random``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.connection import (
    NEED_DATA,
    Channel,
    Connection,
    ConnectionTerminated,
    Event,
    HandshakeComplete,
    HandshakeOptions,
    MessageReceived,
    Role,
)
from protocol.crypto import TokenBytes, generate_identity
from protocol.framing import HEADER
from protocol.schema import Message


def seeded_token_bytes(seed: int | str) -> TokenBytes:
    """A deterministic stand-in for ``secrets.token_bytes`` (tests and simulations only)."""
    rng = random.Random(seed)
    return rng.randbytes


def seeded_identity(seed: int | str) -> Ed25519PrivateKey:
    return generate_identity(seeded_token_bytes(f"identity:{seed}"))


def drain(conn: Connection) -> list[Event]:
    """All events ``conn`` can produce from what it has buffered."""
    events: list[Event] = []
    while (ev := conn.next_event()) is not NEED_DATA:
        events.append(ev)
    return events


class ConnectionPair:
    """Two ``Connection``s wired to each other in memory."""

    def __init__(
        self,
        *,
        secret: bytes = b"\x42" * 32,
        responder_secret: bytes | None = None,
        initiator_options: HandshakeOptions | None = None,
        responder_options: HandshakeOptions | None = None,
        now: float = 0.0,
        handshake_timeout: float = 5.0,
        seed: int = 0,
    ) -> None:
        self.initiator_identity = seeded_identity(f"{seed}:i")
        self.responder_identity = seeded_identity(f"{seed}:r")
        self.initiator = Connection(
            role=Role.INITIATOR, identity=self.initiator_identity, mesh_secret=secret,
            options=initiator_options or HandshakeOptions("10.0.0.1:7946", Channel.CONTROL, ("gossip",)),
            now=now, handshake_timeout=handshake_timeout, token_bytes=seeded_token_bytes(f"{seed}:i"),
        )
        self.responder = Connection(
            role=Role.RESPONDER, identity=self.responder_identity,
            mesh_secret=secret if responder_secret is None else responder_secret,
            options=responder_options or HandshakeOptions("10.0.0.2:7946", Channel.CONTROL),
            now=now, handshake_timeout=handshake_timeout, token_bytes=seeded_token_bytes(f"{seed}:r"),
        )

    def other(self, conn: Connection) -> Connection:
        return self.responder if conn is self.initiator else self.initiator

    def pump(self) -> tuple[list[Event], list[Event]]:
        """Move pending bytes both ways until neither side has output; (initiator, responder) events."""
        events: tuple[list[Event], list[Event]] = ([], [])
        while True:
            moved = False
            for conn, mine in ((self.initiator, events[0]), (self.responder, events[1])):
                mine.extend(drain(conn))
                data = conn.data_to_send()
                if data:
                    self.other(conn).receive_data(data)
                    moved = True
            if not moved:
                return events

    def handshake(self) -> None:
        """Complete the handshake; assert each side got exactly one ``HandshakeComplete``."""
        ev_i, ev_r = self.pump()
        assert [type(e) for e in ev_i] == [HandshakeComplete], ev_i
        assert [type(e) for e in ev_r] == [HandshakeComplete], ev_r

    def exchange(self, sender: Connection, msgs: Sequence[Message], *, split: Callable[[bytes], list[bytes]] | None = None) -> None:
        """``sender`` sends ``msgs`` (optionally re-chunked by ``split``); assert the peer receives
        exactly those messages, in order, and nothing else."""
        data = sender.send_many(msgs)
        receiver = self.other(sender)
        got: list[Event] = []
        for piece in (split(data) if split else [data]):
            receiver.receive_data(piece)
            got.extend(drain(receiver))
        assert got == [MessageReceived(m) for m in msgs], got

    def inject(self, sender: Connection, body: bytes) -> bytes:
        """What an authenticated but misbehaving ``sender`` would write for the raw plaintext
        ``body`` (any bytes, not necessarily a valid message): sealed with its real key."""
        tx = sender._tx
        assert tx is not None, "inject() needs an OPEN sender"
        sealed = tx.seal(body)
        return HEADER.pack(len(sealed)) + sealed


def terminated_with(events: Sequence[Event]) -> ConnectionTerminated:
    """Assert ``events`` ends in exactly one ``ConnectionTerminated`` and return it."""
    assert events and isinstance(events[-1], ConnectionTerminated), events
    assert sum(isinstance(e, ConnectionTerminated) for e in events) == 1, events
    return events[-1]
