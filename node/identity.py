"""The files in a node's data dir: identity key, mesh secret, last incarnation, lock.

``identity.key``  the node's Ed25519 private key, 0600, as one line of text with a checksum
                  (``identity_to_text``); 32 raw bytes in nodes created before it (still read).
``mesh.key``      the mesh secret as one line of text (``mesh_secret_to_text``), 0600, and
                  optionally a second line ``owner ed25519:<base64url>``: the mesh owner, the
                  key that signs who may submit work (``node.submitters``; none: nobody).
``incarnation``   the highest SWIM incarnation this identity has used, as decimal text.
``peers``         addresses of live members last seen (one per line), to rejoin after a restart.
``node.lock``     held (``flock``) while a node runs, so two nodes never share an identity.

Every file is written with ``node.files.atomic_write`` (a temporary file, fsync, rename), so a
crash never leaves half a file. Secrets are mode 0600 from the first byte (no chmod race) and
never overwritten: a new one is written under a private name and hard-linked into place, which
fails if the file exists, so two creators racing keep one key and no reader sees half of it.
Any unusable file raises ``ConfigError`` naming the file and the fix.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import os
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node import files
from node.files import atomic_write
from node.submitters import keys as submitter_keys
from protocol import crypto
from protocol.errors import ConfigError, StarmeshError

SECRET_MODE = files.SECRET_MODE
MAX_KEY_FILE_BYTES = files.MAX_KEY_FILE_BYTES


def _write_new_secret(path: Path, data: bytes, what: str) -> None:
    """Create ``path`` (must not exist) with mode 0600 and ``data`` (``node.files``)."""
    files.create_secret_file(path, data, what=what, write=atomic_write)


def _read_secret(path: Path, what: str) -> bytes:
    return files.read_secret_file(path, what=what)


def mesh_key_text(secret: bytes, owner: bytes | None = None) -> str:
    """A mesh key file's text: the secret's line, then ``owner ed25519:<...>`` if there is one."""
    lines = [crypto.mesh_secret_to_text(secret).strip()]
    if owner is not None:
        lines.append(submitter_keys.owner_line(owner))
    return "".join(f"{line}\n" for line in lines)


def parse_mesh_key_text(text: str) -> tuple[bytes, bytes | None]:
    """(secret, owner or None) from a mesh key file's text; ``StarmeshError`` if malformed.
    One line (the secret: files of nodes that predate owners) or two (then the owner)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError("empty")
    if len(lines) > 2:
        raise ConfigError("expected the secret's line and at most an owner line")
    secret = crypto.mesh_secret_from_text(lines[0])
    owner = submitter_keys.parse_owner_line(lines[1]) if len(lines) == 2 else None
    return secret, owner


