"""A complete session as exact bytes, for a foreign implementation (PROTOCOL.md §2, §4, §5):
``tests/protocol/vectors/session_large_first_record.json``.

The session's first sealed frame (an ``AR_PART``, written right behind ``HANDSHAKE_FINISH``
in the same write) is over 4 KiB, and so is the responder's first sealed frame: a receiver
must apply the 4 KiB cap of frames read during the handshake (``MAX_HANDSHAKE_FRAME_BYTES``)
only until its own handshake completed, and the 8 MiB cap from the very next frame on, even
when that frame arrived in the same read as FINISH.

Everything is fixed: the mesh secret, both Ed25519 identity seeds and both sides' random
bytes (each side draws, through its one ``token_bytes`` function, 32 bytes for its X25519
ephemeral private key and then 32 bytes for its nonce). Ed25519 signatures and the AEADs are
deterministic, so the transcript is too. The inputs are those of the inline vectors of §5.8,
so the handshake frames agree with them.

This module builds the session with the real ``Connection``s and asserts the file is
unchanged, byte for byte; it also checks the file from the spec's own words alone (HKDF,
X25519, the AEADs and the frame layout, without ``protocol``), so the file, the spec and the
code cannot drift apart. Regenerate after an intended change of the wire (review the diff):

    .venv/bin/python tests/protocol/test_protocol_session_vector.py --write

File format: a JSON object; byte strings are lowercase hex in wire order.

* ``about``: what it shows, naming the sections.
* ``inputs``: ``mesh_secret``; ``cipher_offer`` (ids, preferred first); per side
  (``initiator``, ``responder``): ``identity_seed`` (Ed25519 private seed),
  ``ephemeral_private`` (X25519), ``nonce``, ``listen_address``, ``capabilities`` and, for
  the initiator, ``channel``.
* ``derived``: node ids, ephemeral public keys, ``th2``, ``th3``, ``th4`` and the session keys
  ``key_i2r`` / ``key_r2i`` (§5.3, §5.4), to check a port step by step.
* ``frames``: every frame of the session in order, each with ``from`` (the side that writes
  it), ``write`` (frames with the same number are written together, in one ``send``),
  ``message`` (its type), ``sealed`` and, if sealed, ``counter`` (its frame counter in that
  direction, §5.5), ``body_bytes`` (the length the prefix announces), ``plaintext`` (the
  msgpack message body) and ``frame`` (the exact bytes on the wire: u32 length prefix, then
  the body: the plaintext itself, or AEAD-Seal(key, nonce(counter), plaintext, ad = "")).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.connection import (
    Channel,
    Connection,
    ConnectionTerminated,
    HandshakeComplete,
    HandshakeOptions,
    MessageReceived,
    Role,
)
from protocol.framing import HEADER, FrameDecoder
from protocol.limits import MAX_FRAME_BYTES, MAX_HANDSHAKE_FRAME_BYTES
from protocol.messages.tensor import ArAverage, ArPart
from protocol.tags import MsgType
from protocol.tensor import CodecSpec, encode_chunk
from protocol.testing import drain

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VECTOR = HERE / "vectors" / "session_large_first_record.json"

SECRET = bytes(range(32))
ID_I, ID_R = b"\x11" * 32, b"\x22" * 32  # Ed25519 private seeds
EPH_I, NONCE_I = b"\x33" * 32, b"\x44" * 32
EPH_R, NONCE_R = b"\x55" * 32, b"\x66" * 32
CIPHERS = (1, 2)
I_ADDRESS, R_ADDRESS = "10.0.0.1:7946", "10.0.0.2:7946"
I_CAPS = ("gossip",)

ABOUT = ("PROTOCOL.md §2, §4, §5.5: one complete session (BULK channel, AES-256-GCM chosen), "
         "every frame as the exact bytes written. The initiator's first sealed frame, an AR_PART "
         "written behind HANDSHAKE_FINISH in the same write, and the responder's first sealed "
         "frame, an AR_AVERAGE, are both over 4 KiB: the 4 KiB cap of §2 applies only to frames "
         "read before the receiver's handshake completed. Inputs as in the vectors of §5.8; each "
         "side draws 32 random bytes for its X25519 private key, then 32 for its nonce.")


def fixed_tokens(*chunks: bytes) -> Any:
    """``token_bytes`` that hands out ``chunks`` in order (and fails on any other draw)."""
    queue = list(chunks)

    def token_bytes(n: int) -> bytes:
        out = queue.pop(0)
        assert len(out) == n
        return out

    return token_bytes


def messages() -> tuple[ArPart, ArAverage]:
    """The session's two large messages: 1,200 float32 values each (4,800 payload bytes)."""
    values = (np.arange(1200, dtype=np.float32) - 600) / 8
    part = ArPart(round_id=bytes(range(16)), slice=1, chunk=0,
                  data=encode_chunk(values, CodecSpec.parse("none"), offset=1200))
    average = ArAverage(round_id=bytes(range(16)), epoch=0, slice=1, chunk=0,
                        data=encode_chunk(values / 2, CodecSpec.parse("none"), offset=1200))
    return part, average


