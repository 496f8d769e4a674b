"""Bundles on disk: pack a directory, and a bounded cache of unpacked bundles.

Cache layout under ``root``::

    <hex digest>/          the unpacked files (a worker process puts it first on sys.path)
    <hex digest>.bundle    the packed bytes, served to other nodes
    .tmp-*                 work in progress (removed when the cache opens)

``put`` writes the ``.bundle`` first and renames the unpacked directory into place last, so a
directory that exists is a complete bundle. Entries are evicted least recently used first (the
``.bundle`` file's mtime, touched by every ``put``, ``path`` and ``packed``) once the cache holds
more than ``max_bytes`` (packed plus unpacked bytes); the entry just put is never evicted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

from node.bundles.manifest import BundleError, content_id, pack_files, unpack_files, verify
from protocol.messages.tasks import MAX_BUNDLE_BYTES

#: Directory names ``pack_dir`` never descends into (besides hidden ones).
SKIP_DIRS = frozenset({"__pycache__", ".git"})
#: File suffixes ``pack_dir`` leaves out.
SKIP_SUFFIXES = (".pyc",)
DIGEST_BYTES = 32


def pack_dir(path: Path, *, max_bytes: int = MAX_BUNDLE_BYTES) -> tuple[bytes, bytes]:
    """``(packed, content id)`` of every regular file under ``path``.

    Skips ``__pycache__/``, ``.git/``, every hidden directory and ``*.pyc``. A symlink or
    special file inside is ``BundleError`` (the directory given may itself be a link); so is a
    missing or empty directory, or a bundle over ``max_bytes`` packed."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle directory {str(root)!r} does not exist or is not a directory")
    files: list[tuple[str, int, bytes]] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=_raise):
        here = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            if name in SKIP_DIRS or name.startswith("."):
                continue
            if (here / name).is_symlink():
                raise BundleError(f"bundle holds a symlink: {str(here / name)!r}")
            keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            if name.endswith(SKIP_SUFFIXES):
                continue
            full = here / name
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise BundleError(f"bundle holds a symlink: {str(full)!r}")
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(f"bundle holds a special file: {str(full)!r}")
            total += st.st_size
            if total > max_bytes:
                raise BundleError(f"bundle {str(root)!r} holds more than {total} bytes, "
                                  f"over the limit of {max_bytes} bytes")
            mode = 0o755 if st.st_mode & 0o111 else 0o644
            files.append((full.relative_to(root).as_posix(), mode, full.read_bytes()))
    if not files:
        raise BundleError(f"bundle directory {str(root)!r} holds no files")
    packed = pack_files(files)
    if len(packed) > max_bytes:
        raise BundleError(f"bundle {str(root)!r} is {len(packed)} bytes packed, "
                          f"over the limit of {max_bytes} bytes")
    return packed, content_id(packed)


def _raise(error: OSError) -> None:
    raise BundleError(f"cannot read the bundle directory: {error}") from None


