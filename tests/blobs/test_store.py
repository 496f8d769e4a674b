"""The blob store: ids as bundles have them, bounds, LRU eviction, pins, gc, fetches in
progress, and crash safety (a torn write is never served after a restart)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from node.blobs.manifest import BlobError, ManifestBuilder, bitmap, decode_manifest, from_bitmap
from node.blobs.store import BlobStore, StoreFull
from node.bundles.manifest import CHUNK_BYTES, content_id, manifest_of

MiB = 1 << 20


def _data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def test_put_bytes_and_file_give_the_bundle_content_id(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs", max_bytes=64 * MiB)
    data = _data(3 * MiB + 5)
    blob_id = store.put_bytes(data)
    assert blob_id == content_id(data)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    assert store.put_file(src) == blob_id  # same bytes, same id, stored once
    path = store.path(blob_id)
    assert path is not None and path.read_bytes() == data
    assert store.read_chunk(blob_id, 3) == data[3 * MiB:]
    assert store.read_chunk(blob_id, 4) is None
    assert store.manifest(blob_id) == manifest_of(data)
    assert [i.blob_id for i in store.list()] == [blob_id]
    assert store.put_bytes(b"") == content_id(b"")
    assert not [p for p in (tmp_path / "blobs").iterdir() if p.name.startswith(".tmp-")]


def test_manifest_builder_in_odd_pieces_and_bitmaps() -> None:
    data = _data(2 * MiB + 77, seed=2)
    builder = ManifestBuilder()
    for i in range(0, len(data), 300_001):
        builder.feed(data[i:i + 300_001])
    assert builder.manifest() == manifest_of(data)
    assert from_bitmap(bitmap({0, 3, 9}, 10), 10) == {0, 3, 9}
    assert from_bitmap(b"\xff\xff", 10) == set(range(10))


def test_decode_manifest_accepts_only_the_canonical_one_of_the_id() -> None:
    data = _data(MiB + 1, seed=3)
    manifest = manifest_of(data)
    assert decode_manifest(manifest.digest, manifest.encode()) == manifest
    with pytest.raises(BlobError, match="not the blob id"):
        decode_manifest(b"\x00" * 32, manifest.encode())
    with pytest.raises(BlobError):
        decode_manifest(manifest.digest, manifest.encode()[:-1])  # truncated
    with pytest.raises(BlobError, match="over the limit"):
        decode_manifest(manifest.digest, b"\x00" * (3 << 20))  # oversized


def test_lru_eviction_keeps_within_the_bound(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs", max_bytes=3 * MiB)
    ids = [store.put_bytes(_data(MiB, seed=i)) for i in range(3)]
    assert store.used_bytes == 3 * MiB
    assert store.read_chunk(ids[0], 0) is not None  # a read: ids[0] is now the most recent
    store._blobs[ids[0]].last_used += 100  # (mtime resolution: make the order explicit)
    new = store.put_bytes(_data(MiB, seed=9))
    assert not store.has(ids[1]) and store.has(ids[0]) and store.has(ids[2]) and store.has(new)
    assert store.used_bytes <= 3 * MiB
    assert store.stats()["blob_store_evictions_total"] == 1
    with pytest.raises(StoreFull, match="does not fit"):
        store.put_bytes(_data(4 * MiB))


def test_pins_are_never_evicted_and_survive_a_restart(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs", max_bytes=2 * MiB)
    a = store.put_bytes(_data(MiB, seed=1))
    b = store.put_bytes(_data(MiB, seed=2))
    store.pin(a)
    store.pin(b)
    with pytest.raises(StoreFull, match="pinned"):
        store.put_bytes(_data(MiB, seed=3))
    assert store.has(a) and store.has(b)
    store.unpin(b)
    reopened = BlobStore(tmp_path / "blobs", max_bytes=2 * MiB)
    assert reopened.pinned(a) and not reopened.pinned(b)
    c = reopened.put_bytes(_data(MiB, seed=3))
    assert reopened.has(a) and reopened.has(c) and not reopened.has(b)


def test_gc_drops_every_unpinned_blob_and_idle_partials(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs", max_bytes=16 * MiB)
    a = store.put_bytes(_data(MiB, seed=1))
    b = store.put_bytes(_data(MiB, seed=2))
    store.pin(a)
    other = _data(2 * MiB, seed=5)
    m = manifest_of(other)
    store.begin(m.digest, m)
    store.write_chunk(m.digest, 0, other[:MiB])
    assert store.gc() == 2 * MiB
    assert store.has(a) and not store.has(b) and store.manifest(m.digest) is None


def test_a_fetch_writes_verified_chunks_resumes_and_finishes(tmp_path: Path) -> None:
    data = _data(3 * MiB - 10, seed=7)
    m = manifest_of(data)
    store = BlobStore(tmp_path / "blobs", max_bytes=16 * MiB)
    assert store.begin(m.digest, m) == set()
    store.write_chunk(m.digest, 2, data[2 * MiB:])
    with pytest.raises(BlobError, match="digest"):
        store.write_chunk(m.digest, 0, data[MiB:2 * MiB])  # unverified bytes are never kept
    with pytest.raises(BlobError, match="out of range"):
        store.write_chunk(m.digest, 3, b"x")
    assert store.read_chunk(m.digest, 2) == data[2 * MiB:]  # served while still fetching
    assert store.chunks_held(m.digest) == {2}
    assert not store.has(m.digest)
    reopened = BlobStore(tmp_path / "blobs", max_bytes=16 * MiB)
    assert reopened.begin(m.digest, m) == {2}  # resumed after a restart
    reopened.write_chunk(m.digest, 0, data[:MiB])
    with pytest.raises(BlobError, match="missing"):
        reopened.finish(m.digest)
    reopened.write_chunk(m.digest, 1, data[MiB:2 * MiB])
    path = reopened.finish(m.digest)
    assert path.read_bytes() == data and reopened.has(m.digest)
    assert reopened.chunks_held(m.digest) is None
    assert not (tmp_path / "blobs" / "partial" / m.digest.hex()).exists()


def test_a_torn_write_is_never_served_after_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    store = BlobStore(root, max_bytes=16 * MiB)
    data = _data(2 * MiB, seed=11)
    m = manifest_of(data)
    # killed mid-write of a whole blob: a temporary file, or a manifest whose data never landed
    (root / ".tmp-abc").write_bytes(data[:MiB])
    (root / f"{m.digest.hex()}.manifest").write_bytes(m.encode())
    # a data file without its manifest, and one cut short
    other = _data(MiB, seed=12)
    (root / content_id(other).hex()).write_bytes(other)
    good = store.put_bytes(_data(MiB, seed=13))
    short = store.put_bytes(_data(MiB, seed=14))
    with open(root / short.hex(), "r+b") as f:
        f.truncate(1000)
    # a partial fetch whose chunk file is corrupt (a disk that lied)
    part = _data(2 * MiB, seed=15)
    pm = manifest_of(part)
    store.begin(pm.digest, pm)
    store.write_chunk(pm.digest, 0, part[:MiB])
    store.write_chunk(pm.digest, 1, part[MiB:])
    (root / "partial" / pm.digest.hex() / "1").write_bytes(b"torn")
    reopened = BlobStore(root, max_bytes=16 * MiB)
    assert [i.blob_id for i in reopened.list()] == [good]
    assert not reopened.has(m.digest) and reopened.read_chunk(m.digest, 0) is None
    assert not reopened.has(content_id(other)) and not reopened.has(short)
    assert sorted(p.name for p in root.iterdir()) == sorted(["partial", good.hex(), f"{good.hex()}.manifest"])
    assert reopened.begin(pm.digest, pm) == {0}  # the torn chunk is checked and dropped
    assert reopened.read_chunk(pm.digest, 1) is None


def test_a_partial_fetch_reserves_its_room(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs", max_bytes=3 * MiB)
    data = _data(2 * MiB, seed=21)
    m = manifest_of(data)
    store.begin(m.digest, m)
    with pytest.raises(StoreFull):
        store.put_bytes(_data(2 * MiB, seed=22))
    store.put_bytes(_data(MiB, seed=23))
    assert os.path.isdir(tmp_path / "blobs" / "partial" / m.digest.hex())
    assert MiB == CHUNK_BYTES


def test_a_held_blob_is_not_evicted_until_released_and_not_held_after_a_restart(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs", max_bytes=2 * MiB)
    held = store.put_bytes(_data(MiB, seed=1))
    store.hold(held)
    other = store.put_bytes(_data(MiB, seed=2))
    store._blobs[held].last_used -= 100  # the held one is the least recently used
    store.put_bytes(_data(MiB, seed=3))
    assert store.has(held) and not store.has(other)
    assert store.info(held) is not None and store.info(held).held  # type: ignore[union-attr]
    assert store.gc() == MiB and store.has(held)
    store.release(held)
    assert not store.held(held) and store.gc() == MiB
    store.hold(other)
    assert not BlobStore(tmp_path / "blobs", max_bytes=2 * MiB).held(other)  # leases do not persist
