"""Blobs on disk: a bounded, crash-safe, content-addressed store with LRU eviction and pins.

Layout under ``root`` (``<data_dir>/blobs``)::

    <hex id>.manifest      the blob's canonical manifest (written first)
    <hex id>               the blob's bytes, complete and verified (renamed into place last)
    partial/<hex id>/      a fetch in progress: ``manifest`` and one file per verified chunk
    pins                   the pinned ids, one hex id a line (atomic_write)
    .tmp-*                 work in progress (removed when the store opens)

Every file is written to a temporary name, fsynced and renamed, and a blob's data file is
renamed into place only after every chunk was checked against its manifest: a node killed at
any point leaves a complete blob, a partial directory (whose chunk files are checked again
when the fetch resumes) or debris removed on open, never a torn blob that would be served.

Bounded: complete blobs plus partial chunks stay within ``max_bytes``. Making room evicts
unpinned complete blobs, least recently used first (the data file's mtime, touched by every
read); pinned blobs, *held* blobs (``hold``: kept for a lease another member holds, not
persisted: after a restart, or once ``release``d, an ordinary cache entry again), the blob
being written and fetches in progress are never evicted. When there is still no room,
``StoreFull``. ``gc()`` drops every blob neither pinned nor held and every partial fetch not
in ``keep``. All methods block (disk): the service calls them in its io executor.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from node.blobs.manifest import (
    BlobError,
    ManifestBuilder,
    check_chunk,
    chunk_range,
    decode_manifest,
)
from node.bundles.manifest import CHUNK_BYTES, Manifest
from node.files import atomic_write
from protocol.errors import ConfigError

#: The default bound of the cache (``--blob-cache-bytes``).
DEFAULT_CACHE_BYTES = 8 * 1024 ** 3


class StoreFull(BlobError):
    """No room for the blob even after evicting every unpinned one."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobInfo:
    blob_id: bytes
    size: int
    pinned: bool
    last_used: float
    """Unix time of the last read or write."""
    held: bool = False
    """Kept for another member's lease (``BlobStore.hold``)."""


@dataclass(slots=True)
class _Entry:
    size: int
    last_used: float


def _hex(blob_id: bytes) -> str:
    return bytes(blob_id).hex()


