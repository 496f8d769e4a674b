"""The one way ``node/`` writes a file that must never be seen half-written.

``atomic_write(path, data)`` writes a sibling temporary file, fsyncs it, and renames it over
``path`` (POSIX ``rename`` is atomic), so a crash leaves either the old file or the new one.
Identity keys, the incarnation, remembered peers, ready files and every store that follows
use it. ``OSError`` becomes ``ConfigError`` naming the file and what it is.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from protocol.errors import ConfigError


def atomic_write(path: os.PathLike[str] | str, data: bytes | str, *, mode: int = 0o644,
                 what: str = "file", fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically, created with permission bits ``mode``."""
    target = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            _write_all(fd, payload)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)  # the umask may have narrowed it; never widen an existing 0600
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"{target}: cannot write {what}: {exc.strerror or exc}") from None


def _write_all(fd: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]
