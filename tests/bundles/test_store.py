"""``node.bundles.store``: packing a directory from disk, and the bundle cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node.bundles.manifest import BundleError, content_id, pack_files, unpack_files
from node.bundles.store import BundleCache, pack_dir


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_pack_dir_takes_files_and_skips_the_rest(tmp_path: Path) -> None:
    root = _write(tmp_path / "job", {
        "mod.py": b"x = 1\n", "pkg/__init__.py": b"", "data/in.txt": b"hi", ".env": b"kept",
        "__pycache__/mod.cpython-311.pyc": b"junk", "pkg/__pycache__/x.pyc": b"junk",
        "stale.pyc": b"junk", ".git/HEAD": b"ref", ".venv/lib/x.py": b"", "pkg/.hidden/y.py": b"",
    })
    (root / "run.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "run.sh", 0o700)
    packed, digest = pack_dir(root)
    assert digest == content_id(packed)
    assert unpack_files(packed) == [
        (".env", 0o644, b"kept"), ("data/in.txt", 0o644, b"hi"), ("mod.py", 0o644, b"x = 1\n"),
        ("pkg/__init__.py", 0o644, b""), ("run.sh", 0o755, b"#!/bin/sh\n")]
    # The same tree elsewhere (other mtimes, other order of creation) names the same bundle.
    other = _write(tmp_path / "copy", {"run.sh": b"#!/bin/sh\n", "pkg/__init__.py": b"",
                                       "mod.py": b"x = 1\n", "data/in.txt": b"hi", ".env": b"kept"})
    os.chmod(other / "run.sh", 0o755)
    assert pack_dir(other) == (packed, digest)


def test_pack_dir_refuses_links_and_special_files(tmp_path: Path) -> None:
    root = _write(tmp_path / "a", {"mod.py": b""})
    (root / "link.py").symlink_to(root / "mod.py")
    with pytest.raises(BundleError, match="symlink"):
        pack_dir(root)
    root = _write(tmp_path / "b", {"mod.py": b""})
    (root / "sub").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(BundleError, match="symlink"):
        pack_dir(root)
    root = _write(tmp_path / "c", {"mod.py": b""})
    os.mkfifo(root / "pipe")
    with pytest.raises(BundleError, match="special file"):
        pack_dir(root)


def test_pack_dir_through_a_linked_root(tmp_path: Path) -> None:
    root = _write(tmp_path / "real", {"mod.py": b"x"})
    (tmp_path / "alias").symlink_to(root, target_is_directory=True)
    assert pack_dir(tmp_path / "alias") == pack_dir(root)


def test_pack_dir_limits(tmp_path: Path) -> None:
    root = _write(tmp_path / "job", {"a.bin": b"x" * 5000})
    packed, _ = pack_dir(root, max_bytes=6000)
    with pytest.raises(BundleError, match=r"more than 5000 bytes, over the limit of 4999 bytes"):
        pack_dir(root, max_bytes=4999)
    with pytest.raises(BundleError, match=rf"is {len(packed)} bytes packed, over the limit of 5001 bytes"):
        pack_dir(root, max_bytes=5001)


def test_pack_dir_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        pack_dir(tmp_path / "nope")
    _write(tmp_path / "f", {"x": b""})
    with pytest.raises(BundleError, match="not a directory"):
        pack_dir(tmp_path / "f" / "x")
    (tmp_path / "empty" / "__pycache__").mkdir(parents=True)
    (tmp_path / "empty" / "__pycache__" / "a.pyc").write_bytes(b"")
    with pytest.raises(BundleError, match="holds no files"):
        pack_dir(tmp_path / "empty")


def _bundle(n: int, size: int = 100) -> tuple[bytes, bytes]:
    packed = pack_files([(f"m{n}.py", 0o644, bytes([n]) * size), ("bin/run", 0o755, b"#!")])
    return packed, content_id(packed)


def test_cache_put_unpacks_and_keeps_the_packed_bytes(tmp_path: Path) -> None:
    cache = BundleCache(tmp_path / "cache")
    packed, digest = _bundle(1)
    assert not cache.has(digest) and cache.path(digest) is None and cache.packed(digest) is None
    where = cache.put(digest, packed)
    assert where == tmp_path / "cache" / digest.hex() == cache.path(digest)
    assert cache.has(digest) and cache.packed(digest) == packed
    assert (where / "m1.py").read_bytes() == b"\x01" * 100
    assert (where / "bin" / "run").stat().st_mode & 0o777 == 0o755
    assert (where / "m1.py").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "cache" / f"{digest.hex()}.bundle").read_bytes() == packed
    assert cache.put(digest, packed) == where  # idempotent
    assert cache.stats()["puts_total"] == 1 and cache.stats()["bundles"] == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [digest.hex(), f"{digest.hex()}.bundle"]
    # A new cache on the same root finds it.
    again = BundleCache(tmp_path / "cache")
    assert again.has(digest) and again.packed(digest) == packed


def test_cache_verifies(tmp_path: Path) -> None:
    cache = BundleCache(tmp_path)
    packed, digest = _bundle(1)
    with pytest.raises(BundleError, match="content id"):
        cache.put(digest, packed + b" ")
    evil = pack_files([("a.py", 0o644, b"")]).replace(b"a.py", b"/a.y")
    with pytest.raises(BundleError, match="absolute"):
        cache.put(content_id(evil), evil)
    with pytest.raises(BundleError, match="32 bytes"):
        cache.has(b"short")
    assert list(tmp_path.iterdir()) == []


def test_cache_clears_debris_on_open(tmp_path: Path) -> None:
    (tmp_path / ".tmp-abc" / "tree").mkdir(parents=True)
    packed, digest = _bundle(1)
    (tmp_path / f"{digest.hex()}.bundle").write_bytes(packed)  # its directory never landed
    cache = BundleCache(tmp_path)
    assert list(tmp_path.iterdir()) == [] and not cache.has(digest)


def test_cache_evicts_least_recently_used(tmp_path: Path) -> None:
    bundles = [_bundle(n, size=1000) for n in range(4)]
    one = len(bundles[0][0]) + 1000 + 2  # packed + unpacked files
    cache = BundleCache(tmp_path, max_bytes=3 * one)
    for n, (packed, digest) in enumerate(bundles[:3]):
        cache.put(digest, packed)
        os.utime(tmp_path / f"{digest.hex()}.bundle", (1000 + n, 1000 + n))  # put order, in mtime
    assert cache.stats()["bytes"] == 3 * one
    # Using bundle 0 makes bundle 1 the least recently used.
    assert cache.path(bundles[0][1]) is not None
    cache.put(bundles[3][1], bundles[3][0])
    assert [cache.has(d) for _, d in bundles] == [True, False, True, True]
    assert not (tmp_path / bundles[1][1].hex()).exists()
    assert not (tmp_path / f"{bundles[1][1].hex()}.bundle").exists()
    assert cache.stats()["evictions_total"] == 1 and cache.stats()["bytes"] == 3 * one
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_cache_never_evicts_what_it_just_put(tmp_path: Path) -> None:
    cache = BundleCache(tmp_path, max_bytes=10)
    packed, digest = _bundle(1)
    assert cache.put(digest, packed).is_dir() and cache.has(digest)
    other, other_digest = _bundle(2)
    cache.put(other_digest, other)
    assert cache.has(other_digest) and not cache.has(digest)