def _is_hex_id(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes | memoryview) -> None:
    """``data`` at ``path`` via a temporary sibling, fsync and rename."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class BlobStore:
    """Complete blobs and fetches in progress under ``root`` (module docstring)."""

    def __init__(self, root: Path, *, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ConfigError(f"blob cache bound {max_bytes} is negative")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._partial_root = self.root / "partial"
        self._partial_root.mkdir(parents=True, exist_ok=True)
        self._blobs: dict[bytes, _Entry] = {}
        self._manifests: dict[bytes, Manifest] = {}
        self._partials: dict[bytes, set[int]] = {}
        self._pins: set[bytes] = set()
        self._held: set[bytes] = set()
        self.counters = {"evictions": 0, "evicted_bytes": 0, "puts": 0, "fetched": 0, "reads": 0}
        self._open()

    # ---- opening --------------------------------------------------------------------

    def _open(self) -> None:
        for entry in [*self.root.iterdir(), *self._partial_root.iterdir()]:
            if entry.name.startswith(".tmp-"):
                _remove(entry)
        for entry in self.root.iterdir():
            name = entry.name
            if _is_hex_id(name) and entry.is_file():
                blob_id = bytes.fromhex(name)
                manifest = self._read_manifest(blob_id, self.root / f"{name}.manifest")
                st = entry.stat()
                if manifest is None or st.st_size != manifest.size:
                    _remove(entry)  # never trusted without its manifest
                    continue
                self._blobs[blob_id] = _Entry(size=st.st_size, last_used=st.st_mtime)
                self._manifests[blob_id] = manifest
        for entry in self.root.iterdir():  # a manifest whose data never landed (or was dropped)
            name = entry.name
            if name.endswith(".manifest") and _is_hex_id(name[:-9]) and bytes.fromhex(name[:-9]) not in self._blobs:
                _remove(entry)
        for entry in self._partial_root.iterdir():
            if not (_is_hex_id(entry.name) and entry.is_dir()):
                _remove(entry)
                continue
            blob_id = bytes.fromhex(entry.name)
            manifest = self._read_manifest(blob_id, entry / "manifest")
            if manifest is None or blob_id in self._blobs:
                _remove(entry)
                continue
            self._manifests[blob_id] = manifest
            self._partials[blob_id] = {int(p.name) for p in entry.iterdir() if p.name.isdigit()
                                       and int(p.name) < len(manifest.chunks)}
        pins = self.root / "pins"
        if pins.is_file():
            for line in pins.read_text(encoding="ascii", errors="replace").split():
                if _is_hex_id(line):
                    self._pins.add(bytes.fromhex(line))

    def _read_manifest(self, blob_id: bytes, path: Path) -> Manifest | None:
        try:
            return decode_manifest(blob_id, path.read_bytes())
        except (OSError, BlobError):
            return None

    # ---- queries --------------------------------------------------------------------

    def has(self, blob_id: bytes) -> bool:
        """True if the complete, verified blob is here."""
        return blob_id in self._blobs

    def manifest(self, blob_id: bytes) -> Manifest | None:
        """The manifest of a blob held complete or in part."""
        return self._manifests.get(blob_id)

    def chunks_held(self, blob_id: bytes) -> set[int] | None:
        """Chunks held of ``blob_id``: None for a complete blob, a set for a partial one (empty:
        unknown here)."""
        if blob_id in self._blobs:
            return None
        return set(self._partials.get(blob_id, ()))

    def path(self, blob_id: bytes) -> Path | None:
        """The complete blob's file (touched as used), or None."""
        if blob_id not in self._blobs:
            return None
        self._touch(blob_id)
        return self.root / _hex(blob_id)

    def read_chunk(self, blob_id: bytes, index: int) -> bytes | None:
        """Chunk ``index`` of a blob held complete or in part, or None if it is not here."""
        manifest = self._manifests.get(blob_id)
        if manifest is None or not 0 <= index < len(manifest.chunks):
            return None
        offset, length = chunk_range(manifest, index)
        try:
            if blob_id in self._blobs:
                with open(self.root / _hex(blob_id), "rb") as f:
                    f.seek(offset)
                    data = f.read(length)
                self._touch(blob_id, every=10.0)
            elif index in self._partials.get(blob_id, ()):
                data = (self._partial_root / _hex(blob_id) / str(index)).read_bytes()
            else:
                return None
        except FileNotFoundError:
            return None
        self.counters["reads"] += 1
        return data if len(data) == length else None

    def list(self) -> list[BlobInfo]:
        return sorted((BlobInfo(blob_id=b, size=e.size, pinned=b in self._pins, last_used=e.last_used,
                                held=b in self._held) for b, e in self._blobs.items()), key=lambda i: i.blob_id)

    def info(self, blob_id: bytes) -> BlobInfo | None:
        e = self._blobs.get(blob_id)
        return None if e is None else BlobInfo(blob_id=blob_id, size=e.size, pinned=blob_id in self._pins,
                                                last_used=e.last_used, held=blob_id in self._held)

    @property
    def used_bytes(self) -> int:
        return sum(e.size for e in self._blobs.values()) + self._partial_bytes()

    def stats(self) -> dict[str, float]:
        return {
            "blob_store_bytes": float(self.used_bytes),
            "blob_store_limit_bytes": float(self.max_bytes),
            "blob_store_blobs": float(len(self._blobs)),
            "blob_store_pinned": float(len(self._pins & set(self._blobs))),
            "blob_store_held": float(len(self._held)),
            "blob_store_partial": float(len(self._partials)),
            "blob_store_evictions_total": float(self.counters["evictions"]),
            "blob_store_evicted_bytes_total": float(self.counters["evicted_bytes"]),
        }

    # ---- writing whole blobs --------------------------------------------------------

    def put_bytes(self, data: bytes | memoryview) -> bytes:
        """Store ``data``; its blob id."""
        builder = ManifestBuilder()
        builder.feed(data)
        manifest = builder.manifest()
        blob_id = manifest.digest
        if blob_id in self._blobs:
            self._touch(blob_id)
            return blob_id
        self._make_room(manifest.size, keep={blob_id})
        self._commit_bytes(blob_id, manifest, data)
        return blob_id

    def put_file(self, source: Path) -> bytes:
        """Store a copy of the file ``source`` (read in 1 MiB pieces); its blob id."""
        tmp = self._new_tmp()
        builder = ManifestBuilder()
        try:
            with open(source, "rb") as src, open(tmp, "wb") as out:
                while piece := src.read(CHUNK_BYTES):
                    builder.feed(piece)
                    out.write(piece)
                out.flush()
                os.fsync(out.fileno())
            manifest = builder.manifest()
            blob_id = manifest.digest
            if blob_id in self._blobs:
                self._touch(blob_id)
                return blob_id
            self._make_room(manifest.size, keep={blob_id})
            self._install(blob_id, manifest, tmp)
            return blob_id
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def put_verified_file(self, tmp: Path, manifest: Manifest) -> bytes:
        """Move ``tmp`` (a file in this store's root from ``new_tmp()``, already fsynced) into
        place as the blob of ``manifest``, after checking every chunk of it."""
        blob_id = manifest.digest
        try:
            with open(tmp, "rb") as f:
                builder = ManifestBuilder()
                while piece := f.read(CHUNK_BYTES):
                    builder.feed(piece)
            if builder.manifest() != manifest:
                raise BlobError("the uploaded bytes do not match their manifest")
            if blob_id in self._blobs:
                self._touch(blob_id)
                return blob_id
            self._make_room(manifest.size, keep={blob_id})
            self._install(blob_id, manifest, tmp)
            return blob_id
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def new_tmp(self) -> Path:
        """A fresh temporary file under the root (removed on the next open if left behind)."""
        return self._new_tmp()

    def _new_tmp(self) -> Path:
        fd, name = tempfile.mkstemp(prefix=".tmp-", dir=self.root)
        os.close(fd)
        return Path(name)

    def _commit_bytes(self, blob_id: bytes, manifest: Manifest, data: bytes | memoryview) -> None:
        tmp = self._new_tmp()
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._install(blob_id, manifest, tmp)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _install(self, blob_id: bytes, manifest: Manifest, tmp: Path) -> None:
        """The manifest first, then the data file renamed into place: it counts from then on."""
        name = _hex(blob_id)
        _write_file(self.root / f"{name}.manifest", manifest.encode())
        os.replace(tmp, self.root / name)
        _fsync_dir(self.root)
        self._blobs[blob_id] = _Entry(size=manifest.size, last_used=time.time())
        self._manifests[blob_id] = manifest
        self.counters["puts"] += 1

    # ---- fetches in progress --------------------------------------------------------

    def begin(self, blob_id: bytes, manifest: Manifest) -> set[int]:
        """Start (or resume) a fetch of ``manifest`` (checked against ``blob_id`` by the caller);
        the chunks already held (checked again now). ``StoreFull`` when there is no room."""
        if manifest.digest != blob_id:
            raise BlobError("the manifest is not the blob's")
        if blob_id in self._blobs:
            return set(range(len(manifest.chunks)))
        self._make_room(manifest.size, keep={blob_id})
        folder = self._partial_root / _hex(blob_id)
        if blob_id not in self._partials:
            folder.mkdir(exist_ok=True)
            _write_file(folder / "manifest", manifest.encode())
            self._partials[blob_id] = set()
        self._manifests[blob_id] = manifest
        held = self._partials[blob_id]
        for index in sorted(held):
            data = self.read_chunk(blob_id, index)
            try:
                check_chunk(manifest, index, data if data is not None else b"")
            except BlobError:
                held.discard(index)
                with contextlib.suppress(OSError):
                    os.unlink(folder / str(index))
        return set(held)

    def write_chunk(self, blob_id: bytes, index: int, data: bytes) -> None:
        """Keep chunk ``index`` of a fetch in progress (checked against the manifest first)."""
        manifest = self._manifests.get(blob_id)
        if manifest is None or blob_id not in self._partials:
            raise BlobError(f"no fetch of {_hex(blob_id)[:16]}... in progress")
        check_chunk(manifest, index, data)
        if index in self._partials[blob_id]:
            return
        _write_file(self._partial_root / _hex(blob_id) / str(index), data)
        self._partials[blob_id].add(index)

    def finish(self, blob_id: bytes) -> Path:
        """Assemble a fetch whose every chunk is held into the blob; its path."""
        manifest = self._manifests.get(blob_id)
        held = self._partials.get(blob_id)
        if manifest is None or held is None:
            if blob_id in self._blobs:
                return self.root / _hex(blob_id)
            raise BlobError(f"no fetch of {_hex(blob_id)[:16]}... in progress")
        if len(held) != len(manifest.chunks):
            raise BlobError(f"{len(manifest.chunks) - len(held)} chunks still missing")
        folder = self._partial_root / _hex(blob_id)
        tmp = self._new_tmp()
        try:
            with open(tmp, "wb") as out:
                for index in range(len(manifest.chunks)):
                    data = (folder / str(index)).read_bytes()
                    check_chunk(manifest, index, data)
                    out.write(data)
                out.flush()
                os.fsync(out.fileno())
            self._install(blob_id, manifest, tmp)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self.counters["fetched"] += 1
        del self._partials[blob_id]
        _remove(folder)
        return self.root / _hex(blob_id)

    def abort(self, blob_id: bytes) -> None:
        """Drop a fetch in progress and what it held."""
        if self._partials.pop(blob_id, None) is not None:
            _remove(self._partial_root / _hex(blob_id))
            if blob_id not in self._blobs:
                self._manifests.pop(blob_id, None)

    # ---- pins, eviction, gc ---------------------------------------------------------

    def pin(self, blob_id: bytes) -> None:
        if blob_id not in self._pins:
            self._pins.add(blob_id)
            self._save_pins()

    def unpin(self, blob_id: bytes) -> None:
        if blob_id in self._pins:
            self._pins.discard(blob_id)
            self._save_pins()

    def pinned(self, blob_id: bytes) -> bool:
        return blob_id in self._pins

    def hold(self, blob_id: bytes) -> None:
        """Never evict ``blob_id`` (held or still to come) until ``release``; not persisted."""
        self._held.add(blob_id)

    def release(self, blob_id: bytes) -> None:
        """``blob_id`` is an ordinary cache entry again (unless pinned)."""
        self._held.discard(blob_id)

    def held(self, blob_id: bytes) -> bool:
        return blob_id in self._held

    def _save_pins(self) -> None:
        atomic_write(self.root / "pins", "".join(f"{_hex(b)}\n" for b in sorted(self._pins)), what="blob pins")

    def remove(self, blob_id: bytes) -> int:
        """Drop a complete blob (pinned or not); the bytes freed."""
        entry = self._blobs.pop(blob_id, None)
        if entry is None:
            return 0
        self._manifests.pop(blob_id, None)
        name = _hex(blob_id)
        for path in (self.root / name, self.root / f"{name}.manifest"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return entry.size

    def gc(self, *, keep: Iterable[bytes] = ()) -> int:
        """Drop every blob neither pinned nor held and every partial fetch not in ``keep``; the
        bytes freed."""
        keep = set(keep) | self._held
        freed = 0
        for blob_id in [b for b in self._blobs if b not in self._pins and b not in keep]:
            freed += self.remove(blob_id)
        for blob_id in [b for b in self._partials if b not in keep]:
            freed += self._partial_size(blob_id)
            self.abort(blob_id)
        return freed

    def _make_room(self, size: int, *, keep: set[bytes]) -> None:
        if size > self.max_bytes:
            raise StoreFull(f"a blob of {size} bytes does not fit the cache of {self.max_bytes} bytes "
                            "(--blob-cache-bytes)")
        reserved = sum(self._manifests[b].size - self._partial_size(b) for b in self._partials if b not in keep)
        used = self.used_bytes + reserved
        if used + size <= self.max_bytes:
            return
        victims = sorted((e.last_used, b) for b, e in self._blobs.items()
                         if b not in self._pins and b not in self._held and b not in keep)
        for _, blob_id in victims:
            size_freed = self.remove(blob_id)
            self.counters["evictions"] += 1
            self.counters["evicted_bytes"] += size_freed
            used -= size_freed
            if used + size <= self.max_bytes:
                return
        raise StoreFull(f"no room for {size} bytes: {used} of {self.max_bytes} bytes are pinned or being "
                        "fetched (unpin some, or raise --blob-cache-bytes)")

    def _partial_size(self, blob_id: bytes) -> int:
        manifest = self._manifests[blob_id]
        return sum(chunk_range(manifest, i)[1] for i in self._partials.get(blob_id, ()))

    def _partial_bytes(self) -> int:
        return sum(self._partial_size(b) for b in self._partials)

    def _touch(self, blob_id: bytes, *, every: float = 0.0) -> None:
        now = time.time()
        entry = self._blobs[blob_id]
        if now - entry.last_used < every:
            return
        entry.last_used = now
        with contextlib.suppress(OSError):
            os.utime(self.root / _hex(blob_id), (now, now))


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
