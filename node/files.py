"""The one way ``node/`` writes a file that must never be seen half-written.

``atomic_write(path, data)`` writes a sibling temporary file, fsyncs it, and renames it over
``path`` (POSIX ``rename`` is atomic), so a crash leaves either the old file or the new one.
Identity keys, the incarnation, remembered peers, ready files and every store that follows
use it. ``OSError`` becomes ``ConfigError`` naming the file and what it is.

Key files (node identity, mesh secret, a person's submitter key) are created with
``create_secret_file`` (0600 from the first byte, never overwritten) and read with
``read_secret_file`` (refused when others could read them).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable
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


#: Mode of every key file: nothing for group or others.
SECRET_MODE = 0o600
#: Largest key file read (a key is one line).
MAX_KEY_FILE_BYTES = 4096


def create_secret_file(path: Path, data: bytes, *, what: str,
                       write: Callable[..., None] = atomic_write) -> None:
    """Create ``path`` (must not exist) with mode 0600 and ``data``, durably and whole.

    ``data`` is written under a private name (``write``: ``atomic_write``) and hard-linked into
    place, which fails if the file exists, so two creators racing keep one key and no reader
    sees half of it. ``ConfigError`` if it exists or cannot be created."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create: {exc.strerror or exc}") from None
    if path.exists():  # the common refusal, without writing anything
        raise ConfigError(f"{path}: already exists; refusing to overwrite a key")
    staged = path.with_name(f".{path.name}.{secrets.token_hex(8)}.new")
    write(staged, data, mode=SECRET_MODE, what=what)
    try:
        os.link(staged, path)  # unlike a rename, fails if a racing creator got there first
    except FileExistsError:
        raise ConfigError(f"{path}: already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            staged.unlink()


def read_secret_file(path: Path, *, what: str) -> bytes:
    """The bytes of the key file ``path``: a regular file of at most ``MAX_KEY_FILE_BYTES``
    that group and others cannot read. ``ConfigError`` naming the file and the fix."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: {what} is not a regular file")
        if st.st_size > MAX_KEY_FILE_BYTES:
            raise ConfigError(f"{path}: {what} is {st.st_size} bytes; not a key file")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{path}: {what} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run: chmod 600 {path}"
        )
    return data
