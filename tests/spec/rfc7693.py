"""BLAKE2b written from RFC 7693 alone (plus the key, salt and personalization words of the
BLAKE2 paper's parameter block): the independent check of every BLAKE2b digest in the spec
vectors (``test_spec_vectors.py``, ``test_spec_task_vectors.py``). Not a test module: the tests
load it by path (the test directories are not packages).
"""

from __future__ import annotations

import struct

_MASK = (1 << 64) - 1
_IV = (
    0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
    0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179,
)  # fmt: skip
_SIGMA = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
    (14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3),
    (11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4),
    (7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8),
    (9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13),
    (2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9),
    (12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11),
    (13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10),
    (6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5),
    (10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0),
)


def _rotr(x: int, n: int) -> int:
    return ((x >> n) | (x << (64 - n))) & _MASK


def _compress(h: list[int], block: bytes, t: int, last: bool) -> None:
    """RFC 7693 §3.2, function F."""
    m = struct.unpack("<16Q", block)
    v = [*h, *_IV]
    v[12] ^= t & _MASK
    v[13] ^= t >> 64
    if last:
        v[14] ^= _MASK

    def g(a: int, b: int, c: int, d: int, x: int, y: int) -> None:
        v[a] = (v[a] + v[b] + x) & _MASK
        v[d] = _rotr(v[d] ^ v[a], 32)
        v[c] = (v[c] + v[d]) & _MASK
        v[b] = _rotr(v[b] ^ v[c], 24)
        v[a] = (v[a] + v[b] + y) & _MASK
        v[d] = _rotr(v[d] ^ v[a], 16)
        v[c] = (v[c] + v[d]) & _MASK
        v[b] = _rotr(v[b] ^ v[c], 63)

    for i in range(12):
        s = _SIGMA[i % 10]
        g(0, 4, 8, 12, m[s[0]], m[s[1]])
        g(1, 5, 9, 13, m[s[2]], m[s[3]])
        g(2, 6, 10, 14, m[s[4]], m[s[5]])
        g(3, 7, 11, 15, m[s[6]], m[s[7]])
        g(0, 5, 10, 15, m[s[8]], m[s[9]])
        g(1, 6, 11, 12, m[s[10]], m[s[11]])
        g(2, 7, 8, 13, m[s[12]], m[s[13]])
        g(3, 4, 9, 14, m[s[14]], m[s[15]])
    for i in range(8):
        h[i] ^= v[i] ^ v[i + 8]


def parameter_block(nn: int, *, person: bytes, salt: bytes = bytes(16), kk: int = 0) -> list[int]:
    """Words p[0..7] XORed into the IV: p[0] = 0x01010000 ^ (kk << 8) ^ nn (kk: key bytes;
    fanout 1, depth 1), p[4..5] = salt, p[6..7] = personalization, little-endian words."""
    assert len(person) == 16 and len(salt) == 16 and 0 <= kk <= 64
    return [0x01010000 ^ (kk << 8) ^ nn, 0, 0, 0, *struct.unpack("<2Q", salt), *struct.unpack("<2Q", person)]


def rfc7693_blake2b(data: bytes, *, nn: int, person: bytes, key: bytes = b"") -> bytes:
    """BLAKE2b of ``data`` with an ``nn``-byte digest and a 16-byte personalization; with a
    ``key`` (at most 64 bytes) the key, zero-padded to 128 bytes, is the first block (§3.3)."""
    h = [iv ^ p for iv, p in zip(_IV, parameter_block(nn, person=person, kk=len(key)), strict=True)]
    if key:
        data = key.ljust(128, b"\0") + data
    blocks = [data[i : i + 128] for i in range(0, len(data), 128)] or [b""]
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        t = len(data) if last else 128 * (i + 1)
        _compress(h, block.ljust(128, b"\0"), t, last)
    return struct.pack("<8Q", *h)[:nn]

