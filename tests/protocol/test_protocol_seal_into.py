"""RecordCipher.seal_into and seal_parts_into (the send path's in-place seals) match seal frame for frame."""

from __future__ import annotations

import itertools

import pytest

from protocol.crypto import TAG_BYTES, Cipher, RecordCipher
from protocol.errors import LocalProtocolError


@pytest.mark.parametrize("cipher", list(Cipher))
def test_seal_into_matches_seal_and_advances_the_counter(cipher: Cipher) -> None:
    key = bytes(range(32))
    a, b, rx = RecordCipher(cipher, key), RecordCipher(cipher, key), RecordCipher(cipher, key)
    for k, text in enumerate((b"", b"frame one", bytes(range(256)) * 300)):
        out = bytearray(4 + len(text) + TAG_BYTES)
        b.seal_into(memoryview(text), memoryview(out)[4:])
        assert bytes(out[4:]) == a.seal(text)
        assert out[:4] == b"\0\0\0\0" and b.counter == k + 1
        assert rx.open(out[4:]) == text


@pytest.mark.parametrize("cipher", list(Cipher))
@pytest.mark.parametrize("cuts", [(), (0,), (1,), (15, 16, 17), (5, 5, 4000), (70000,)])
def test_seal_parts_into_matches_seal_of_the_joined_parts(cipher: Cipher, cuts: tuple[int, ...]) -> None:
    key = bytes(range(32))
    a, b, rx = RecordCipher(cipher, key), RecordCipher(cipher, key), RecordCipher(cipher, key)
    text = bytes(range(256)) * 400
    bounds = (0, *cuts, len(text))
    parts = [memoryview(text)[lo:hi] for lo, hi in itertools.pairwise(bounds)]
    for k in range(2):  # the counter advances once per frame, whatever the number of parts
        out = bytearray(len(text) + TAG_BYTES)
        b.seal_parts_into(parts, memoryview(out))
        assert bytes(out) == a.seal(text) and b.counter == k + 1
        assert rx.open(out) == text


def test_seal_parts_into_refuses_a_frame_of_the_wrong_size() -> None:
    with pytest.raises(LocalProtocolError):
        RecordCipher(Cipher.AES_256_GCM, bytes(32)).seal_parts_into([b"abc"], memoryview(bytearray(3 + TAG_BYTES + 1)))