def frames_of(data: bytes) -> list[bytes]:
    dec, out = FrameDecoder(), []
    dec.feed(data)
    while (body := dec.next_frame(max_size=MAX_FRAME_BYTES)) is not None:
        out.append(HEADER.pack(len(body)) + bytes(body))
    assert dec.buffered == 0
    return out


def run_session() -> tuple[list[tuple[str, bytes]], dict[str, list[Any]]]:
    """Both sides, back to back: the writes, in order, as (side, bytes), and every side's events."""
    initiator = Connection(
        role=Role.INITIATOR, identity=Ed25519PrivateKey.from_private_bytes(ID_I), mesh_secret=SECRET,
        options=HandshakeOptions(I_ADDRESS, Channel.BULK, I_CAPS), now=0.0,
        token_bytes=fixed_tokens(EPH_I, NONCE_I),
    )
    responder = Connection(
        role=Role.RESPONDER, identity=Ed25519PrivateKey.from_private_bytes(ID_R), mesh_secret=SECRET,
        options=HandshakeOptions(R_ADDRESS, Channel.CONTROL), now=0.0,
        token_bytes=fixed_tokens(EPH_R, NONCE_R),
    )
    part, average = messages()
    writes: list[tuple[str, bytes]] = []
    events: dict[str, list[Any]] = {"initiator": [], "responder": []}

    def write(side: str, data: bytes | bytearray | memoryview) -> None:
        writes.append((side, bytes(data)))
        peer, name = (responder, "responder") if side == "initiator" else (initiator, "initiator")
        peer.receive_data(bytes(data))
        events[name].append(drain(peer))

    write("initiator", initiator.data_to_send())  # INIT
    write("responder", responder.data_to_send())  # RESPONSE
    write("initiator", initiator.send(part))  # FINISH + the first sealed frame, in one write
    write("responder", responder.send(average))
    write("initiator", initiator.close())  # GOODBYE
    return writes, events


def _hex(b: bytes) -> str:
    return b.hex()


