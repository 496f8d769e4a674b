"""Statements of PROTOCOL.md that a second implementation had to guess, checked against the code.

Each test names the section whose sentence it keeps true. The byte-level vectors live in
``test_spec_vectors.py``; these are the behaviours around them: which channel carries which
message (§4.7), which messages carry piggybacked gossip (§8), the empty GOODBYE (§1.1), what
an invalid ERROR gets (§6.3), the first incarnation (§8.1), the key file's mode (§5.6), the
capabilities a node sends (§4.3).
"""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path

import msgpack
import pytest

from discovery.config import SwimConfig
from discovery.testing import MemoryMesh
from node.allreduce.service import AllReduceService
from node.identity import create_mesh_key, load_incarnation, load_mesh_key
from node.membership import GOSSIP_TAGS, start_incarnation
from node.status_service import StatusService
from protocol.connection import Channel, Connection, ConnectionTerminated, HandshakeOptions, Role
from protocol.errors import ConfigError, ErrorCode
from protocol.framing import HEADER
from protocol.handshake import Goodbye, ProtocolErrorMsg
from protocol.messages.gossip import Ack, Alive, Dead, Nack, Ping, PingReq, Suspect
from protocol.schema import decode_body, encode_body
from protocol.tags import MsgType
from protocol.testing import ConnectionPair, drain, seeded_identity

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "PROTOCOL.md"


def _spec_text() -> str:
    """PROTOCOL.md with every run of whitespace made one space (line breaks do not matter)."""
    return " ".join(PROTOCOL_MD.read_text(encoding="utf-8").split())


def _section(title: str) -> str:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    start = text.index(title)
    end = text.index("\n### ", start + len(title))
    return text[start:end]


# ---- §4.7: which channel carries which message


def _channel_table() -> dict[Channel, set[MsgType]]:
    """The §4.7 table: channel -> the tags it lists (as ``NAME`` number pairs)."""
    out: dict[Channel, set[MsgType]] = {}
    for line in _section("### 4.7 Channels").splitlines():
        m = re.match(r"\| `(CONTROL|BULK|CLIENT)` \| (.*) \|$", line.strip())
        if m and "`" in m.group(2):
            tags = {MsgType[name] for name, num in re.findall(r"`([A-Z_]+)` (\d+)", m.group(2))}
            assert all(int(num) == MsgType[name] for name, num in re.findall(r"`([A-Z_]+)` (\d+)", m.group(2)))
            out[Channel[m.group(1)]] = tags
    return out


def test_channel_table_is_what_the_node_dispatches() -> None:
    served: dict[Channel, set[MsgType]] = collections.defaultdict(set)
    served[Channel.CONTROL] |= set(GOSSIP_TAGS)
    for service in (object.__new__(AllReduceService), object.__new__(StatusService)):
        for channel, tag in service.handlers():
            served[channel].add(tag)
    table = _channel_table()
    assert table[Channel.CONTROL] == served[Channel.CONTROL]
    assert table[Channel.BULK] == served[Channel.BULK] == {MsgType.AR_PART, MsgType.AR_AVERAGE}
    # the node receives only the request on CLIENT; the reply goes the other way
    assert served[Channel.CLIENT] == {MsgType.STATUS_REQUEST}
    assert table[Channel.CLIENT] == {MsgType.STATUS_REQUEST, MsgType.STATUS_REPLY}


# ---- §8: the only carriers of piggybacked gossip


def test_only_ping_ack_ping_req_and_nack_carry_gossip() -> None:
    """In a mesh that joins and loses a member, every gossip frame that follows another
    message in the same write follows one of the four carriers, and each carrier does it."""
    mesh = MemoryMesh(config=SwimConfig.test(), seed=3)
    addrs = [f"10.0.0.{i}:7946" for i in range(1, 7)]
    mesh.add(addrs[0])
    for a in addrs[1:]:
        mesh.add(a, seeds=[addrs[0]])
    mesh.run_for(5.0)
    mesh.crash(addrs[-1])
    mesh.run_for(10.0)
    gossip = (Alive, Suspect, Dead)
    carriers: collections.Counter[type] = collections.Counter()
    for prev, d in zip(mesh.log, mesh.log[1:], strict=False):
        same_write = (prev.src, prev.dst, prev.at) == (d.src, d.dst, d.at)
        if isinstance(d.msg, gossip) and same_write and not isinstance(prev.msg, gossip):
            carriers[type(prev.msg)] += 1
    assert set(carriers) == {Ping, Ack, PingReq, Nack}, carriers
    assert "**`PING`, `ACK`, `PING_REQ` and `NACK`**" in _spec_text()


