"""A second, independent implementation of PROTOCOL.md §2-§5 (an initiator written from the
document alone, with raw primitives: hmac, hashlib, X25519/Ed25519, AEAD, msgpack) talks to
our responder ``Connection``. It also recomputes the test vectors printed in PROTOCOL.md §5.8."""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from pathlib import Path
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from protocol.connection import (
    Channel,
    Connection,
    HandshakeComplete,
    HandshakeOptions,
    MessageReceived,
    Role,
)
from protocol.messages import Ack, Ping
from protocol.testing import drain

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "PROTOCOL.md"

SECRET = bytes(range(32))
ID_I, ID_R = b"\x11" * 32, b"\x22" * 32  # Ed25519 private seeds
EPH_I, NONCE_I = b"\x33" * 32, b"\x44" * 32
EPH_R, NONCE_R = b"\x55" * 32, b"\x66" * 32


def hkdf(ikm: bytes, salt: bytes, info: bytes, n: int) -> bytes:
    """RFC 5869 HKDF-SHA256, written out."""
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for i in range((n + 31) // 32):
        block = hmac.new(prk, block + info + bytes([i + 1]), hashlib.sha256).digest()
        okm += block
    return okm[:n]


def sha256(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def unframe(data: bytes) -> list[bytes]:
    out = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        out.append(data[4 : 4 + n])
        data = data[4 + n :]
    return out


def aead(cipher: int, key: bytes) -> AESGCM | ChaCha20Poly1305:
    return AESGCM(key) if cipher == 1 else ChaCha20Poly1305(key)


def nonce(counter: int) -> bytes:
    return b"\x00" * 4 + struct.pack(">Q", counter)


def fixed_tokens(*chunks: bytes) -> Any:
    queue = list(chunks)

    def token_bytes(n: int) -> bytes:
        out = queue.pop(0)
        assert len(out) == n
        return out

    return token_bytes


def run_reference_handshake(cipher_pref: list[int]) -> dict[str, bytes]:
    """Reference initiator vs our responder; returns every intermediate value (hex vectors)."""
    v: dict[str, bytes] = {}
    responder = Connection(
        role=Role.RESPONDER, identity=Ed25519PrivateKey.from_private_bytes(ID_R), mesh_secret=SECRET,
        options=HandshakeOptions("10.0.0.2:7946", Channel.CONTROL), now=0.0,
        token_bytes=fixed_tokens(EPH_R, NONCE_R),
    )
    e_i = X25519PrivateKey.from_private_bytes(EPH_I)
    pub_i = e_i.public_key().public_bytes_raw()
    # INIT (§4.2)
    ib = struct.pack(">HHHB", 1, 1, 1, len(cipher_pref)) + bytes(cipher_pref) + pub_i + NONCE_I
    v["init_mac_key"] = hkdf(SECRET, b"", b"starmesh-v1 init mac", 32)
    v["init_bytes"] = ib
    v["init_mac"] = hmac.new(v["init_mac_key"], ib, hashlib.sha256).digest()
    init = {"t": 1, "min_version": 1, "max_version": 1, "version": 1, "ciphers": cipher_pref,
            "ephemeral": pub_i, "nonce": NONCE_I, "mac": v["init_mac"]}
    responder.receive_data(frame(msgpack.packb(init)))
    assert drain(responder) == []
    # RESPONSE (§4.3)
    [body] = unframe(responder.data_to_send())
    resp = msgpack.unpackb(body)
    assert resp["t"] == 2 and resp["version"] == 1 and resp["cipher"] == cipher_pref[0]
    c = resp["cipher"]
    rb = struct.pack(">HB", resp["version"], c) + resp["ephemeral"] + resp["nonce"]
    v["response_bytes"], v["sealed_r"] = rb, resp["sealed"]
    v["th2"] = sha256(b"starmesh-v1 transcript", ib, v["init_mac"], rb)
    v["dh"] = e_i.exchange(X25519PublicKey.from_public_bytes(resp["ephemeral"]))
    hs = hkdf(v["dh"], SECRET, b"starmesh-v1 handshake keys" + v["th2"], 64)
    v["hs_key_i2r"], v["hs_key_r2i"] = hs[:32], hs[32:]
    v["responder_identity"] = aead(c, v["hs_key_r2i"]).decrypt(nonce(0), resp["sealed"], v["th2"])
    who = msgpack.unpackb(v["responder_identity"])
    Ed25519PublicKey.from_public_bytes(who["node_id"]).verify(who["signature"], b"starmesh-v1 responder signature" + v["th2"])
    assert who["node_id"] == Ed25519PrivateKey.from_private_bytes(ID_R).public_key().public_bytes_raw()
    assert who["listen_address"] == "10.0.0.2:7946"
    # FINISH (§4.4)
    v["th3"] = sha256(v["th2"], resp["sealed"])
    me = Ed25519PrivateKey.from_private_bytes(ID_I)
    ident = {"node_id": me.public_key().public_bytes_raw(),
             "signature": me.sign(b"starmesh-v1 initiator signature" + v["th3"]),
             "channel": 1, "listen_address": "10.0.0.1:7946", "capabilities": ["gossip"]}
    v["initiator_identity"] = msgpack.packb(ident)
    sealed_i = v["sealed_i"] = aead(c, v["hs_key_i2r"]).encrypt(nonce(0), v["initiator_identity"], v["th3"])
    v["th4"] = sha256(v["th3"], sealed_i)
    sk = hkdf(v["dh"], SECRET, b"starmesh-v1 session keys" + v["th4"], 64)
    v["key_i2r"], v["key_r2i"] = sk[:32], sk[32:]
    # Records (§5.5): FINISH in clear, then a sealed Ping in the same write.
    ping = {"t": 16, "seq": 1, "target": b"\x07" * 32}
    v["ping_frame"] = frame(aead(c, v["key_i2r"]).encrypt(nonce(0), msgpack.packb(ping), None))
    responder.receive_data(frame(msgpack.packb({"t": 3, "sealed": sealed_i})) + v["ping_frame"])
    events = drain(responder)
    assert isinstance(events[0], HandshakeComplete), events
    assert events[0].peer.node_id == ident["node_id"] and events[0].peer.channel is Channel.BULK
    assert events[0].peer.capabilities == ("gossip",)
    assert events[1:] == [MessageReceived(Ping(seq=1, target=b"\x07" * 32))]
    # Our responder's first record back decrypts with the reference key and counter 0, then 1.
    data = responder.send(Ack(seq=1)) + responder.send(Ack(seq=2))
    got = [msgpack.unpackb(aead(c, v["key_r2i"]).decrypt(nonce(k), b, None)) for k, b in enumerate(unframe(data))]
    assert got == [{"t": 18, "seq": 1}, {"t": 18, "seq": 2}]
    return v


def test_reference_initiator_interoperates_aes() -> None:
    run_reference_handshake([1, 2])


def test_reference_initiator_interoperates_chacha() -> None:
    run_reference_handshake([2])


def test_protocol_md_vectors_match() -> None:
    """The hex test vectors in PROTOCOL.md §5.8 are what this reference computes."""
    text = PROTOCOL_MD.read_text()
    block = re.search(r"<!-- vectors:begin -->(.*?)<!-- vectors:end -->", text, re.S)
    assert block, "PROTOCOL.md has no test-vector block"
    documented = dict(re.findall(r"^([a-z0-9_]+)\s*=\s*([0-9a-f]+)\s*$", block.group(1), re.M))
    computed = {k: b.hex() for k, b in run_reference_handshake([1, 2]).items()}
    assert documented == computed
