"""The submitters' files: a person's submitter key, and a node's copy of the log.

``default_key_path()``
    ``$STARMESH_SUBMITTER_KEY`` if set, else ``$XDG_CONFIG_HOME/starmesh/submitter.key``
    (``XDG_CONFIG_HOME`` defaults to ``~/.config``). It belongs to a person, not a node: it
    signs their submissions and, for the mesh owner, grants and revocations. It never goes
    into a node's data dir.
``submitter.key``
    one line, ``starmesh-submitter-v1:<seed>:<check>`` (``node.submitters.keys``), mode 0600,
    made on first use (``load_or_create_submitter_key``), never overwritten; refused when
    others could read it.
``<data_dir>/submitters.log``
    the node's copy of the owner-signed log: one entry a line, base64url (no padding) of the
    msgpack ``SignedEntry``, in ``seq`` order; rewritten whole with ``node.files.atomic_write``
    on each change. It holds only what the owner signed, so it is no secret; a reader checks
    every entry again (``SubmitterLog.apply``) and keeps the valid prefix.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
from pathlib import Path

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.files import atomic_write, create_secret_file, read_secret_file
from node.submitters.keys import submitter_key_from_text, submitter_key_to_text
from node.submitters.log import MAX_LOG_ENTRIES
from protocol import crypto
from protocol.errors import ConfigError, RemoteProtocolError, StarmeshError
from protocol.messages.submitters import MAX_ENTRY_BODY_BYTES, SignedEntry
from protocol.schema import SchemaViolation, unpack_body

KEY_ENV = "STARMESH_SUBMITTER_KEY"
LOG_FILE = "submitters.log"
#: Longest line of ``submitters.log`` (base64 of the largest entry, with room).
MAX_LOG_LINE = 2 * (MAX_ENTRY_BODY_BYTES + 128)


def default_key_path(env: dict[str, str] | None = None) -> Path:
    """Where this person's submitter key lives (module docstring); ``env`` defaults to the
    process environment."""
    env = dict(os.environ) if env is None else env
    explicit = env.get(KEY_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    config_home = env.get("XDG_CONFIG_HOME", "").strip()
    base = Path(config_home).expanduser() if config_home else Path(env.get("HOME") or "~").expanduser() / ".config"
    return base / "starmesh" / "submitter.key"


def load_submitter_key(path: Path) -> Ed25519PrivateKey:
    """The submitter key at ``path``; ``ConfigError`` naming the file if missing or unusable."""
    data = read_secret_file(path, what="submitter key")
    try:
        return submitter_key_from_text(data)
    except (StarmeshError, ValueError) as exc:
        raise ConfigError(f"{path}: the submitter key is damaged ({exc}); restore it from a "
                          "backup, or move it away to make a new one (a new key must be "
                          "granted again)") from None


def create_submitter_key(path: Path) -> Ed25519PrivateKey:
    """Write a new submitter key to ``path`` (which must not exist; 0600) and return it."""
    key = crypto.generate_identity()
    create_secret_file(path, (submitter_key_to_text(key) + "\n").encode("ascii"), what="submitter key")
    return key


def load_or_create_submitter_key(path: Path) -> Ed25519PrivateKey:
    """The submitter key at ``path``, created (0600, parent dirs 0700) on first use."""
    if not path.exists():
        with contextlib.suppress(ConfigError):  # lost a creation race: read the winner's key
            return create_submitter_key(path)
    return load_submitter_key(path)


def log_path(data_dir: Path) -> Path:
    return data_dir / LOG_FILE


def entry_to_line(entry: SignedEntry) -> str:
    data: bytes = msgpack.packb(entry.to_wire(), use_bin_type=True)
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def entry_from_line(line: str) -> SignedEntry:
    """``RemoteProtocolError`` / ``ConfigError`` if the line is not a ``SignedEntry``."""
    if len(line) > MAX_LOG_LINE:
        raise ConfigError("line too long")
    try:
        data = base64.urlsafe_b64decode(line + "=" * (-len(line) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"bad base64url: {exc}") from None
    raw = unpack_body(data, what="log entry")
    try:
        entry = SignedEntry.from_wire(raw, "SignedEntry")
    except SchemaViolation as exc:
        raise ConfigError(str(exc)) from None
    assert isinstance(entry, SignedEntry)
    return entry


def load_log_entries(path: Path) -> tuple[list[SignedEntry], str | None]:
    """The entries in ``submitters.log`` up to the first unreadable line (at most
    ``MAX_LOG_ENTRIES``), and what was wrong there (None if nothing). A missing file is
    an empty log."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read((MAX_LOG_ENTRIES + 1) * (MAX_LOG_LINE + 1))
    except FileNotFoundError:
        return [], None
    except OSError as exc:
        return [], f"{path}: cannot read: {exc.strerror or exc}"
    out: list[SignedEntry] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(out) >= MAX_LOG_ENTRIES:
            return out, f"{path}: more than {MAX_LOG_ENTRIES} entries"
        try:
            out.append(entry_from_line(line.strip()))
        except (ConfigError, RemoteProtocolError) as exc:
            return out, f"{path}:{number}: not a log entry ({exc})"
    return out, None


def store_log_entries(path: Path, entries: list[SignedEntry]) -> None:
    """Replace ``submitters.log`` with ``entries`` (atomically, fsynced); ``ConfigError``."""
    atomic_write(path, "".join(entry_to_line(e) + "\n" for e in entries), what="submitters log")