# ---- §1.1: the empty GOODBYE that closes a retired duplicate


def test_empty_goodbye_bytes() -> None:
    assert encode_body(Goodbye()).hex() == "82a17405a6726561736f6ea0"
    assert decode_body(msgpack.packb({"t": 5})) == Goodbye()
    assert "`82 a1 74 05 a6 72 65 61 73 6f 6e a0`" in _spec_text()


def test_goodbye_is_a_normal_close() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.responder.receive_data(pair.initiator.close())
    events = drain(pair.responder)
    assert events == [ConnectionTerminated(None)]
    assert pair.responder.data_to_send() == b""  # nothing is sent in answer


# ---- §6.3: an invalid ERROR is answered, a valid one is not


def _responder() -> Connection:
    return Connection(role=Role.RESPONDER, identity=seeded_identity("spec"), mesh_secret=b"\x42" * 32,
                      options=HandshakeOptions("10.0.0.2:7946", Channel.CONTROL), now=0.0)


def _clear_frame(obj: object) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


@pytest.mark.parametrize("bad", [
    {"t": 4, "code": 70000}, {"t": 4, "code": -1}, {"t": 4, "code": True}, {"t": 4},
    {"t": 4, "code": 1, "reason": "x" * 257}, {"t": 4, "code": 1, "reason": b"bytes"},
    {"t": 5, "reason": 5},
])
def test_invalid_error_or_goodbye_is_answered_with_schema_violation(bad: dict[str, object]) -> None:
    conn = _responder()
    conn.receive_data(_clear_frame(bad))
    (event,) = drain(conn)
    assert isinstance(event, ConnectionTerminated) and event.error is not None
    reply = decode_body(conn.data_to_send()[HEADER.size:])
    assert isinstance(reply, ProtocolErrorMsg) and reply.code == ErrorCode.SCHEMA_VIOLATION


def test_valid_error_with_unknown_code_reads_as_internal_and_is_not_answered() -> None:
    conn = _responder()
    conn.receive_data(_clear_frame({"t": 4, "code": 999, "reason": "later code", "extra": 1}))
    (event,) = drain(conn)
    assert isinstance(event, ConnectionTerminated) and event.error is not None
    assert event.error.code is ErrorCode.INTERNAL
    assert conn.data_to_send() == b""


def test_invalid_sealed_error_after_the_handshake_is_answered_sealed() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.responder.receive_data(pair.inject(pair.initiator, msgpack.packb({"t": 4, "code": -1})))
    drain(pair.responder)
    pair.initiator.receive_data(pair.responder.data_to_send())
    (event,) = drain(pair.initiator)
    assert isinstance(event, ConnectionTerminated) and event.error is not None
    assert event.error.code is ErrorCode.SCHEMA_VIOLATION


# ---- §8.1: a node's first incarnation


def test_first_incarnation_is_one_and_a_restart_is_one_above(tmp_path: Path) -> None:
    assert start_incarnation(load_incarnation(tmp_path / "incarnation")) == 1
    (tmp_path / "incarnation").write_text("41\n")
    assert start_incarnation(load_incarnation(tmp_path / "incarnation")) == 42


# ---- §5.6: the key file's mode


def test_mesh_key_file_is_created_0600_and_needs_owner_only_mode(tmp_path: Path) -> None:
    path = tmp_path / "data" / "mesh.key"
    secret = create_mesh_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_mesh_key(path) == secret
    os.chmod(path, 0o400)
    assert load_mesh_key(path) == secret
    for mode in (0o640, 0o604, 0o644, 0o660):
        os.chmod(path, mode)
        with pytest.raises(ConfigError, match="chmod 600"):
            load_mesh_key(path)
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError):
        create_mesh_key(path)  # never overwritten
    assert load_mesh_key(path) == secret


# ---- §4.3: no capability names are defined; a node sends none


def test_node_sends_no_capabilities() -> None:
    assert HandshakeOptions("10.0.0.1:7946", Channel.CONTROL).capabilities == ()
    pair = ConnectionPair(initiator_options=HandshakeOptions("10.0.0.1:7946", Channel.CONTROL,
                                                             ("some-future-feature", "x.y/z")))
    pair.handshake()  # unknown names are accepted, not refused
    assert pair.responder.peer is not None
    assert pair.responder.peer.capabilities == ("some-future-feature", "x.y/z")
    assert pair.initiator.peer is not None and pair.initiator.peer.capabilities == ()
