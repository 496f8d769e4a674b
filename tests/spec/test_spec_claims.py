"""Statements of PROTOCOL.md that a second implementation had to guess, checked against the code.

Each test names the section whose sentence it keeps true. The byte-level vectors live in
``test_spec_vectors.py``; these are the behaviours around them: which channel carries which
message (§4.7), the tag table (§3.3), every field of the task and submitter messages (§12,
§13), which messages carry piggybacked gossip (§8), the empty GOODBYE (§1.1), what an invalid
ERROR gets (§6.3), the first incarnation (§8.1), the key file's mode (§5.6), the capabilities
a node sends (§4.3).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

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
from protocol.messages import tasks as task_messages
from protocol.messages.gossip import NODE_ID, Ack, Alive, Dead, Nack, Ping, PingReq, Suspect
from protocol.messages.submitters import SubmitterEntry
from protocol.messages.tasks import QueryOp, SubtaskState, TaskErrorCode, TaskState
from protocol.schema import (
    REGISTRY,
    Bool,
    Bytes,
    EnumOf,
    Float,
    ListOf,
    Optional,
    Spec,
    Str,
    StructOf,
    UInt,
    decode_body,
    encode_body,
)
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


#: Replies a node sends on CLIENT links and never receives there (a client matches them by ``req``).
CLIENT_REPLIES = {MsgType.STATUS_REPLY, MsgType.TASK_ACCEPTED, MsgType.TASK_ERROR,
                  MsgType.TASK_QUERY_REPLY, MsgType.TASK_CANCELLED, MsgType.SUBMITTERS_REPLY,
                  MsgType.BLOB_DATA, MsgType.BLOB_LIST_REPLY, MsgType.BLOB_REPLY, MsgType.BLOB_REPLICAS}


def _services() -> list[Any]:
    """One uninitialised instance of every service that registers handlers."""
    from node.blobs.service import BlobService
    from node.submitters.service import SubmitterService
    from node.tasks.service import TaskService

    return [object.__new__(cls) for cls in (AllReduceService, StatusService, SubmitterService, TaskService,
                                            BlobService)]


def test_channel_table_is_what_the_node_dispatches() -> None:
    served: dict[Channel, set[MsgType]] = collections.defaultdict(set)
    served[Channel.CONTROL] |= set(GOSSIP_TAGS)
    for service in _services():
        for channel, tag in service.handlers():
            served[channel].add(tag)
    table = _channel_table()
    assert table[Channel.CONTROL] == served[Channel.CONTROL]
    assert table[Channel.BULK] == served[Channel.BULK] == {MsgType.AR_PART, MsgType.AR_AVERAGE,
                                                           MsgType.BLOB_CHUNK_GET, MsgType.BLOB_CHUNK}
    # the node receives only the requests on CLIENT; the replies go the other way
    assert not served[Channel.CLIENT] & CLIENT_REPLIES
    assert table[Channel.CLIENT] == served[Channel.CLIENT] | CLIENT_REPLIES


# ---- §3.3: the tag table


def test_tag_table_is_the_code() -> None:
    """Every row of §3.3 lists ``number `NAME``` pairs; together they are exactly ``MsgType``."""
    listed: dict[int, str] = {}
    for line in _section("### 3.3 Type tag table").splitlines():
        if line.startswith("| ") and not line.startswith(("| range", "| ---")):
            for num, name in re.findall(r"(\d+) `([A-Z_]+)`", line.split("|")[2]):
                assert int(num) not in listed, num
                listed[int(num)] = name
    assert listed == {int(t): t.name for t in MsgType}
    assert set(REGISTRY) == set(MsgType)  # every tag has its message class


# ---- §12, §13: every field of every task and submitter message and struct


def _notation(s: Spec) -> str:
    """A field spec in the notation of §3.1."""
    if s is NODE_ID:
        return "node id"
    if isinstance(s, UInt):
        return f"uint{s.bits}"
    if isinstance(s, Float):
        def num(x: float) -> str:
            return "" if math.isinf(x) else f"{x:g}"
        return f"float[{num(s.lo)}..{num(s.hi)}]"
    if isinstance(s, Bool):
        return "bool"
    if isinstance(s, Bytes):
        return f"bin[{s.min_len}..{s.max_len}]"
    if isinstance(s, Str):
        return f"str[<={s.max_len}]"
    if isinstance(s, EnumOf):
        return f"enum {s.enum_cls.__name__}"
    if isinstance(s, Optional):
        return _notation(s.inner) + "?"
    if isinstance(s, ListOf):
        return f"array<{_notation(s.item)}>[<={s.max_len}]"
    if isinstance(s, StructOf):
        return s.cls.__name__
    raise AssertionError(f"no notation for {s!r}")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _message_tables(text: str) -> dict[str, list[list[str]]]:
    """``| `NAME` (tag) | `field` | type | meaning |`` rows (continuations: empty first cell)."""
    out: dict[str, list[list[str]]] = {}
    current: str | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = _cells(line)
        m = re.fullmatch(r"`([A-Z_]+)` \((\d+)\)", cells[0])
        if m:
            assert MsgType[m.group(1)] == int(m.group(2)), cells[0]
            current = m.group(1)
            out.setdefault(current, [])
        elif cells[0]:
            current = None
        if current is not None and len(cells) == 4:
            out[current].append(cells[1:])
    return out


def _struct_tables(text: str) -> dict[str, list[list[str]]]:
    """The table after each ``<!-- fields:Name -->`` marker: ``| `field` | type | meaning |``."""
    out: dict[str, list[list[str]]] = {}
    for m in re.finditer(r"<!-- fields:(\w+) -->\n((?:\|.*\n)+)", text):
        out[m.group(1)] = [_cells(line) for line in m.group(2).splitlines()[2:]]
    return out


def _check_rows(cls: type, rows: list[list[str]]) -> None:
    fields = dataclasses.fields(cls)
    assert [r[0].strip("`") for r in rows] == [f.name for f in fields], cls.__name__
    for f, (_, typ, _meaning) in zip(fields, rows, strict=True):
        s = f.metadata["starmesh_spec"]
        got = re.match(r"`([^`]*)`", typ)
        assert got is not None and got.group(1) == _notation(s), (cls.__name__, f.name, typ, _notation(s))
        has_default = f.default is not dataclasses.MISSING
        assert ("optional" in typ) == has_default, (cls.__name__, f.name, typ)


def test_task_message_tables_are_the_code() -> None:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    section = text[text.index("## 12. Tasks"):text.index("## 13. ")]
    tables = _message_tables(section)
    task_tags = [t for t in MsgType if 80 <= t <= 103]
    assert set(tables) == {t.name for t in task_tags}
    for tag in task_tags:
        _check_rows(REGISTRY[tag], tables[tag.name])
    structs = _struct_tables(section)
    assert set(structs) == {"Resources", "Submission", "TaskSeed", "Ballot", "Failure", "WorkItem",
                            "Outcome", "TaskSummary", "SubtaskReport"}
    for name, rows in structs.items():
        _check_rows(getattr(task_messages, name), rows)
    for enum_cls in (TaskState, SubtaskState, QueryOp, TaskErrorCode):
        row = next(line for line in section.splitlines() if line.startswith(f"| `{enum_cls.__name__}` |"))
        assert re.findall(r"(\d+) `([A-Z_]+)`", row) == [(str(int(v)), v.name) for v in enum_cls]


def test_submitter_message_table_names_every_field() -> None:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    section = text[text.index("## 13. "):]
    for tag in (t for t in MsgType if 104 <= t <= 111):
        row = next(line for line in section.splitlines() if line.startswith(f"| `{tag.name}` ({int(tag)}) |"))
        names = {f.name for f in dataclasses.fields(REGISTRY[tag])}
        assert names == set(re.findall(r"`([a-z_]+)`", _cells(row)[1])), tag.name
    entry = _section("### 13.2 The log")
    listed = re.findall(r"^\| `([a-z_]+)` \|", entry, re.M)
    assert listed == [f.name for f in dataclasses.fields(SubmitterEntry)]


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


def test_training_struct_tables_are_the_code() -> None:
    from protocol.messages import training

    text = PROTOCOL_MD.read_text(encoding="utf-8")
    structs = _struct_tables(text[text.index("## 15. Training jobs"):])
    assert set(structs) == {"Option", "ShardCursor", "JobSpec", "Seat", "Export", "SeatReport", "GroupEvent",
                            "SegmentRecord", "SeatProgress", "JobProgress"}
    for name, rows in structs.items():
        _check_rows(getattr(training, name), rows)
