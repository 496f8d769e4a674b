"""Keys, the mesh secret, key derivation and the AEAD record layer (PROTOCOL.md §5).

* A node's identity is an Ed25519 key; its node id is the 32-byte raw public key.
* The mesh secret is 32 random bytes shared by every member (a pre-shared key). It is
  stored as one line of text (``mesh_secret_to_text``) with a checksum so typos are caught.
* ``hkdf`` is HKDF-SHA256 (RFC 5869); every derivation in the protocol goes through it.
* ``RecordCipher`` seals/opens frame bodies for one direction of a connection with an
  implicit 64-bit counter nonce, so a tampered, replayed, dropped or reordered frame fails
  authentication (``RemoteProtocolError`` with ``DECRYPT_FAILED``). With AES-GCM a frame
  can also be sealed from several buffers (``seal_parts_into``) and opened piece by piece
  into buffers the caller picks (``FrameOpener``): the same bytes on the wire, fewer copies.

No I/O and no clock here. Randomness comes from the caller (``token_bytes``).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import secrets
from collections.abc import Callable, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher as CipherContext
from cryptography.hazmat.primitives.ciphers import algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.errors import ConfigError, ErrorCode, LocalProtocolError, RemoteProtocolError

#: Source of key and nonce bytes; tests inject a seeded one.
TokenBytes = Callable[[int], bytes]

KEY_BYTES = 32
TAG_BYTES = 16
NONCE_BYTES = 12
MESH_SECRET_BYTES = 32
#: The last usable counter value; a direction that reaches it must be closed (never in practice).
MAX_COUNTER = (1 << 64) - 1
#: ``RecordCipher.open_view`` reuses one buffer for frames up to this size, and no larger.
SCRATCH_KEEP_BYTES = 64 * 1024

MESH_SECRET_PREFIX = "starmesh-secret-v1"
_CHECK_LABEL = b"starmesh mesh secret check"


class Cipher(enum.IntEnum):
    """AEAD algorithms (wire ids, append only). Both use 32-byte keys, 12-byte nonces, 16-byte tags."""

    AES_256_GCM = 1
    CHACHA20_POLY1305 = 2


#: Our preference order: AES-GCM is ~1.5x faster where AES-NI/PMULL exist (every x86-64/arm64 server).
DEFAULT_CIPHERS: tuple[Cipher, ...] = (Cipher.AES_256_GCM, Cipher.CHACHA20_POLY1305)


# ---------------------------------------------------------------------------------------------
# identities and the mesh secret


def generate_identity(token_bytes: TokenBytes = secrets.token_bytes) -> Ed25519PrivateKey:
    """A fresh Ed25519 identity key (from ``token_bytes(32)`` so tests can make it deterministic)."""
    return Ed25519PrivateKey.from_private_bytes(token_bytes(32))


def identity_to_bytes(key: Ed25519PrivateKey) -> bytes:
    """The 32-byte raw private seed (what the node keeps in its data dir, mode 0600)."""
    return key.private_bytes_raw()


def identity_from_bytes(data: bytes) -> Ed25519PrivateKey:
    """Inverse of ``identity_to_bytes``; ``ConfigError`` unless ``data`` is exactly 32 bytes."""
    if type(data) is not bytes or len(data) != 32:
        raise ConfigError(f"an identity key is 32 raw bytes, got {len(data) if isinstance(data, bytes) else '?'}")
    return Ed25519PrivateKey.from_private_bytes(data)


def node_id_of(key: Ed25519PrivateKey) -> bytes:
    """The node id: the 32-byte raw Ed25519 public key."""
    return key.public_key().public_bytes_raw()


def short_id(node_id: bytes) -> str:
    """First 10 hex characters of a node id, for logs and tables."""
    return node_id[:5].hex()


def new_mesh_secret(token_bytes: TokenBytes = secrets.token_bytes) -> bytes:
    """32 random bytes: the pre-shared key that makes a set of nodes one mesh."""
    return token_bytes(MESH_SECRET_BYTES)


def _secret_check(secret: bytes) -> str:
    return hashlib.sha256(_CHECK_LABEL + secret).hexdigest()[:8]


def mesh_secret_to_text(secret: bytes) -> str:
    """``starmesh-secret-v1:<base64url, no padding>:<8 hex check chars>`` (one line, no newline).

    The check is the first 8 hex digits of SHA-256("starmesh mesh secret check" || secret).
    """
    if type(secret) is not bytes or len(secret) != MESH_SECRET_BYTES:
        raise ConfigError(f"a mesh secret is {MESH_SECRET_BYTES} bytes")
    b64 = base64.urlsafe_b64encode(secret).rstrip(b"=").decode("ascii")
    return f"{MESH_SECRET_PREFIX}:{b64}:{_secret_check(secret)}"


def mesh_secret_from_text(text: str) -> bytes:
    """Parse ``mesh_secret_to_text`` output (surrounding whitespace allowed); ``ConfigError`` otherwise."""
    parts = text.strip().split(":")
    if len(parts) != 3 or parts[0] != MESH_SECRET_PREFIX:
        raise ConfigError(f"not a mesh secret: expected '{MESH_SECRET_PREFIX}:<base64url>:<check>'")
    b64 = parts[1]
    if len(b64) != 43 or not all(c.isascii() and (c.isalnum() or c in "-_") for c in b64):
        raise ConfigError("mesh secret: the key part must be 43 base64url characters")
    try:
        secret = base64.urlsafe_b64decode(b64 + "=")
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"mesh secret: bad base64url: {exc}") from None
    if len(secret) != MESH_SECRET_BYTES or base64.urlsafe_b64encode(secret)[:43].decode() != b64:
        raise ConfigError("mesh secret: the key part is not canonical base64url")
    if not hmac.compare_digest(parts[2], _secret_check(secret)):
        raise ConfigError("mesh secret: checksum mismatch (the secret was mistyped or truncated)")
    return secret


# ---------------------------------------------------------------------------------------------
# primitives


def hkdf(ikm: bytes, *, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869) Extract-then-Expand. An empty ``salt`` means HashLen zero bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None, info=info).derive(ikm)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def hmac_verify(key: bytes, data: bytes, mac: bytes) -> bool:
    """Constant-time check that ``mac`` is HMAC-SHA256(key, data)."""
    return hmac.compare_digest(hmac_sha256(key, data), mac)


def sha256(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


def counter_nonce(counter: int) -> bytes:
    """The 12-byte AEAD nonce for ``counter``: 4 zero bytes then the counter as uint64 big-endian."""
    return counter.to_bytes(NONCE_BYTES, "big")


def make_aead(cipher: Cipher, key: bytes) -> AESGCM | ChaCha20Poly1305:
    if len(key) != KEY_BYTES:
        raise ValueError("AEAD keys are 32 bytes")
    if cipher is Cipher.AES_256_GCM:
        return AESGCM(key)
    return ChaCha20Poly1305(key)


def seal_once(cipher: Cipher, key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """Seal a single handshake payload (nonce = counter 0; every handshake key is used once)."""
    return make_aead(cipher, key).encrypt(counter_nonce(0), plaintext, ad)


def open_once(cipher: Cipher, key: bytes, ciphertext: bytes, ad: bytes, *, code: ErrorCode) -> bytes:
    """Open a ``seal_once`` payload; ``RemoteProtocolError(code)`` if it does not authenticate."""
    try:
        return make_aead(cipher, key).decrypt(counter_nonce(0), ciphertext, ad)
    except (InvalidTag, ValueError, OverflowError):
        raise RemoteProtocolError("handshake payload failed authentication", code=code) from None


def _forged(frame: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"frame {frame} failed authentication (tampered, replayed, reordered or wrong key)",
                               code=ErrorCode.DECRYPT_FAILED)


class RecordCipher:
    """One direction of an encrypted connection: AEAD with an implicit per-frame counter.

    Frame ``n`` (counting from 0 in each direction) is sealed with nonce ``counter_nonce(n)``
    and empty associated data. Because the receiver uses its own counter, a frame that was
    tampered with, replayed, dropped or reordered fails authentication.
    """

    __slots__ = ("_aead", "_aes", "_scratch", "cipher", "counter")

    def __init__(self, cipher: Cipher, key: bytes) -> None:
        self.cipher = cipher
        self._aead = make_aead(cipher, key)
        # AES-GCM also as a streaming cipher: a frame sealed from several buffers needs no join.
        self._aes = algorithms.AES(key) if cipher is Cipher.AES_256_GCM else None
        self.counter = 0
        self._scratch = bytearray()

    def _seal_counter(self) -> int:
        """The nonce counter of the frame about to be sealed (``LIMIT_EXCEEDED`` once spent)."""
        if self.counter >= MAX_COUNTER:
            raise LocalProtocolError("AEAD counter exhausted; reconnect", code=ErrorCode.LIMIT_EXCEEDED)
        return self.counter

    def seal(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        """Encrypt the next frame body; ``LocalProtocolError(LIMIT_EXCEEDED)`` once the counter is spent."""
        n = self._seal_counter()
        self.counter = n + 1
        return self._aead.encrypt(n.to_bytes(NONCE_BYTES, "big"), plaintext, None)

    def seal_into(self, plaintext: bytes | bytearray | memoryview, out: memoryview) -> None:
        """Like ``seal`` but writes the sealed body (``len(plaintext) + TAG_BYTES`` bytes, the
        exact size of ``out``) into ``out``: a caller framing it saves a multi-MiB copy."""
        n = self._seal_counter()
        self._aead.encrypt_into(n.to_bytes(NONCE_BYTES, "big"), plaintext, None, out)
        self.counter = n + 1

    def seal_parts_into(self, parts: Sequence[bytes | bytearray | memoryview], out: memoryview) -> None:
        """``seal_into`` of the concatenation of ``parts`` (the same bytes on the wire), without
        joining them first: AES-GCM streams each part into ``out``; ChaCha20-Poly1305 has no
        streaming interface in ``cryptography``, so its parts are joined."""
        if self._aes is None:
            self.seal_into(b"".join(parts), out)
            return
        n = self._seal_counter()
        encryptor = CipherContext(self._aes, modes.GCM(n.to_bytes(NONCE_BYTES, "big"))).encryptor()
        pos = 0
        for part in parts:  # GCM output is as long as its input; ``out`` has room for the tag after
            pos += encryptor.update_into(part, out[pos:])
        encryptor.finalize()
        if pos + TAG_BYTES != len(out):
            raise LocalProtocolError(f"sealed {pos} bytes into a {len(out)}-byte frame", code=ErrorCode.INTERNAL)
        out[pos:] = encryptor.tag
        self.counter = n + 1

    def opener(self, ciphertext: Sequence[bytes | bytearray | memoryview]) -> FrameOpener | None:
        """Open the next frame in pieces (``FrameOpener``), or None where that is not offered
        (ChaCha20-Poly1305, a frame shorter than a tag, a spent counter): then use ``open``.
        ``ciphertext`` is the frame body as the buffers it arrived in, in order (the parts of
        ``FrameDecoder.next_frame_parts``): they are never joined."""
        n = self.counter
        if self._aes is None or n >= MAX_COUNTER or sum(len(p) for p in ciphertext) < TAG_BYTES:
            return None
        self.counter = n + 1  # the frame is consumed, whatever its fate: a bad tag closes the connection
        return FrameOpener(self._aes, n, ciphertext)

    def open(self, ciphertext: bytes | bytearray | memoryview) -> bytes:
        """Decrypt the next frame body; ``RemoteProtocolError(DECRYPT_FAILED)`` if it does not authenticate."""
        n = self.counter
        if n >= MAX_COUNTER:
            raise RemoteProtocolError("AEAD counter exhausted", code=ErrorCode.LIMIT_EXCEEDED)
        try:
            plaintext = self._aead.decrypt(n.to_bytes(NONCE_BYTES, "big"), ciphertext, None)
        except (InvalidTag, ValueError, OverflowError):
            raise _forged(n) from None
        self.counter = n + 1
        return plaintext

    def open_view(self, ciphertext: bytes | bytearray | memoryview) -> memoryview:
        """Like ``open`` but decrypts into a buffer this cipher reuses for frames up to
        ``SCRATCH_KEEP_BYTES``: the view is valid only until the next ``open_view`` (decode it,
        then drop it). A larger frame gets an uninitialized buffer of its own, which goes
        with the view: an idle connection must not keep a multi-MiB scratch buffer, and
        ``numpy.empty`` costs no zero-fill (the allocator hands back a freed block)."""
        n = self.counter
        size = len(ciphertext) - TAG_BYTES
        if n >= MAX_COUNTER or size < 0:
            return memoryview(self.open(ciphertext))  # raises
        if size > SCRATCH_KEEP_BYTES:
            view = memoryview(np.empty(size, np.uint8).data).cast("B")
        else:
            if len(self._scratch) < size:
                self._scratch = bytearray(max(size, 4096))  # replaced, never resized: old views stay intact
            view = memoryview(self._scratch)[:size]
        try:
            self._aead.decrypt_into(n.to_bytes(NONCE_BYTES, "big"), ciphertext, None, view)
        except (InvalidTag, ValueError, OverflowError):
            raise _forged(n) from None
        self.counter = n + 1
        return view


#: Spare bytes ``FrameOpener.read_into`` needs after the bytes it decrypts.
OPEN_SLACK = 15


class FrameOpener:
    """One AES-GCM frame decrypted in order, piece by piece, into buffers the caller picks
    (e.g. a message's header into a scratch buffer, its payload into its own). The frame may
    arrive in several buffers (its ciphertext parts, the tag at the end of the last ones).
    Nothing read is authentic until ``finish`` returned: decide nothing from it before."""

    __slots__ = ("_decryptor", "_frame", "_part", "_part_at", "_parts", "_pos", "size")

    def __init__(self, aes: algorithms.AES, counter: int,
                 ciphertext: Sequence[bytes | bytearray | memoryview]) -> None:
        views = [memoryview(p).cast("B") for p in ciphertext]
        self.size = sum(len(v) for v in views) - TAG_BYTES
        """Plaintext bytes in the frame."""
        parts: list[memoryview] = []
        tag = b""
        pos = 0
        for v in views:  # split the ciphertext from the tag, which may straddle parts
            body = max(0, min(len(v), self.size - pos))
            if body:
                parts.append(v[:body])
            if body < len(v):
                tag += bytes(v[body:])
            pos += len(v)
        self._parts = parts
        self._part = self._part_at = 0  # where the next ciphertext byte is
        self._frame = counter
        self._decryptor = CipherContext(aes, modes.GCM(counter.to_bytes(NONCE_BYTES, "big"), tag)).decryptor()
        self._pos = 0

    def read_into(self, out: bytearray | memoryview, n: int) -> None:
        """Decrypt the next ``n`` plaintext bytes into ``out[:n]``. ``out`` must be at least
        ``n + OPEN_SLACK`` bytes long (``update_into``'s rule; GCM writes exactly ``n``)."""
        end = self._pos + n
        if n < 0 or end > self.size or len(out) < n + OPEN_SLACK:
            raise ValueError(f"reading {n} bytes at {self._pos} of a {self.size}-byte frame "
                             f"into {len(out)} bytes")
        target = memoryview(out).cast("B")
        done = 0
        while done < n:
            part, at = self._parts[self._part], self._part_at
            k = min(n - done, len(part) - at)
            self._decryptor.update_into(part[at : at + k], target[done:])  # room: n - done + slack
            done += k
            if at + k == len(part):
                self._part, self._part_at = self._part + 1, 0
            else:
                self._part_at = at + k
        self._pos = end

    def finish(self) -> None:
        """Check the tag once every byte was read; ``RemoteProtocolError(DECRYPT_FAILED)`` if
        the frame was tampered with, replayed, reordered or sealed with another key."""
        if self._pos != self.size:
            raise ValueError(f"finish after {self._pos} of {self.size} bytes")
        try:
            self._decryptor.finalize()
        except InvalidTag:
            raise _forged(self._frame) from None
