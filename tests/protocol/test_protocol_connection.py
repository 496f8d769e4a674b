"""Connection: handshake, exchange, and every way a peer can break the rules (two cores, no sockets)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import msgpack
import pytest

from protocol.connection import (
    NEED_DATA,
    Channel,
    Connection,
    ConnectionTerminated,
    ConnState,
    Event,
    HandshakeComplete,
    HandshakeOptions,
    MessageReceived,
    Role,
)
from protocol.crypto import Cipher, node_id_of
from protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocol.framing import HEADER, FrameDecoder
from protocol.handshake import HandshakeInit, ProtocolErrorMsg, init_bytes, init_mac_key
from protocol.limits import MAX_FRAME_BYTES, MAX_HANDSHAKE_FRAME_BYTES
from protocol.messages import Ack, Alive, Dead, NodeMeta, Ping, PushPull, StatusRequest
from protocol.schema import decode_body, encode_body
from protocol.testing import (
    ConnectionPair,
    drain,
    seeded_identity,
    seeded_token_bytes,
    terminated_with,
)

NODE_A = b"\x01" * 32
NODE_B = b"\x02" * 32
GOSSIP = [
    Ping(seq=7, target=NODE_B),
    Alive(incarnation=3, node=NODE_A, address="10.0.0.1:7946", meta=NodeMeta(hostname="a", cpus=8)),
    Dead(incarnation=4, node=NODE_B, sender=NODE_A),
]


def open_pair(**kwargs: object) -> ConnectionPair:
    pair = ConnectionPair(**kwargs)  # type: ignore[arg-type]
    pair.handshake()
    return pair


def error_code(events: Sequence[Event]) -> ErrorCode:
    term = terminated_with(events)
    assert isinstance(term.error, RemoteProtocolError), term
    return term.error.code


def frames_of(data: bytes) -> list[bytes]:
    """Split a written byte stream back into whole frames (prefix included)."""
    dec, out = FrameDecoder(), []
    dec.feed(data)
    while (body := dec.next_frame(max_size=MAX_FRAME_BYTES)) is not None:
        out.append(HEADER.pack(len(body)) + bytes(body))
    return out


# ---- the happy path ---------------------------------------------------------------------------


def test_handshake_authenticates_both_identities() -> None:
    pair = open_pair()
    i, r = pair.initiator, pair.responder
    assert i.state is r.state is ConnState.OPEN
    assert i.peer is not None and r.peer is not None
    assert i.peer.node_id == node_id_of(pair.responder_identity)
    assert r.peer.node_id == node_id_of(pair.initiator_identity)
    assert (i.peer.listen_address, r.peer.listen_address) == ("10.0.0.2:7946", "10.0.0.1:7946")
    assert r.peer.capabilities == ("gossip",) and i.peer.capabilities == ()
    assert i.peer.channel is r.peer.channel is Channel.CONTROL
    assert i.peer.protocol_version == r.peer.protocol_version == 1
    assert i.next_deadline() is None and r.next_deadline() is None


def test_channel_is_chosen_by_the_initiator() -> None:
    pair = open_pair(
        initiator_options=HandshakeOptions(None, Channel.CLIENT),
        responder_options=HandshakeOptions("10.0.0.2:7946", Channel.CONTROL),
    )
    assert pair.responder.peer is not None and pair.initiator.peer is not None
    assert pair.responder.peer.channel is Channel.CLIENT
    assert pair.responder.peer.listen_address is None
    assert pair.initiator.peer.channel is Channel.CLIENT


@pytest.mark.parametrize("cipher", list(Cipher))
def test_messages_flow_both_ways_with_each_cipher(cipher: Cipher) -> None:
    pair = open_pair(initiator_options=HandshakeOptions("10.0.0.1:1", Channel.BULK, ciphers=(cipher,)))
    pair.exchange(pair.initiator, GOSSIP)
    pair.exchange(pair.responder, [Ack(seq=7), StatusRequest()])
    pair.exchange(pair.initiator, [PushPull(members=())])


def test_one_byte_chunks_give_the_same_events() -> None:
    pair = open_pair()
    pair.exchange(pair.initiator, GOSSIP, split=lambda d: [d[k : k + 1] for k in range(len(d))])


def test_initiator_may_send_before_the_responder_has_seen_finish() -> None:
    pair = ConnectionPair()
    i, r = pair.initiator, pair.responder
    r.receive_data(i.data_to_send())
    assert drain(r) == []
    i.receive_data(r.data_to_send())
    assert [type(e) for e in drain(i)] == [HandshakeComplete]
    data = i.send(GOSSIP[0])  # carries the pending FINISH first
    assert i.data_to_send() == b""
    r.receive_data(data)
    events = drain(r)
    assert [type(e) for e in events] == [HandshakeComplete, MessageReceived]
    assert events[1] == MessageReceived(GOSSIP[0])


def test_goodbye_closes_both_sides_cleanly() -> None:
    pair = open_pair()
    pair.initiator.receive_data(pair.responder.close(reason="shutting down"))
    assert drain(pair.initiator) == [ConnectionTerminated(None)]
    assert pair.initiator.state is ConnState.CLOSED and pair.responder.state is ConnState.CLOSED
    assert drain(pair.responder) == [ConnectionTerminated(None)]
    assert pair.responder.close() == b""


def test_close_with_code_reports_it_to_the_peer() -> None:
    pair = open_pair()
    pair.responder.receive_data(pair.initiator.close(ErrorCode.SHUTTING_DOWN, "bye"))
    assert error_code(drain(pair.responder)) is ErrorCode.SHUTTING_DOWN
    assert pair.responder.state is ConnState.ERROR
    assert pair.responder.data_to_send() == b""  # no answer to an ERROR


def test_close_during_handshake_is_understood() -> None:
    pair = ConnectionPair()
    pair.responder.receive_data(pair.initiator.close())
    assert drain(pair.responder) == [ConnectionTerminated(None)]


def test_clean_eof_when_open_is_a_normal_close() -> None:
    pair = open_pair()
    pair.responder.receive_data(b"")
    assert drain(pair.responder) == [ConnectionTerminated(None)]
    assert pair.responder.state is ConnState.CLOSED


def test_after_termination_nothing_more_happens() -> None:
    pair = open_pair()
    pair.responder.receive_data(b"\x00\x00\x00\x00")
    assert error_code(drain(pair.responder)) is ErrorCode.MALFORMED_FRAME
    pair.responder.receive_data(pair.initiator.send(GOSSIP[0]))
    assert pair.responder.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError):
        pair.responder.send(GOSSIP[0])
    pair.responder.handle_timer(now=1e9)
    assert pair.responder.next_event() is NEED_DATA


def test_send_is_refused_before_open_and_for_connection_messages() -> None:
    pair = ConnectionPair()
    with pytest.raises(LocalProtocolError):
        pair.initiator.send(GOSSIP[0])
    pair.handshake()
    with pytest.raises(LocalProtocolError):
        pair.initiator.send(ProtocolErrorMsg(code=1))
    with pytest.raises(LocalProtocolError):
        pair.initiator.send(HandshakeInit(min_version=1, max_version=1, version=1, ciphers=(1,),
                                          ephemeral=bytes(32), nonce=bytes(32), mac=bytes(32)))


# ---- a peer without the mesh secret -----------------------------------------------------------


def test_wrong_mesh_secret_is_rejected_before_anything_is_revealed() -> None:
    pair = ConnectionPair(secret=b"\x01" * 32, responder_secret=b"\x02" * 32)
    init = pair.initiator.data_to_send()
    pair.responder.receive_data(init)
    assert error_code(drain(pair.responder)) is ErrorCode.AUTH_FAILED
    reply = pair.responder.data_to_send()
    for secret_thing in (node_id_of(pair.responder_identity), b"10.0.0.2"):
        assert secret_thing not in reply
    for secret_thing in (node_id_of(pair.initiator_identity), b"10.0.0.1", b"gossip"):
        assert secret_thing not in init
    assert [type(decode_body(f[4:])) for f in frames_of(reply)] == [ProtocolErrorMsg]
    pair.initiator.receive_data(reply)
    assert error_code(drain(pair.initiator)) is ErrorCode.AUTH_FAILED
    assert pair.initiator.state is pair.responder.state is ConnState.ERROR


def test_initiator_rejects_a_responder_without_the_secret() -> None:
    # An impostor responder that skips the MAC check still cannot seal its identity.
    honest = ConnectionPair(secret=b"\x01" * 32)
    impostor = ConnectionPair(secret=b"\x02" * 32, seed=1)
    impostor.responder.receive_data(impostor.initiator.data_to_send())
    drain(impostor.responder)
    honest.initiator.data_to_send()
    honest.initiator.receive_data(impostor.responder.data_to_send())
    assert error_code(drain(honest.initiator)) is ErrorCode.AUTH_FAILED


def test_replayed_init_gets_an_attacker_nowhere() -> None:
    original = ConnectionPair(seed=3)
    recorded_init = original.initiator.data_to_send()
    original.responder.receive_data(recorded_init)
    drain(original.responder)
    original.initiator.receive_data(original.responder.data_to_send())
    drain(original.initiator)
    recorded_rest = original.initiator.send(GOSSIP[0])  # FINISH + a data frame

    victim = Connection(  # the same responder identity, a fresh ephemeral key
        role=Role.RESPONDER, identity=original.responder_identity, mesh_secret=b"\x42" * 32,
        options=HandshakeOptions("10.0.0.2:7946", Channel.CONTROL), now=0.0, token_bytes=seeded_token_bytes("fresh"),
    )
    victim.receive_data(recorded_init)
    assert drain(victim) == []
    response = victim.data_to_send()
    assert node_id_of(original.responder_identity) not in response
    victim.receive_data(recorded_rest)
    assert error_code(drain(victim)) is ErrorCode.AUTH_FAILED
    assert victim.peer is None


def test_replayed_init_alone_times_out() -> None:
    pair = ConnectionPair(handshake_timeout=5.0)
    init = pair.initiator.data_to_send()
    victim = ConnectionPair(seed=9, now=100.0).responder
    victim.receive_data(init)
    assert drain(victim) == [] and victim.data_to_send()
    victim.handle_timer(now=105.0)
    assert error_code(drain(victim)) is ErrorCode.HANDSHAKE_TIMEOUT


# ---- version and cipher negotiation -------------------------------------------------------------


def test_version_mismatch_is_a_typed_error_on_both_sides() -> None:
    pair = ConnectionPair(initiator_options=HandshakeOptions(None, Channel.CLIENT, min_version=2, max_version=3, version=3))
    ev_i, ev_r = pair.pump()
    assert error_code(ev_r) is ErrorCode.VERSION_MISMATCH
    assert error_code(ev_i) is ErrorCode.VERSION_MISMATCH


@pytest.mark.parametrize(
    ("initiator", "responder", "chosen"),
    [((1, 2, 2), (1, 3, 3), 2), ((1, 1, 2), (1, 2, 2), 1), ((1, 2, 2), (2, 2, 3), 2), ((2, 5, 5), (1, 2, 2), 2)],
)
def test_version_negotiation_picks_the_lower_current(
    initiator: tuple[int, int, int], responder: tuple[int, int, int], chosen: int
) -> None:
    lo, cur, hi = initiator
    rlo, rcur, rhi = responder
    pair = open_pair(
        initiator_options=HandshakeOptions(None, Channel.CLIENT, min_version=lo, version=cur, max_version=hi),
        responder_options=HandshakeOptions(None, Channel.CONTROL, min_version=rlo, version=rcur, max_version=rhi),
    )
    assert pair.initiator.peer is not None and pair.initiator.peer.protocol_version == chosen
    assert pair.responder.peer is not None and pair.responder.peer.protocol_version == chosen


def test_no_common_cipher() -> None:
    pair = ConnectionPair(
        initiator_options=HandshakeOptions(None, Channel.CLIENT, ciphers=(Cipher.CHACHA20_POLY1305,)),
        responder_options=HandshakeOptions(None, Channel.CONTROL, ciphers=(Cipher.AES_256_GCM,)),
    )
    ev_i, ev_r = pair.pump()
    assert error_code(ev_r) is ErrorCode.VERSION_MISMATCH
    assert error_code(ev_i) is ErrorCode.VERSION_MISMATCH


def test_initiator_preference_wins() -> None:
    pair = open_pair(
        initiator_options=HandshakeOptions(None, Channel.CLIENT, ciphers=(Cipher.CHACHA20_POLY1305, Cipher.AES_256_GCM)),
    )
    assert pair.initiator._tx is not None and pair.initiator._tx.cipher is Cipher.CHACHA20_POLY1305


# ---- tampered, replayed, reordered, dropped -----------------------------------------------------


def _two_frames(pair: ConnectionPair) -> list[bytes]:
    return frames_of(pair.initiator.send_many(GOSSIP[:2]))


@pytest.mark.parametrize("where", [4, 10, -1])
def test_tampered_frame_is_rejected_and_reported(where: int) -> None:
    pair = open_pair()
    frame = bytearray(_two_frames(pair)[0])
    frame[where] ^= 0x20
    pair.responder.receive_data(bytes(frame))
    assert error_code(drain(pair.responder)) is ErrorCode.DECRYPT_FAILED
    pair.initiator.receive_data(pair.responder.data_to_send())  # the ERROR frame is sealed and readable
    assert error_code(drain(pair.initiator)) is ErrorCode.DECRYPT_FAILED


@pytest.mark.parametrize(
    "order", [[0, 0], [1, 0], [1], [0, 1, 1]], ids=["replayed", "reordered", "dropped", "replayed-later"]
)
def test_frames_out_of_sequence_are_rejected(order: list[int]) -> None:
    pair = open_pair()
    frames = _two_frames(pair)
    events = []
    for k in order:
        pair.responder.receive_data(frames[k])
        events.extend(drain(pair.responder))
    assert error_code(events) is ErrorCode.DECRYPT_FAILED
    assert [e for e in events if isinstance(e, MessageReceived)] == [MessageReceived(GOSSIP[k]) for k in order[: len(events) - 1]]


def test_tampered_response_fails_authentication() -> None:
    pair = ConnectionPair()
    pair.responder.receive_data(pair.initiator.data_to_send())
    drain(pair.responder)
    response = bytearray(pair.responder.data_to_send())
    response[-40] ^= 1  # inside the sealed identity
    pair.initiator.receive_data(bytes(response))
    assert error_code(drain(pair.initiator)) is ErrorCode.AUTH_FAILED
    pair.responder.receive_data(pair.initiator.data_to_send())
    assert error_code(drain(pair.responder)) is ErrorCode.AUTH_FAILED


def test_tampered_finish_fails_authentication() -> None:
    pair = ConnectionPair()
    pair.responder.receive_data(pair.initiator.data_to_send())
    drain(pair.responder)
    pair.initiator.receive_data(pair.responder.data_to_send())
    drain(pair.initiator)
    finish = bytearray(pair.initiator.data_to_send())
    finish[len(finish) // 2] ^= 1  # inside the sealed identity
    pair.responder.receive_data(bytes(finish))
    assert error_code(drain(pair.responder)) is ErrorCode.AUTH_FAILED
    pair.initiator.receive_data(pair.responder.data_to_send())
    assert isinstance(terminated_with(drain(pair.initiator)).error, RemoteProtocolError)


def test_low_order_ephemeral_key_is_rejected() -> None:
    secret = b"\x42" * 32
    draft = HandshakeInit(min_version=1, max_version=1, version=1, ciphers=(1,), ephemeral=bytes(32),
                          nonce=bytes(32), mac=bytes(32))
    from protocol import crypto

    init = dataclasses.replace(draft, mac=crypto.hmac_sha256(init_mac_key(secret), init_bytes(draft)))
    responder = ConnectionPair(secret=secret).responder
    body = encode_body(init)
    responder.receive_data(HEADER.pack(len(body)) + body)
    assert error_code(drain(responder)) is ErrorCode.AUTH_FAILED


# ---- malformed input ------------------------------------------------------------------------------


def _plain(obj: object) -> bytes:
    body = bytes(msgpack.packb(obj))
    return HEADER.pack(len(body)) + body


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (HEADER.pack(MAX_HANDSHAKE_FRAME_BYTES + 1), ErrorCode.FRAME_TOO_LARGE),
        (HEADER.pack(0), ErrorCode.MALFORMED_FRAME),
        (HEADER.pack(1) + b"\xc1", ErrorCode.BAD_MSGPACK),
        (_plain([1, 2]), ErrorCode.SCHEMA_VIOLATION),
        (_plain({"t": 999}), ErrorCode.UNKNOWN_MESSAGE),
        (_plain({"t": 16, "seq": 1, "target": NODE_A}), ErrorCode.UNEXPECTED_MESSAGE),
        (_plain({"t": 2}), ErrorCode.UNEXPECTED_MESSAGE),
        (_plain({"t": 1, "min_version": "1"}), ErrorCode.SCHEMA_VIOLATION),
        (_plain({"t": 1, "min_version": 2, "max_version": 1, "version": 1, "ciphers": [1],
                 "ephemeral": NODE_A, "nonce": NODE_A, "mac": NODE_A}), ErrorCode.SCHEMA_VIOLATION),
    ],
    ids=["oversize", "empty", "bad-msgpack", "not-a-map", "unknown-tag", "gossip-in-handshake",
         "response-to-responder", "wrong-type", "bad-range"],
)
def test_responder_rejects_bad_first_flights(data: bytes, code: ErrorCode) -> None:
    responder = ConnectionPair().responder
    responder.receive_data(data)
    assert error_code(drain(responder)) is code
    assert responder.state is ConnState.ERROR
    [reply] = [decode_body(f[4:]) for f in frames_of(responder.data_to_send())]
    assert isinstance(reply, ProtocolErrorMsg) and reply.error_code() is code


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"\xc1", ErrorCode.BAD_MSGPACK),
        (msgpack.packb({"t": 999}), ErrorCode.UNKNOWN_MESSAGE),
        (msgpack.packb({"t": 79}), ErrorCode.UNKNOWN_MESSAGE),
        (msgpack.packb({"t": 16, "seq": "7", "target": NODE_A}), ErrorCode.SCHEMA_VIOLATION),
        (msgpack.packb({"t": 16, "seq": 1 << 32, "target": NODE_A}), ErrorCode.SCHEMA_VIOLATION),
        (msgpack.packb({"t": 16, "seq": 1, "target": NODE_A[:31]}), ErrorCode.SCHEMA_VIOLATION),
        (msgpack.packb({"t": 16, "seq": 1}), ErrorCode.SCHEMA_VIOLATION),
        (msgpack.packb({"t": 16, "seq": 1, "target": msgpack.ExtType(1, b"x")}), ErrorCode.BAD_MSGPACK),
        (msgpack.packb({"t": 3, "sealed": bytes(32)}), ErrorCode.UNEXPECTED_MESSAGE),
        (msgpack.packb({"t": 16, "seq": 1, "target": NODE_A}) + b"\x00", ErrorCode.BAD_MSGPACK),
    ],
    ids=["bad-msgpack", "unknown-tag", "unassigned-tag", "wrong-type", "out-of-range", "short-bytes",
         "missing-field", "ext-type", "handshake-after-open", "trailing-bytes"],
)
def test_open_connection_rejects_bad_messages(body: bytes, code: ErrorCode) -> None:
    pair = open_pair()
    pair.responder.receive_data(pair.inject(pair.initiator, body))
    assert error_code(drain(pair.responder)) is code
    pair.initiator.receive_data(pair.responder.data_to_send())
    assert error_code(drain(pair.initiator)) is code  # reported back, sealed


def test_oversize_frame_is_rejected_from_its_header() -> None:
    pair = open_pair()
    pair.responder.receive_data(HEADER.pack(MAX_FRAME_BYTES + 1))
    assert error_code(drain(pair.responder)) is ErrorCode.FRAME_TOO_LARGE
    assert pair.responder.buffered_bytes == 0


def test_error_with_an_unknown_code_still_terminates() -> None:
    pair = open_pair()
    pair.responder.receive_data(pair.inject(pair.initiator, msgpack.packb({"t": 4, "code": 999, "reason": "?"})))
    assert error_code(drain(pair.responder)) is ErrorCode.INTERNAL


@pytest.mark.parametrize("keep", [0, 2, 20])
def test_truncated_handshake(keep: int) -> None:
    pair = ConnectionPair()
    pair.responder.receive_data(pair.initiator.data_to_send()[:keep])
    pair.responder.receive_data(b"")
    assert error_code(drain(pair.responder)) is ErrorCode.MALFORMED_FRAME


def test_eof_inside_a_frame_when_open() -> None:
    pair = open_pair()
    pair.responder.receive_data(pair.initiator.send(GOSSIP[0])[:-1])
    pair.responder.receive_data(b"")
    assert error_code(drain(pair.responder)) is ErrorCode.MALFORMED_FRAME


# ---- time -----------------------------------------------------------------------------------------


def test_handshake_timeout_on_virtual_time() -> None:
    pair = ConnectionPair(now=10.0, handshake_timeout=2.5)
    r = pair.responder
    assert r.next_deadline() == 12.5
    r.handle_timer(now=12.4)
    assert (r.next_event(), r.state) == (NEED_DATA, ConnState.HANDSHAKING)
    r.handle_timer(now=12.5)
    assert r.state is ConnState.ERROR and r.next_deadline() is None
    assert error_code(drain(r)) is ErrorCode.HANDSHAKE_TIMEOUT
    [frame] = frames_of(r.data_to_send())
    assert decode_body(frame[4:]) == ProtocolErrorMsg(code=int(ErrorCode.HANDSHAKE_TIMEOUT), reason="handshake did not complete within 2.5 s")


def test_deadline_is_cleared_when_open() -> None:
    pair = ConnectionPair(now=0.0)
    assert pair.initiator.next_deadline() == 5.0
    pair.handshake()
    pair.initiator.handle_timer(now=100.0)
    assert pair.initiator.state is ConnState.OPEN


def test_construction_is_deterministic_with_injected_randomness() -> None:
    assert ConnectionPair(seed=5).initiator.data_to_send() == ConnectionPair(seed=5).initiator.data_to_send()
    assert ConnectionPair(seed=5).initiator.data_to_send() != ConnectionPair(seed=6).initiator.data_to_send()


def test_responder_identity_is_never_sent_in_clear() -> None:
    pair = ConnectionPair()
    written = []
    for _ in range(3):
        for conn in (pair.initiator, pair.responder):
            drain(conn)
            data = conn.data_to_send()
            written.append(data)
            if data:
                pair.other(conn).receive_data(data)
    blob = b"".join(written)
    assert node_id_of(seeded_identity("0:i")) not in blob and node_id_of(seeded_identity("0:r")) not in blob
    assert pair.initiator.state is pair.responder.state is ConnState.OPEN


def test_connection_requires_a_usable_mesh_secret() -> None:
    from protocol.errors import ConfigError

    with pytest.raises(ConfigError):
        Connection(role=Role.INITIATOR, identity=seeded_identity(1), mesh_secret=b"short",
                   options=HandshakeOptions(None, Channel.CLIENT), now=0.0)


def test_container_bomb_is_rejected_cheaply() -> None:
    # 1-byte empty maps cost ~60 bytes each once unpacked: the container cap stops the amplification.
    bomb = b"\xdd" + (65_535).to_bytes(4, "big") + b"\x80" * 65_535
    body = b"\x82\xa1t\x10\xa1x\xdc\x00\x03" + bomb * 3
    pair = open_pair()
    pair.responder.receive_data(pair.inject(pair.initiator, body))
    assert error_code(drain(pair.responder)) is ErrorCode.BAD_MSGPACK


def test_unknown_keys_are_ignored_for_forward_compatibility() -> None:
    pair = open_pair()
    body = msgpack.packb({"t": 18, "seq": 5, "added_in_v2": [1, 2, 3]})
    pair.responder.receive_data(pair.inject(pair.initiator, body))
    assert drain(pair.responder) == [MessageReceived(Ack(seq=5))]


def test_close_right_after_the_response_still_sends_finish_first() -> None:
    pair = ConnectionPair()
    pair.responder.receive_data(pair.initiator.data_to_send())
    drain(pair.responder)
    pair.initiator.receive_data(pair.responder.data_to_send())
    drain(pair.initiator)
    pair.responder.receive_data(pair.initiator.close(reason="changed my mind"))
    assert [type(e) for e in drain(pair.responder)] == [HandshakeComplete, ConnectionTerminated]
    assert pair.responder.state is ConnState.CLOSED


def test_exhausted_send_counter_refuses_to_wrap() -> None:
    from protocol.crypto import MAX_COUNTER

    pair = open_pair()
    assert pair.initiator._tx is not None
    pair.initiator._tx.counter = MAX_COUNTER
    with pytest.raises(LocalProtocolError) as exc:
        pair.initiator.send(GOSSIP[0])
    assert exc.value.code is ErrorCode.LIMIT_EXCEEDED


def test_large_message_pipelined_behind_finish() -> None:
    import numpy as np

    from protocol.messages.tensor import ArPart
    from protocol.tensor import CodecSpec, encode_chunk

    values = np.arange(600_000, dtype=np.float32)
    big = ArPart(round_id=bytes(16), slice=1, chunk=2, data=encode_chunk(values, CodecSpec.parse("none")))
    pair = ConnectionPair()
    pair.responder.receive_data(pair.initiator.data_to_send())
    drain(pair.responder)
    pair.initiator.receive_data(pair.responder.data_to_send())
    drain(pair.initiator)
    data = pair.initiator.send_many([big, GOSSIP[0], big])  # FINISH, then 2.4 MB, small, 2.4 MB
    events = []
    for k in range(0, len(data), 100_003):
        pair.responder.receive_data(data[k : k + 100_003])
        events.extend(drain(pair.responder))
        assert pair.responder.buffered_bytes <= 4 + MAX_FRAME_BYTES
    assert events[0] == HandshakeComplete(pair.responder.peer)  # type: ignore[arg-type]
    assert events[1:] == [MessageReceived(big), MessageReceived(GOSSIP[0]), MessageReceived(big)]
