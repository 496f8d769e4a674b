"""Text forms of submitter keys and of the mesh owner line (no disk: ``store.py`` reads files).

``starmesh-submitter-v1:<base64url seed, no padding>:<check>``
    a person's submitter private key, as ``submitter.key`` holds it (one line); ``check`` is
    the first 16 hex digits of SHA-256("starmesh submitter check" || seed), the identity key
    format of ``node.identity`` with its own label, so the two are never mistaken.
``ed25519:<base64url 32 bytes, no padding>``
    a public key: what ``submitters key`` prints and ``submitters add`` takes (64 hex digits
    are accepted too), and the value of the mesh key file's ``owner`` line.
``owner ed25519:<...>``
    the optional second line of a mesh key file: the mesh owner, the one key that signs who
    else may submit (``node.submitters.log``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import crypto
from protocol.errors import ConfigError

SUBMITTER_PREFIX = "starmesh-submitter-v1"
PUBLIC_PREFIX = "ed25519:"
OWNER_WORD = "owner"
PUBLIC_KEY_BYTES = 32
_B64_CHARS = 43


def _check(seed: bytes) -> str:
    """16 hex digits of SHA-256("starmesh submitter check" || seed): catches any flipped byte."""
    return hashlib.sha256(b"starmesh submitter check" + seed).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64_32(text: str, what: str) -> bytes:
    """32 bytes from 43 canonical base64url characters; ``ConfigError`` naming ``what``."""
    if len(text) != _B64_CHARS or not all(c.isascii() and (c.isalnum() or c in "-_") for c in text):
        raise ConfigError(f"{what}: expected {_B64_CHARS} base64url characters")
    try:
        data = base64.urlsafe_b64decode(text + "=")
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{what}: bad base64url: {exc}") from None
    if _b64(data) != text:
        raise ConfigError(f"{what}: not canonical base64url")
    return data


def public_key_of(key: Ed25519PrivateKey) -> bytes:
    """The 32 raw bytes of ``key``'s public key."""
    return crypto.node_id_of(key)


def submitter_key_to_text(key: Ed25519PrivateKey) -> str:
    """``starmesh-submitter-v1:<seed>:<check>`` (one line, no newline)."""
    seed = crypto.identity_to_bytes(key)
    return f"{SUBMITTER_PREFIX}:{_b64(seed)}:{_check(seed)}"


def submitter_key_from_text(data: bytes) -> Ed25519PrivateKey:
    """The key in a ``submitter.key`` file's bytes (whitespace around the line allowed);
    ``ConfigError`` saying what is wrong (the caller names the file)."""
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError("not ASCII text") from None
    parts = text.split(":")
    if len(parts) != 3 or parts[0] != SUBMITTER_PREFIX:
        raise ConfigError(f"expected '{SUBMITTER_PREFIX}:<base64url>:<check>'")
    seed = _unb64_32(parts[1], "the key part")
    if not hmac.compare_digest(parts[2], _check(seed)):
        raise ConfigError("checksum mismatch")
    return crypto.identity_from_bytes(seed)


def public_key_to_text(key: bytes) -> str:
    """``ed25519:<base64url>`` of a 32-byte public key."""
    if type(key) is not bytes or len(key) != PUBLIC_KEY_BYTES:
        raise ValueError("a public key is 32 bytes")
    return PUBLIC_PREFIX + _b64(key)


def parse_public_key(text: str) -> bytes:
    """A public key given as ``ed25519:<base64url>`` or 64 hex digits; ``ConfigError`` else."""
    text = text.strip()
    if text.startswith(PUBLIC_PREFIX):
        return _unb64_32(text[len(PUBLIC_PREFIX):], "public key")
    if len(text) == 2 * PUBLIC_KEY_BYTES and all(c in "0123456789abcdefABCDEF" for c in text):
        return bytes.fromhex(text)
    raise ConfigError(f"not a public key: {text[:80]!r}; expected '{PUBLIC_PREFIX}<43 base64url "
                      "characters>' (what `python -m node submitters key` prints) or 64 hex digits")


def owner_line(owner: bytes) -> str:
    """The mesh key file's second line for ``owner`` (no newline)."""
    return f"{OWNER_WORD} {public_key_to_text(owner)}"


def parse_owner_line(line: str) -> bytes:
    """The owner in a mesh key file's ``owner ed25519:<...>`` line; ``ConfigError`` else."""
    word, _, value = line.strip().partition(" ")
    if word != OWNER_WORD or not value.strip().startswith(PUBLIC_PREFIX):
        raise ConfigError(f"expected '{OWNER_WORD} {PUBLIC_PREFIX}<base64url>' on the second line")
    return parse_public_key(value)
