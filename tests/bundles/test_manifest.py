"""``node.bundles.manifest``: the canonical archive, its safety checks, and the content id."""

from __future__ import annotations

import contextlib
import hashlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.bundles.manifest import (
    CHUNK_BYTES,
    BundleError,
    Manifest,
    content_id,
    manifest_of,
    pack_files,
    unpack_files,
    verify,
)
from protocol.errors import StarmeshError

FILES = [("pkg/__init__.py", 0o644, b""), ("a.py", 0o644, b"x = 1\n"), ("run.sh", 0o755, b"#!/bin/sh\n")]


def test_round_trip_sorted() -> None:
    assert unpack_files(pack_files(FILES)) == sorted(FILES)


def test_same_files_same_bytes_in_any_order() -> None:
    assert pack_files(FILES) == pack_files(reversed(FILES)) == pack_files(sorted(FILES))
    assert content_id(pack_files(FILES)) == content_id(pack_files(reversed(FILES)))


def test_archive_bytes_are_pinned() -> None:
    """Every machine, every version: these two files pack to exactly these bytes."""
    packed = pack_files([("pkg/b.sh", 0o755, b"#!/bin/sh\n"), ("a.py", 0o644, b"x=1\n")])
    assert msgpack.unpackb(packed) == {"v": 1, "files": [["a.py", 0o644, b"x=1\n"],
                                                         ["pkg/b.sh", 0o755, b"#!/bin/sh\n"]]}
    assert hashlib.sha256(packed).hexdigest() == (
        "d7f5a783c3b01f221294d270226f20e88b7a39867e47a5feb8622366acc383d8")


def _reference_id(data: bytes) -> bytes:
    """The documented form, written out independently."""
    chunks = [hashlib.sha256(data[i:i + CHUNK_BYTES]).digest() for i in range(0, len(data), CHUNK_BYTES)]
    manifest = msgpack.packb({"v": 1, "size": len(data), "chunk": CHUNK_BYTES, "chunks": chunks},
                             use_bin_type=True)
    return hashlib.sha256(b"starmesh manifest v1" + manifest).digest()


