"""Identity keys, the mesh secret file format, HKDF, and the record cipher's counter discipline."""

from __future__ import annotations

import pytest

from protocol.crypto import (
    Cipher,
    RecordCipher,
    counter_nonce,
    generate_identity,
    hkdf,
    identity_from_bytes,
    identity_to_bytes,
    mesh_secret_from_text,
    mesh_secret_to_text,
    new_mesh_secret,
    node_id_of,
    short_id,
)
from protocol.errors import ConfigError, ErrorCode, RemoteProtocolError
from protocol.testing import seeded_token_bytes


def test_identity_round_trips_through_bytes() -> None:
    key = generate_identity(seeded_token_bytes(1))
    raw = identity_to_bytes(key)
    assert len(raw) == 32
    assert node_id_of(identity_from_bytes(raw)) == node_id_of(key)
    assert len(node_id_of(key)) == 32


@pytest.mark.parametrize("bad", [b"", b"x" * 31, b"x" * 33])
def test_identity_from_bad_bytes(bad: bytes) -> None:
    with pytest.raises(ConfigError):
        identity_from_bytes(bad)


def test_short_id() -> None:
    assert short_id(bytes(range(32))) == "0001020304"


def test_mesh_secret_text_round_trip() -> None:
    secret = new_mesh_secret(seeded_token_bytes(2))
    text = mesh_secret_to_text(secret)
    assert "\n" not in text and text.startswith("starmesh-secret-v1:")
    assert mesh_secret_from_text(text) == secret
    assert mesh_secret_from_text(f"  {text}\n") == secret
    assert len(new_mesh_secret()) == 32


def test_mesh_secret_text_known_value() -> None:
    assert mesh_secret_to_text(bytes(32)) == "starmesh-secret-v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA:" + _check_of_zero()


def _check_of_zero() -> str:
    import hashlib

    return hashlib.sha256(b"starmesh mesh secret check" + bytes(32)).hexdigest()[:8]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: "",
        lambda t: "garbage",
        lambda t: t.replace("starmesh-secret-v1", "starmesh-secret-v2"),
        lambda t: t[:-1] + ("0" if t[-1] != "0" else "1"),  # checksum
        lambda t: t.split(":")[0] + ":" + t.split(":")[1][:-1] + ":" + t.split(":")[2],  # truncated key
        lambda t: t.split(":")[0] + ":" + "B" + t.split(":")[1][1:] + ":" + t.split(":")[2],  # typo
        lambda t: t.split(":")[0] + ":" + "+" + t.split(":")[1][1:] + ":" + t.split(":")[2],  # not base64url
        lambda t: t + ":extra",
        lambda t: t.split(":")[0] + ":" + t.split(":")[1][:-1] + chr(ord(t.split(":")[1][-1]) ^ 1) + ":" + t.split(":")[2],
        lambda t: t.replace(":", "\n", 1),
    ],
)
def test_mesh_secret_garbage_is_a_config_error(mutate: object) -> None:
    text = mesh_secret_to_text(new_mesh_secret(seeded_token_bytes(3)))
    with pytest.raises(ConfigError):
        mesh_secret_from_text(mutate(text))  # type: ignore[operator]


def test_hkdf_matches_rfc5869() -> None:
    # RFC 5869 appendix A, test cases 1 and 3.
    ikm = b"\x0b" * 22
    okm = hkdf(ikm, salt=bytes(range(13)), info=bytes(range(0xF0, 0xFA)), length=42)
    assert okm.hex() == "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    okm = hkdf(ikm, salt=b"", info=b"", length=42)
    assert okm.hex() == "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"


def test_counter_nonce_layout() -> None:
    assert counter_nonce(0) == bytes(12)
    assert counter_nonce(0x0102030405060708) == b"\x00\x00\x00\x00\x01\x02\x03\x04\x05\x06\x07\x08"


@pytest.mark.parametrize("cipher", list(Cipher))
def test_record_cipher_rejects_out_of_sequence(cipher: Cipher) -> None:
    key = bytes(range(32))
    tx, rx = RecordCipher(cipher, key), RecordCipher(cipher, key)
    sealed = [tx.seal(f"frame {k}".encode()) for k in range(3)]
    assert rx.open(sealed[0]) == b"frame 0"
    for bad in (sealed[0], sealed[2], sealed[1][:-1] + bytes([sealed[1][-1] ^ 1]), b"short"):
        with pytest.raises(RemoteProtocolError) as exc:
            rx.open(bad)
        assert exc.value.code is ErrorCode.DECRYPT_FAILED
        assert rx.counter == 1  # a failure does not advance the counter
    assert rx.open(memoryview(sealed[1])) == b"frame 1"


def test_record_cipher_known_answer() -> None:
    # Pins the nonce construction: AES-256-GCM, key 00..1f, counter 1, empty AD.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    tx = RecordCipher(Cipher.AES_256_GCM, bytes(range(32)))
    tx.seal(b"")
    expected = AESGCM(bytes(range(32))).encrypt(b"\x00" * 11 + b"\x01", b"hello", None)
    assert tx.seal(b"hello") == expected