def build() -> dict[str, Any]:
    writes, events = run_session()
    part, average = messages()
    # What each side saw: the handshake, the large frames, the close. The responder got the
    # AR_PART from the same read as FINISH, so its frame cap was lifted in between.
    assert [type(e) for e in events["initiator"][0]] == [HandshakeComplete]
    assert events["initiator"][1] == [MessageReceived(average)]
    assert events["responder"][0] == []
    assert [type(e) for e in events["responder"][1]] == [HandshakeComplete, MessageReceived]
    assert events["responder"][1][1] == MessageReceived(part)
    assert events["responder"][2] == [ConnectionTerminated(None)]
    d = derived()
    keys = {"initiator": bytes.fromhex(d["key_i2r"]), "responder": bytes.fromhex(d["key_r2i"])}
    counters = {"initiator": 0, "responder": 0}
    sealed_from = {"initiator": 2, "responder": 1}  # clear frames each side writes before it seals
    written = {"initiator": 0, "responder": 0}
    frames: list[dict[str, Any]] = []
    for index, (side, data) in enumerate(writes):
        for frame in frames_of(data):
            body = frame[HEADER.size :]
            entry: dict[str, Any] = {"from": side, "write": index}
            if written[side] >= sealed_from[side]:
                counter = counters[side]
                counters[side] += 1
                plaintext = _aead(1, keys[side]).decrypt(_nonce(counter), body, None)
                entry |= {"sealed": True, "counter": counter}
            else:
                plaintext = body
                entry |= {"sealed": False}
            written[side] += 1
            entry = {"message": MsgType(msgpack.unpackb(plaintext)["t"]).name, **entry,
                     "body_bytes": len(body), "plaintext": _hex(plaintext), "frame": _hex(frame)}
            frames.append(entry)
    return {
        "about": ABOUT,
        "inputs": {
            "mesh_secret": _hex(SECRET),
            "cipher_offer": list(CIPHERS),
            "initiator": {"identity_seed": _hex(ID_I), "ephemeral_private": _hex(EPH_I), "nonce": _hex(NONCE_I),
                          "channel": int(Channel.BULK), "listen_address": I_ADDRESS, "capabilities": list(I_CAPS)},
            "responder": {"identity_seed": _hex(ID_R), "ephemeral_private": _hex(EPH_R), "nonce": _hex(NONCE_R),
                          "listen_address": R_ADDRESS, "capabilities": []},
        },
        "derived": d,
        "frames": frames,
    }


# ---- the spec's own words, without ``protocol`` -------------------------------------------


def _hkdf(ikm: bytes, salt: bytes, info: bytes, n: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=salt or None, info=info).derive(ikm)