@pytest.mark.parametrize(("data", "expected"), [
    (b"", "00652b22f1c49a07f09aec491a07fe5268d3a38111b37c820b92589d9825f0f5"),
    (b"abc", "ca96e37ae03d957d8e4c6a1c8e03fba4c1a9acb70190a9a6920a280345ecf284"),
    (bytes(range(256)) * (CHUNK_BYTES // 256 * 2 + 3),
     "18e455287838d8669a98eceb8548bc18a16d08c44a383377758579426ade6496"),
], ids=["empty", "abc", "two-chunks-and-a-bit"])
def test_content_id_of_known_data(data: bytes, expected: str) -> None:
    assert content_id(data).hex() == expected
    assert content_id(data) == _reference_id(data)
    assert content_id(bytearray(data)) == content_id(memoryview(data))  == content_id(data)


def test_manifest_chunks() -> None:
    data = b"a" * CHUNK_BYTES + b"b" * CHUNK_BYTES + b"c"
    m = manifest_of(data)
    assert m == Manifest(size=len(data), chunk=CHUNK_BYTES, chunks=(
        hashlib.sha256(b"a" * CHUNK_BYTES).digest(), hashlib.sha256(b"b" * CHUNK_BYTES).digest(),
        hashlib.sha256(b"c").digest()))
    assert m.digest == content_id(data)
    assert manifest_of(b"").chunks == ()
    assert msgpack.unpackb(m.encode()) == {"v": 1, "size": len(data), "chunk": CHUNK_BYTES,
                                           "chunks": list(m.chunks)}


def test_verify() -> None:
    data = pack_files(FILES)
    verify(data, content_id(data))
    with pytest.raises(BundleError, match="content id"):
        verify(data + b"x", content_id(data))
    assert issubclass(BundleError, StarmeshError)


def _raw(files: list[list[object]], **extra: object) -> bytes:
    out: bytes = msgpack.packb({"v": 1, "files": files, **extra}, use_bin_type=True)
    return out


UNSAFE_PATHS = ["/etc/passwd", "../x.py", "a/../../x.py", "a/./b.py", "./a.py", "a//b.py", "a\\b.py",
                "a\x00.py", "", "a/", "x" * 2000, "d/" + "y" * 300]


@pytest.mark.parametrize("path", UNSAFE_PATHS)
def test_unsafe_paths_are_refused_both_ways(path: str) -> None:
    with pytest.raises(BundleError):
        unpack_files(_raw([[path, 0o644, b"x"]]))
    with pytest.raises(BundleError):
        pack_files([(path, 0o644, b"x")])


@pytest.mark.parametrize(("name", "data"), [
    ("not msgpack", b"\xc1\xc1"),
    ("truncated", pack_files(FILES)[:-3]),
    ("trailing bytes", pack_files(FILES) + b"\x00"),
    ("not a map", msgpack.packb([1, 2])),
    ("extra key", _raw([], x=1)),
    ("missing files", msgpack.packb({"v": 1})),
    ("wrong version", msgpack.packb({"v": 2, "files": []})),
    ("bool version", msgpack.packb({"v": True, "files": []})),
    ("files not a list", msgpack.packb({"v": 1, "files": {}})),
    ("entry too short", _raw([["a.py", 0o644]])),
    ("mode 0o777", _raw([["a.py", 0o777, b""]])),
    ("setuid mode", _raw([["a.py", 0o4755, b""]])),
    ("mode a string", _raw([["a.py", "644", b""]])),
    ("path bytes", _raw([[b"a.py", 0o644, b""]])),
    ("data a string", _raw([["a.py", 0o644, "text"]])),
    ("duplicate path", _raw([["a.py", 0o644, b""], ["a.py", 0o644, b""]])),
    ("out of order", _raw([["b.py", 0o644, b""], ["a.py", 0o644, b""]])),
    ("file and directory", _raw([["a", 0o644, b""], ["a/b.py", 0o644, b""]])),
    ("ext type", msgpack.packb({"v": 1, "files": [msgpack.ExtType(1, b"x")]})),
])
def test_malformed_archives_are_refused(name: str, data: bytes) -> None:
    with pytest.raises(BundleError):
        unpack_files(data)


def test_limits() -> None:
    many = pack_files([(f"f{i:03}.py", 0o644, b"") for i in range(11)])
    assert len(unpack_files(many, max_files=11)) == 11
    with pytest.raises(BundleError, match="11 files, over the limit of 10"):
        unpack_files(many, max_files=10)
    big = pack_files([("a", 0o644, b"x" * 600), ("b", 0o644, b"y" * 600)])
    assert len(unpack_files(big, max_bytes=1200)) == 2
    with pytest.raises(BundleError, match="more than 1199 bytes"):
        unpack_files(big, max_bytes=1199)


def test_pack_refuses_bad_input() -> None:
    with pytest.raises(BundleError, match="appears twice"):
        pack_files([("a.py", 0o644, b""), ("a.py", 0o644, b"x")])
    with pytest.raises(BundleError, match="mode"):
        pack_files([("a.py", 0o600, b"")])
    with pytest.raises(BundleError, match="both a file and a directory"):
        pack_files([("a", 0o644, b""), ("a/b", 0o644, b"")])


_names = st.text(alphabet=st.characters(blacklist_characters="/\\\x00", blacklist_categories=["Cs"]),
                 min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
_paths = st.lists(_names, min_size=1, max_size=3).map("/".join)


@given(st.dictionaries(_paths, st.tuples(st.sampled_from([0o644, 0o755]), st.binary(max_size=64)),
                       max_size=8))
def test_round_trip_property(files: dict[str, tuple[int, bytes]]) -> None:
    entries = [(p, m, d) for p, (m, d) in files.items()]
    try:
        packed = pack_files(entries)
    except BundleError as exc:  # only a path that is both a file and a directory is refused
        assert "both a file and a directory" in str(exc)
        return
    assert unpack_files(packed) == sorted(entries)
    assert pack_files(reversed(entries)) == packed


@given(st.binary(max_size=256))
def test_any_bytes_unpack_or_bundle_error(data: bytes) -> None:
    with contextlib.suppress(BundleError):
        unpack_files(data)