class BundleCache:
    """Unpacked bundles by content id, bounded by ``max_bytes`` (LRU). One process owns a
    root; a crash leaves at most ``.tmp-*`` debris, cleared when the cache opens."""

    def __init__(self, root: Path, *, max_bytes: int = 1 << 30) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._sizes: dict[str, int] = {}
        self._hits = self._misses = self._puts = self._evictions = 0
        for entry in self.root.iterdir():
            if entry.name.startswith(".tmp-"):
                _remove(entry)
        for entry in self.root.iterdir():
            name = entry.name
            if _is_hex_digest(name) and entry.is_dir() and (self.root / f"{name}.bundle").is_file():
                self._sizes[name] = _entry_bytes(self.root, name)
            elif name.endswith(".bundle") and _is_hex_digest(name[:-7]) and not (self.root / name[:-7]).is_dir():
                _remove(entry)  # a packed file whose unpacked directory never landed

    # ---- queries

    def has(self, digest: bytes) -> bool:
        return _hex(digest) in self._sizes

    def path(self, digest: bytes) -> Path | None:
        """The unpacked directory of ``digest`` (touched as used), or None."""
        name = _hex(digest)
        if name not in self._sizes:
            self._misses += 1
            return None
        self._hits += 1
        self._touch(name)
        return self.root / name

    def packed(self, digest: bytes) -> bytes | None:
        """The packed bytes of ``digest`` (touched as used), or None."""
        name = _hex(digest)
        if name not in self._sizes:
            return None
        try:
            data = (self.root / f"{name}.bundle").read_bytes()
        except FileNotFoundError:
            self._forget(name)
            return None
        self._touch(name)
        return data

    def stats(self) -> dict[str, float]:
        return {
            "bundles": float(len(self._sizes)),
            "bytes": float(sum(self._sizes.values())),
            "max_bytes": float(self.max_bytes),
            "hits_total": float(self._hits),
            "misses_total": float(self._misses),
            "puts_total": float(self._puts),
            "evictions_total": float(self._evictions),
        }

    # ---- changes

    def put(self, digest: bytes, data: bytes) -> Path:
        """Verify ``data`` against ``digest``, unpack it and keep it; its directory.
        Idempotent. ``BundleError`` if the digest does not match or the archive is unsafe."""
        name = _hex(digest)
        final = self.root / name
        if name in self._sizes and final.is_dir():
            self._touch(name)
            return final
        verify(data, digest)
        files = unpack_files(data)
        work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            tree = work / "tree"
            tree.mkdir()
            for rel, mode, content in files:
                target = tree / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                with os.fdopen(fd, "wb") as f:
                    f.write(content)
                os.chmod(target, mode)  # the umask may have cut it
            bundle_tmp = work / "packed"
            bundle_tmp.write_bytes(data)
            os.replace(bundle_tmp, self.root / f"{name}.bundle")
            try:
                os.rename(tree, final)
            except OSError:
                if not final.is_dir():
                    raise
        except OSError as exc:
            raise BundleError(f"cannot store bundle {name[:16]}...: {exc}") from None
        finally:
            _remove(work)
        self._puts += 1
        self._sizes[name] = _entry_bytes(self.root, name)
        self._touch(name)
        self._evict(keep=name)
        return final

    def _touch(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.root / f"{name}.bundle")

    def _forget(self, name: str) -> None:
        self._sizes.pop(name, None)
        _remove(self.root / name)
        _remove(self.root / f"{name}.bundle")

    def _evict(self, *, keep: str) -> None:
        total = sum(self._sizes.values())
        if total <= self.max_bytes:
            return
        def age(name: str) -> float:
            try:
                return (self.root / f"{name}.bundle").stat().st_mtime
            except FileNotFoundError:
                return float("-inf")
        for name in sorted((n for n in self._sizes if n != keep), key=age):
            if total <= self.max_bytes:
                break
            total -= self._sizes[name]
            # Out of the way first (a rename is atomic), then removed.
            doomed = self.root / f".tmp-evict-{name}-{time.monotonic_ns()}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.root / name, doomed)
            self._forget(name)
            _remove(doomed)
            self._evictions += 1


def _hex(digest: bytes) -> str:
    if type(digest) is not bytes or len(digest) != DIGEST_BYTES:
        raise BundleError(f"a bundle digest is {DIGEST_BYTES} bytes, got {digest!r:.40}")
    return digest.hex()


def _is_hex_digest(name: str) -> bool:
    return len(name) == 2 * DIGEST_BYTES and all(c in "0123456789abcdef" for c in name)


def _entry_bytes(root: Path, name: str) -> int:
    total = 0
    with contextlib.suppress(FileNotFoundError):
        total += (root / f"{name}.bundle").stat().st_size
    for dirpath, _, filenames in os.walk(root / name):
        for f in filenames:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
