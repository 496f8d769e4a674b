"""Blob ids and manifests (sans-I/O): the content id of ``node.bundles.manifest``, decoded back.

A blob id is ``content_id(data)``: SHA-256 over ``b"starmesh manifest v1"`` and the canonical
msgpack manifest of the 1 MiB chunk digests (``node.bundles.manifest``, the same id bundles
have). ``decode_manifest(blob_id, data)`` accepts only the canonical encoding whose digest is
``blob_id``, within ``MAX_BLOB_BYTES``: a manifest that passes names every chunk's digest, so
each chunk can be checked on arrival, whoever sent it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from node.bundles.manifest import CHUNK_BYTES, VERSION, Manifest
from protocol.errors import RemoteProtocolError, StarmeshError
from protocol.schema import unpack_body

#: Largest blob: 64 GiB, 65,536 chunks (a manifest of about 2.1 MB).
MAX_BLOB_BYTES = 64 * 1024 ** 3
MAX_CHUNKS = MAX_BLOB_BYTES // CHUNK_BYTES
#: Largest encoded manifest (msgpack of ``MAX_CHUNKS`` 32-byte digests plus the header).
MAX_MANIFEST_BYTES = MAX_CHUNKS * 34 + 64
ID_BYTES = 32


class BlobError(StarmeshError):
    """A blob or manifest is malformed, too large, or not what its id says."""


def chunk_count(size: int) -> int:
    return -(-size // CHUNK_BYTES)


def chunk_range(manifest: Manifest, index: int) -> tuple[int, int]:
    """``(offset, length)`` of chunk ``index``."""
    offset = index * manifest.chunk
    return offset, min(manifest.chunk, manifest.size - offset)


def decode_manifest(blob_id: bytes, data: bytes) -> Manifest:
    """The manifest ``data`` encodes, if it is canonical and its digest is ``blob_id``; else
    ``BlobError``."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise BlobError(f"manifest of {len(data)} bytes, over the limit of {MAX_MANIFEST_BYTES}")
    try:
        raw = unpack_body(bytes(data), what="blob manifest")
    except RemoteProtocolError as exc:
        raise BlobError(f"manifest is not valid msgpack: {exc}") from None
    if type(raw) is not dict or list(raw) != ["v", "size", "chunk", "chunks"]:
        raise BlobError("manifest is not the map {v, size, chunk, chunks}")
    size, chunk, chunks = raw["size"], raw["chunk"], raw["chunks"]
    if raw["v"] != VERSION or type(raw["v"]) is not int:
        raise BlobError(f"manifest version {raw['v']!r:.20} is not {VERSION}")
    if type(size) is not int or not 0 <= size <= MAX_BLOB_BYTES:
        raise BlobError(f"manifest size {size!r:.30} is not in 0..{MAX_BLOB_BYTES}")
    if chunk != CHUNK_BYTES or type(chunk) is not int:
        raise BlobError(f"manifest chunk size {chunk!r:.30} is not {CHUNK_BYTES}")
    if type(chunks) is not list or len(chunks) != chunk_count(size):
        raise BlobError(f"manifest lists {len(chunks) if type(chunks) is list else '?'} chunks, "
                        f"not the {chunk_count(size)} of {size} bytes")
    if not all(type(c) is bytes and len(c) == 32 for c in chunks):
        raise BlobError("manifest chunk digests are not 32-byte strings")
    manifest = Manifest(size=size, chunk=chunk, chunks=tuple(chunks))
    if manifest.digest != blob_id:
        raise BlobError(f"manifest digest {manifest.digest.hex()[:16]}... is not the blob id "
                        f"{bytes(blob_id).hex()[:16]}...")
    return manifest


def check_chunk(manifest: Manifest, index: int, data: bytes | memoryview) -> None:
    """``BlobError`` unless ``data`` is chunk ``index`` of ``manifest``."""
    if not 0 <= index < len(manifest.chunks):
        raise BlobError(f"chunk {index} is out of range (the blob has {len(manifest.chunks)})")
    if len(data) != chunk_range(manifest, index)[1] or hashlib.sha256(data).digest() != manifest.chunks[index]:
        raise BlobError(f"chunk {index} does not match its digest")


class ManifestBuilder:
    """Chunk digests of bytes fed in any pieces, in order (``feed``, then ``manifest()``)."""

    def __init__(self) -> None:
        self._digests: list[bytes] = []
        self._current = hashlib.sha256()
        self._filled = 0
        self.size = 0

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            take = min(CHUNK_BYTES - self._filled, view.nbytes)
            self._current.update(view[:take])
            self._filled += take
            self.size += take
            view = view[take:]
            if self._filled == CHUNK_BYTES:
                self._digests.append(self._current.digest())
                self._current, self._filled = hashlib.sha256(), 0
        if self.size > MAX_BLOB_BYTES:
            raise BlobError(f"blob over the limit of {MAX_BLOB_BYTES} bytes")

    def manifest(self) -> Manifest:
        digests = list(self._digests)
        if self._filled:
            digests.append(self._current.digest())
        return Manifest(size=self.size, chunk=CHUNK_BYTES, chunks=tuple(digests))


def bitmap(indices: Iterable[int], count: int) -> bytes:
    """The chunks held, one bit each (chunk ``i``: byte ``i // 8``, bit ``i % 8``, LSB first)."""
    out = bytearray(-(-count // 8))
    for i in indices:
        out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


def from_bitmap(bits: bytes, count: int) -> set[int]:
    """``bitmap``'s inverse; bits past ``count`` are ignored."""
    return {i for i in range(min(count, len(bits) * 8)) if bits[i >> 3] >> (i & 7) & 1}