def _load_mesh_file(path: Path) -> tuple[bytes, bytes | None]:
    data = _read_secret(path, "mesh key")
    try:
        return parse_mesh_key_text(data.decode("utf-8", errors="strict"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: mesh key is not text") from None
    except StarmeshError as exc:
        raise ConfigError(f"{path}: not a mesh key: {exc}") from None


def create_mesh_key(path: Path, owner: bytes | None = None) -> bytes:
    """Write a fresh mesh secret to ``path`` (which must not exist) and return it; with
    ``owner`` (a submitter's Ed25519 public key) the file names the mesh owner too."""
    secret = crypto.new_mesh_secret()
    _write_new_secret(path, mesh_key_text(secret, owner).encode(), "mesh key")
    return secret


def load_mesh_key(path: Path) -> bytes:
    """Read the mesh secret at ``path``; ``ConfigError`` if missing, unreadable or garbage."""
    return _load_mesh_file(path)[0]


def load_mesh_owner(path: Path) -> bytes | None:
    """The mesh owner named in the key file at ``path``; None when it names none (a file
    from before owners: nobody may submit). ``ConfigError`` as ``load_mesh_key``."""
    return _load_mesh_file(path)[1]


def set_mesh_owner(path: Path, owner: bytes) -> None:
    """Rewrite the key file at ``path`` (same secret) naming ``owner``, atomically, 0600."""
    secret, _ = _load_mesh_file(path)
    atomic_write(path, mesh_key_text(secret, owner), mode=SECRET_MODE, what="mesh key")


def load_or_create_mesh_key(path: Path, *, owner: bytes | None = None) -> tuple[bytes, bool]:
    """The mesh secret at ``path``, creating a new one (naming ``owner``) if there is none.
    Returns (secret, created)."""
    if not path.exists():
        with contextlib.suppress(ConfigError):  # lost a creation race: read the winner's key
            return create_mesh_key(path, owner), True
    return load_mesh_key(path), False


IDENTITY_PREFIX = "starmesh-identity-v1"
#: What an identity file written before ``IDENTITY_PREFIX`` holds: the raw Ed25519 seed.
LEGACY_IDENTITY_BYTES = 32


def _identity_check(seed: bytes) -> str:
    """16 hex digits of SHA-256("starmesh identity check" || seed): catches any flipped byte."""
    return hashlib.sha256(b"starmesh identity check" + seed).hexdigest()[:16]


def identity_to_text(key: Ed25519PrivateKey) -> str:
    """``starmesh-identity-v1:<base64url seed, no padding>:<check>`` (one line, no newline);
    the form of the mesh secret (``protocol.crypto.mesh_secret_to_text``) with a longer check."""
    seed = crypto.identity_to_bytes(key)
    b64 = base64.urlsafe_b64encode(seed).rstrip(b"=").decode("ascii")
    return f"{IDENTITY_PREFIX}:{b64}:{_identity_check(seed)}"


def identity_from_file_bytes(data: bytes) -> Ed25519PrivateKey:
    """The identity in an ``identity.key`` file's bytes: ``identity_to_text`` (whitespace
    around it allowed) or the 32 raw bytes of older nodes. ``ConfigError`` saying what is
    wrong otherwise (the caller names the file)."""
    if len(data) == LEGACY_IDENTITY_BYTES and not data.startswith(b"starmesh-"):
        return crypto.identity_from_bytes(data)
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError("not text and not 32 raw bytes") from None
    parts = text.split(":")
    if len(parts) != 3 or parts[0] != IDENTITY_PREFIX:
        raise ConfigError(f"expected '{IDENTITY_PREFIX}:<base64url>:<check>'")
    b64, check = parts[1], parts[2]
    if len(b64) != 43 or not all(c.isalnum() or c in "-_" for c in b64):
        raise ConfigError("the key part must be 43 base64url characters")
    try:
        seed = base64.urlsafe_b64decode(b64 + "=")
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"bad base64url: {exc}") from None
    if base64.urlsafe_b64encode(seed)[:43].decode("ascii") != b64:
        raise ConfigError("the key part is not canonical base64url")
    if not hmac.compare_digest(check, _identity_check(seed)):
        raise ConfigError("checksum mismatch")
    return crypto.identity_from_bytes(seed)


def load_identity(path: Path) -> Ed25519PrivateKey:
    """The node identity at ``path``; ``ConfigError`` naming the file if it is unusable. A
    damaged file is refused, never replaced: a new identity would be a different node."""
    data = _read_secret(path, "identity key")
    try:
        return identity_from_file_bytes(data)
    except (StarmeshError, ValueError) as exc:
        raise ConfigError(
            f"{path}: the identity key is damaged ({exc}); refusing to start with it or to "
            "replace it (this node would come back as a different member). Restore the file "
            "from a backup, or move it away to start as a new node"
        ) from None


def create_identity(path: Path) -> Ed25519PrivateKey:
    """Write a new identity to ``path`` (which must not exist; 0600) and return it."""
    key = crypto.generate_identity()
    _write_new_secret(path, (identity_to_text(key) + "\n").encode("ascii"), "identity key")
    return key


def load_or_create_identity(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The node identity at ``path``, created (0600) on first use. Returns (key, created)."""
    if not path.exists():
        with contextlib.suppress(ConfigError):  # lost a creation race: read the winner's key
            return create_identity(path), True
    return load_identity(path), False


def load_incarnation(path: Path) -> int:
    """The last incarnation persisted at ``path``; 0 when there is none yet."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return 0
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read incarnation: {exc}") from None
    if not text.isdigit() or int(text) >= 1 << 64:
        raise ConfigError(f"{path}: incarnation {text[:40]!r} is not an unsigned integer")
    return int(text)


def store_incarnation(path: Path, incarnation: int) -> None:
    """Durably replace the incarnation at ``path`` (temp file + fsync + rename)."""
    atomic_write(path, f"{incarnation}\n", what="incarnation")


#: Most remembered peer addresses (a restarted node tries them all as seeds).
MAX_PEERS = 16


def load_peers(path: Path) -> list[str]:
    """Remembered peer addresses (unparsed; the caller validates). Empty when none or unreadable."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")[: MAX_PEERS * 300]
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()][:MAX_PEERS]


def store_peers(path: Path, addresses: list[str]) -> None:
    """Replace the remembered peer addresses (at most ``MAX_PEERS``), atomically (not fsynced:
    a hint for the next start, rewritten as membership changes)."""
    atomic_write(path, "".join(f"{a}\n" for a in addresses[:MAX_PEERS]), what="peers", fsync=False)


class DataDirLock:
    """An exclusive ``flock`` on ``<data_dir>/node.lock`` for the lifetime of a node."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "node.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            f = open(self.path, "a+", encoding="ascii")  # noqa: SIM115 - held until release()
        except OSError as exc:
            raise ConfigError(f"{self.path.parent}: unusable data dir: {exc.strerror or exc}") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise ConfigError(
                f"{self.path.parent}: another node is running with this data dir; "
                "give each node its own --data-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None