def _sha256(*parts: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    for p in parts:
        h.update(p)
    return h.finalize()


def _aead(cipher: int, key: bytes) -> AESGCM | ChaCha20Poly1305:
    return AESGCM(key) if cipher == 1 else ChaCha20Poly1305(key)


def _nonce(counter: int) -> bytes:
    return b"\x00" * 4 + struct.pack(">Q", counter)


def derived() -> dict[str, str]:
    """§5.3-§5.4 from the inputs and the two clear flights the code writes (their
    ``sealed`` fields are hashed as sent)."""
    writes, _ = run_session()
    init = msgpack.unpackb(frames_of(writes[0][1])[0][HEADER.size :])
    resp = msgpack.unpackb(frames_of(writes[1][1])[0][HEADER.size :])
    finish = msgpack.unpackb(frames_of(writes[2][1])[0][HEADER.size :])
    e_i, e_r = X25519PrivateKey.from_private_bytes(EPH_I), X25519PrivateKey.from_private_bytes(EPH_R)
    ib = (struct.pack(">HHHB", init["min_version"], init["max_version"], init["version"], len(init["ciphers"]))
          + bytes(init["ciphers"]) + init["ephemeral"] + init["nonce"])
    rb = struct.pack(">HB", resp["version"], resp["cipher"]) + resp["ephemeral"] + resp["nonce"]
    th2 = _sha256(b"starmesh-v1 transcript", ib, init["mac"], rb)
    th3 = _sha256(th2, resp["sealed"])
    th4 = _sha256(th3, finish["sealed"])
    dh = e_i.exchange(X25519PublicKey.from_public_bytes(e_r.public_key().public_bytes_raw()))
    sk = _hkdf(dh, SECRET, b"starmesh-v1 session keys" + th4, 64)
    return {
        "initiator_node_id": _hex(Ed25519PrivateKey.from_private_bytes(ID_I).public_key().public_bytes_raw()),
        "responder_node_id": _hex(Ed25519PrivateKey.from_private_bytes(ID_R).public_key().public_bytes_raw()),
        "initiator_ephemeral_public": _hex(e_i.public_key().public_bytes_raw()),
        "responder_ephemeral_public": _hex(e_r.public_key().public_bytes_raw()),
        "th2": _hex(th2), "th3": _hex(th3), "th4": _hex(th4),
        "key_i2r": _hex(sk[:32]), "key_r2i": _hex(sk[32:]),
    }


def _dump(obj: object) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _load() -> Any:
    assert VECTOR.exists(), f"{VECTOR} is missing: run {Path(__file__).relative_to(ROOT)} --write"
    return json.loads(VECTOR.read_text(encoding="utf-8"))


# ---- tests -------------------------------------------------------------------------------


def test_the_code_reproduces_the_session_byte_for_byte() -> None:
    assert _load() == json.loads(_dump(build())), (
        f"{VECTOR.name} differs from what the code writes; if the change of the wire is intended, "
        f"regenerate it (--write) and update PROTOCOL.md")


def test_the_first_sealed_frames_are_over_the_handshake_cap() -> None:
    frames = _load()["frames"]
    assert [f["message"] for f in frames] == ["HANDSHAKE_INIT", "HANDSHAKE_RESPONSE", "HANDSHAKE_FINISH",
                                              "AR_PART", "AR_AVERAGE", "GOODBYE"]
    finish, first, reply = frames[2], frames[3], frames[4]
    assert first["sealed"] and first["counter"] == 0 and first["write"] == finish["write"]
    assert reply["sealed"] and reply["counter"] == 0 and reply["from"] == "responder"
    for f in (first, reply):
        assert MAX_HANDSHAKE_FRAME_BYTES < f["body_bytes"] <= MAX_FRAME_BYTES
    assert all(f["body_bytes"] <= MAX_HANDSHAKE_FRAME_BYTES for f in frames[:3])


def test_the_file_checks_out_from_the_spec_alone() -> None:
    """What a port does with the file: every frame is u32 length || body; a clear body is the
    plaintext; a sealed one opens with the direction's key at its counter; the derived keys
    follow from the inputs (§5.4)."""
    v = _load()
    d = v["derived"]
    assert d == derived()
    keys = {"initiator": bytes.fromhex(d["key_i2r"]), "responder": bytes.fromhex(d["key_r2i"])}
    expected_counter = {"initiator": 0, "responder": 0}
    for f in v["frames"]:
        frame, plaintext = bytes.fromhex(f["frame"]), bytes.fromhex(f["plaintext"])
        (length,) = struct.unpack(">I", frame[:4])
        body = frame[4:]
        assert length == len(body) == f["body_bytes"]
        if f["sealed"]:
            assert f["counter"] == expected_counter[f["from"]]
            expected_counter[f["from"]] += 1
            assert _aead(1, keys[f["from"]]).decrypt(_nonce(f["counter"]), body, None) == plaintext
        else:
            assert body == plaintext
        assert MsgType(msgpack.unpackb(plaintext)["t"]).name == f["message"]


def test_a_responder_fed_the_files_bytes_accepts_the_session() -> None:
    """Replaying the initiator's writes of the file to a fresh responder (with the file's
    inputs) reproduces the responder's writes exactly, and it takes the large first frame
    from the same read as FINISH."""
    writes: dict[int, bytes] = {}
    for f in _load()["frames"]:
        writes[f["write"]] = writes.get(f["write"], b"") + bytes.fromhex(f["frame"])
    responder = Connection(
        role=Role.RESPONDER, identity=Ed25519PrivateKey.from_private_bytes(ID_R), mesh_secret=SECRET,
        options=HandshakeOptions(R_ADDRESS, Channel.CONTROL), now=0.0, token_bytes=fixed_tokens(EPH_R, NONCE_R),
    )
    part, average = messages()
    responder.receive_data(writes[0])
    assert drain(responder) == [] and responder.data_to_send() == writes[1]
    responder.receive_data(writes[2])
    events = drain(responder)
    assert [type(e) for e in events] == [HandshakeComplete, MessageReceived] and events[1] == MessageReceived(part)
    assert bytes(responder.send(average)) == writes[3]
    responder.receive_data(writes[4])
    assert drain(responder) == [ConnectionTerminated(None)]


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {sys.argv[0]} --write   (regenerates {VECTOR})")
    VECTOR.parent.mkdir(parents=True, exist_ok=True)
    VECTOR.write_text(_dump(build()), encoding="utf-8")
    print(f"wrote {VECTOR}")
