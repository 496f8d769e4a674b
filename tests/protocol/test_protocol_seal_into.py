"""RecordCipher.seal_into (the send path's in-place seal) matches seal frame for frame."""

from __future__ import annotations

import pytest

from protocol.crypto import TAG_BYTES, Cipher, RecordCipher


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
