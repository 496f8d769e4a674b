"""Bundle archives and the content id of any bytes (sans-I/O).

Archive
    ``pack_files`` turns ``(path, mode, data)`` triples into one msgpack value::

        {"v": 1, "files": [[path, mode, data], ...]}

    ``path`` is a relative POSIX path (``pkg/mod.py``), ``mode`` is ``0o644`` or ``0o755``,
    ``data`` the file's bytes (msgpack bin). Files are sorted by path (code point order, which
    is UTF-8 byte order), so the same files give the same bytes on every machine, whatever
    order they were found in. ``unpack_files`` is the inverse and accepts only the canonical
    form: paths strictly ascending (so no duplicates), each path safe to join under a
    directory (no absolute path, no ``.`` / ``..`` / empty component, no backslash, no NUL,
    no file that is also another's directory), bounded counts and sizes. Anything else is
    ``BundleError``.

Content id (shared with blobs: bundle ids and signed submissions keep this form)
    The data is cut into ``CHUNK_BYTES`` (1 MiB) slices, the last one shorter; empty data has
    no chunks. The manifest is the msgpack encoding of the map, keys in this order::

        {"v": 1, "size": len(data), "chunk": CHUNK_BYTES,
         "chunks": [sha256(data[i:i + CHUNK_BYTES]) for i in range(0, len(data), CHUNK_BYTES)]}

    (integers in msgpack's shortest form, digests as bin 8, as ``msgpack.packb(...,
    use_bin_type=True)`` writes them). The content id is
    ``sha256(b"starmesh manifest v1" + manifest)``: 32 bytes. A fetcher that has the manifest
    verifies every chunk on arrival against its digest and the whole against the id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from protocol.errors import RemoteProtocolError, StarmeshError
from protocol.messages.tasks import MAX_BUNDLE_BYTES
from protocol.schema import unpack_body

#: Bytes of one chunk of the content-id manifest.
CHUNK_BYTES = 1024 * 1024
#: Modes a bundle file may have: plain and executable.
MODES = frozenset({0o644, 0o755})
#: Longest path (characters) and path component (UTF-8 bytes) in a bundle.
MAX_PATH_CHARS = 1024
MAX_COMPONENT_BYTES = 255
MANIFEST_DOMAIN = b"starmesh manifest v1"
VERSION = 1


class BundleError(StarmeshError):
    """A bundle (or a directory to pack) is unsafe, malformed, too large or not what its
    digest says."""


def check_path(path: Any) -> str:
    """``path`` if it is a safe relative POSIX path of a bundle file, else ``BundleError``."""
    if type(path) is not str:
        raise BundleError(f"bundle path is not a string: {path!r:.80}")
    if not path or len(path) > MAX_PATH_CHARS:
        raise BundleError(f"bundle path is empty or longer than {MAX_PATH_CHARS} chars: {path!r:.80}")
    if "\x00" in path or "\\" in path:
        raise BundleError(f"bundle path holds a NUL or a backslash: {path!r:.80}")
    if path.startswith("/"):
        raise BundleError(f"bundle path is absolute: {path!r:.80}")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise BundleError(f"bundle path has an empty, '.' or '..' component: {path!r:.80}")
        try:
            size = len(part.encode("utf-8"))
        except UnicodeEncodeError:
            raise BundleError(f"bundle path is not valid UTF-8: {path!r:.80}") from None
        if size > MAX_COMPONENT_BYTES:
            raise BundleError(f"bundle path component longer than {MAX_COMPONENT_BYTES} bytes: {path!r:.80}")
    return path


def _check_mode(mode: Any, path: str) -> int:
    if type(mode) is not int or mode not in MODES:
        raise BundleError(f"bundle file {path!r:.80} has mode {mode!r:.20}, not 0o644 or 0o755")
    return mode


def _check_tree(paths: list[str]) -> None:
    """No path may be a directory of another (``a`` and ``a/b``): ``paths`` sorted, unique."""
    files = set(paths)
    for path in paths:
        parts = path.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in files:
                raise BundleError(f"bundle path {prefix!r:.80} is both a file and a directory")


def pack_files(files: Iterable[tuple[str, int, bytes]]) -> bytes:
    """The canonical archive of ``files`` (see the module docstring); ``BundleError`` if a
    path or mode is unsafe or a path repeats."""
    entries = sorted(((check_path(p), m, d) for p, m, d in files), key=lambda e: e[0])
    for i, (path, mode, data) in enumerate(entries):
        _check_mode(mode, path)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise BundleError(f"bundle file {path!r:.80}: data is not bytes")
        if i and entries[i - 1][0] == path:
            raise BundleError(f"bundle path {path!r:.80} appears twice")
    _check_tree([e[0] for e in entries])
    packed: bytes = msgpack.packb(
        {"v": VERSION, "files": [[p, m, bytes(d)] for p, m, d in entries]}, use_bin_type=True)
    return packed


def unpack_files(
    data: bytes, *, max_files: int = 4096, max_bytes: int = MAX_BUNDLE_BYTES * 4
) -> list[tuple[str, int, bytes]]:
    """``pack_files``' inverse: the files, sorted by path. ``max_bytes`` bounds the total of
    the files' contents. ``BundleError`` for anything but a canonical, safe archive."""
    try:
        raw = unpack_body(bytes(data), what="bundle")
    except RemoteProtocolError as exc:
        raise BundleError(f"bundle is not valid msgpack: {exc}") from None
    if type(raw) is not dict or set(raw) != {"v", "files"}:
        raise BundleError("bundle is not a map of exactly 'v' and 'files'")
    if raw["v"] != VERSION or type(raw["v"]) is not int:
        raise BundleError(f"bundle version {raw['v']!r:.20} is not {VERSION}")
    items = raw["files"]
    if type(items) is not list:
        raise BundleError("bundle 'files' is not a list")
    if len(items) > max_files:
        raise BundleError(f"bundle has {len(items)} files, over the limit of {max_files}")
    out: list[tuple[str, int, bytes]] = []
    total = 0
    for item in items:
        if type(item) is not list or len(item) != 3:
            raise BundleError("bundle entry is not [path, mode, data]")
        path = check_path(item[0])
        mode = _check_mode(item[1], path)
        content = item[2]
        if type(content) is not bytes:
            raise BundleError(f"bundle file {path!r:.80}: data is not bin")
        total += len(content)
        if total > max_bytes:
            raise BundleError(f"bundle files hold more than {max_bytes} bytes")
        if out and path <= out[-1][0]:
            what = "appears twice" if path == out[-1][0] else "is out of order"
            raise BundleError(f"bundle path {path!r:.80} {what}")
        out.append((path, mode, content))
    _check_tree([e[0] for e in out])
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """The chunk digests of some bytes; ``digest`` is their content id."""

    size: int
    chunk: int
    chunks: tuple[bytes, ...]

    def encode(self) -> bytes:
        """The manifest's canonical msgpack bytes (the module docstring's form)."""
        data: bytes = msgpack.packb(
            {"v": VERSION, "size": self.size, "chunk": self.chunk, "chunks": list(self.chunks)},
            use_bin_type=True)
        return data

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(MANIFEST_DOMAIN + self.encode()).digest()


def manifest_of(data: bytes | bytearray | memoryview) -> Manifest:
    view = memoryview(data).cast("B")
    chunks = tuple(hashlib.sha256(view[i:i + CHUNK_BYTES]).digest()
                   for i in range(0, len(view), CHUNK_BYTES))
    return Manifest(size=len(view), chunk=CHUNK_BYTES, chunks=chunks)


def content_id(data: bytes | bytearray | memoryview) -> bytes:
    """The 32-byte content id of ``data`` (the module docstring's form)."""
    return manifest_of(data).digest


def verify(data: bytes | bytearray | memoryview, digest: bytes) -> None:
    """``BundleError`` unless ``data``'s content id is ``digest``."""
    got = content_id(data)
    if got != digest:
        raise BundleError(f"content id {got.hex()[:16]}... is not the expected {bytes(digest).hex()[:16]}...")
