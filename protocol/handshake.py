"""The connection handshake: messages (tags 1-5) and the state machine (PROTOCOL.md §4, §5).

Theory of operation
-------------------
Three flights, like a SIGMA / Noise ``XXpsk`` handshake built from HMAC, X25519, Ed25519,
HKDF-SHA256 and an AEAD::

    initiator                                             responder
    INIT      versions, ciphers, e_i, n_i, mac  ─────────►  check version range, then mac
                                                            (keyed by the mesh secret)
              ◄─────────  RESPONSE  version, cipher, e_r, n_r,
                                    sealed_r = AEAD_hs(id_r, sig_r(th2), address, caps)
    FINISH    sealed_i = AEAD_hs(id_i, sig_i(th3), address, channel, caps)  ───►
    (OPEN: may send encrypted frames at once)               (OPEN)

Phases: ``START`` → initiator ``AWAIT_RESPONSE`` / responder ``AWAIT_INIT`` →
``AWAIT_FINISH`` (responder) → ``DONE``; any failure raises ``RemoteProtocolError`` and the
phase becomes ``FAILED`` (the owner closes the connection).

Invariants:

* A peer without the mesh secret sees only versions, cipher ids, an ephemeral key, a nonce
  and a MAC it cannot check; it cannot produce a valid INIT mac, so a responder answers it
  with ``ERROR(AUTH_FAILED)`` before revealing anything. Identities travel only sealed under
  keys that need both the X25519 result and the mesh secret.
* A recorded INIT replayed to a responder gets a RESPONSE sealed under a fresh ``e_r``; the
  attacker lacks ``e_i``'s private key, so it can neither read the RESPONSE nor produce FINISH,
  and the responder times the connection out.
* Each side signs the transcript hash covering both ephemerals (the responder ``th2``, the
  initiator ``th3``, which also covers the responder's sealed identity), so the identities
  are bound to this key exchange; a holder of the mesh secret cannot splice two sessions.
* Session keys depend on the X25519 result, the mesh secret and the full transcript ``th4``.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from protocol import crypto
from protocol.crypto import Cipher, RecordCipher, TokenBytes
from protocol.errors import ConfigError, ErrorCode, LocalProtocolError, RemoteProtocolError
from protocol.limits import NODE_ID_BYTES
from protocol.messages.gossip import ADDRESS
from protocol.schema import (
    Bytes,
    EnumOf,
    ListOf,
    Message,
    Optional,
    SchemaViolation,
    Str,
    Struct,
    UInt,
    register,
    spec,
    unpack_body,
)
from protocol.tags import MsgType

#: Wire protocol versions this implementation speaks.
PROTOCOL_VERSION = 1
PROTOCOL_MIN_VERSION = 1
PROTOCOL_MAX_VERSION = 1

MAX_CAPABILITIES = 16
CAPABILITY = Str(64, pattern=r"[A-Za-z0-9][A-Za-z0-9._:+/-]{0,63}")
MAX_SEALED_BYTES = 2048
MAX_REASON_CHARS = 256
KEY32 = Bytes(32, min_len=32)

L_INIT_MAC = b"starmesh-v1 init mac"
L_TRANSCRIPT = b"starmesh-v1 transcript"
L_HANDSHAKE_KEYS = b"starmesh-v1 handshake keys"
L_SESSION_KEYS = b"starmesh-v1 session keys"
L_SIG_RESPONDER = b"starmesh-v1 responder signature"
L_SIG_INITIATOR = b"starmesh-v1 initiator signature"


class Role(enum.Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class Channel(enum.IntEnum):
    """What a connection is for; chosen by the initiator (wire ids, append only)."""

    CONTROL = 0
    """Gossip and RPC between members."""
    BULK = 1
    """Tensor data between members."""
    CLIENT = 2
    """A non-member tool (``python -m node status``); never added to membership."""


@dataclass(frozen=True)
class HandshakeOptions:
    listen_address: str | None
    """"host:port" peers should dial to reach us; None for a CLIENT."""
    channel: Channel
    """The connection's purpose. Only the initiator's value is sent; a responder's is ignored."""
    capabilities: tuple[str, ...] = ()
    """Feature names we support (each <= 64 chars, at most 16)."""
    min_version: int = PROTOCOL_MIN_VERSION
    max_version: int = PROTOCOL_MAX_VERSION
    version: int = PROTOCOL_VERSION
    """The version we speak now (min <= version <= max); a rolling upgrade raises it last."""
    ciphers: tuple[Cipher, ...] = crypto.DEFAULT_CIPHERS
    """AEADs we accept, preferred first; the initiator's order wins."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_version <= self.version <= self.max_version <= 0xFFFF:
            raise ConfigError("handshake versions need 0 <= min_version <= version <= max_version <= 65535")
        if not self.ciphers or len(self.ciphers) > 8:
            raise ConfigError("handshake options need 1..8 ciphers")
        try:
            ADDRESS_OPT.check(self.listen_address, "listen_address")
            ListOf(CAPABILITY, max_len=MAX_CAPABILITIES).check(self.capabilities, "capabilities")
        except SchemaViolation as exc:
            raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class PeerInfo:
    node_id: bytes
    """32-byte Ed25519 public key, authenticated by the handshake."""
    listen_address: str | None
    channel: Channel
    capabilities: tuple[str, ...]
    protocol_version: int
    """The version both sides speak on this connection."""


ADDRESS_OPT = Optional(ADDRESS)

# --------------------------------------------------------------------------------------------
# messages


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeInit(Message):
    """First flight. Carries nothing about the mesh or the initiator's identity."""

    TAG: ClassVar[MsgType] = MsgType.HANDSHAKE_INIT
    min_version: int = spec(UInt(16))
    max_version: int = spec(UInt(16))
    version: int = spec(UInt(16))
    ciphers: tuple[int, ...] = spec(ListOf(UInt(8), max_len=8))
    """Cipher ids, preferred first (ints: a responder skips ids it does not know)."""
    ephemeral: bytes = spec(KEY32)
    nonce: bytes = spec(KEY32)
    mac: bytes = spec(KEY32)

    def __post_init__(self) -> None:
        Struct.__post_init__(self)
        if not self.min_version <= self.version <= self.max_version:
            raise LocalProtocolError("HandshakeInit: need min_version <= version <= max_version")
        if not self.ciphers:
            raise LocalProtocolError("HandshakeInit: ciphers is empty")


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeResponse(Message):
    TAG: ClassVar[MsgType] = MsgType.HANDSHAKE_RESPONSE
    version: int = spec(UInt(16))
    cipher: Cipher = spec(EnumOf(Cipher))
    ephemeral: bytes = spec(KEY32)
    nonce: bytes = spec(KEY32)
    sealed: bytes = spec(Bytes(MAX_SEALED_BYTES, min_len=crypto.TAG_BYTES))
    """AEAD of a msgpack ``ResponderIdentity``."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeFinish(Message):
    TAG: ClassVar[MsgType] = MsgType.HANDSHAKE_FINISH
    sealed: bytes = spec(Bytes(MAX_SEALED_BYTES, min_len=crypto.TAG_BYTES))
    """AEAD of a msgpack ``InitiatorIdentity``."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ProtocolErrorMsg(Message):
    """The sender is closing the connection because of ``code`` (an ``ErrorCode`` value;
    an int on the wire so that codes added later still parse)."""

    TAG: ClassVar[MsgType] = MsgType.ERROR
    code: int = spec(UInt(16))
    reason: str = spec(Str(MAX_REASON_CHARS), default="")

    def error_code(self) -> ErrorCode:
        try:
            return ErrorCode(self.code)
        except ValueError:
            return ErrorCode.INTERNAL


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Goodbye(Message):
    """The sender is closing the connection normally."""

    TAG: ClassVar[MsgType] = MsgType.GOODBYE
    reason: str = spec(Str(MAX_REASON_CHARS), default="")


HANDSHAKE_TYPES = (HandshakeInit, HandshakeResponse, HandshakeFinish, ProtocolErrorMsg, Goodbye)


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponderIdentity(Struct):
    """Sealed inside RESPONSE."""

    node_id: bytes = spec(Bytes(NODE_ID_BYTES, min_len=NODE_ID_BYTES))
    signature: bytes = spec(Bytes(64, min_len=64))
    listen_address: str | None = spec(ADDRESS_OPT, default=None)
    capabilities: tuple[str, ...] = spec(ListOf(CAPABILITY, max_len=MAX_CAPABILITIES), default=())


@dataclass(frozen=True, slots=True, kw_only=True)
class InitiatorIdentity(Struct):
    """Sealed inside FINISH."""

    node_id: bytes = spec(Bytes(NODE_ID_BYTES, min_len=NODE_ID_BYTES))
    signature: bytes = spec(Bytes(64, min_len=64))
    channel: Channel = spec(EnumOf(Channel))
    listen_address: str | None = spec(ADDRESS_OPT, default=None)
    capabilities: tuple[str, ...] = spec(ListOf(CAPABILITY, max_len=MAX_CAPABILITIES), default=())


# --------------------------------------------------------------------------------------------
# transcript byte layouts (PROTOCOL.md §5): fixed binary, independent of msgpack encoding


def init_bytes(m: HandshakeInit) -> bytes:
    """u16 min | u16 max | u16 version | u8 n | n x u8 cipher | ephemeral[32] | nonce[32]."""
    head = struct.pack(">HHHB", m.min_version, m.max_version, m.version, len(m.ciphers))
    return head + bytes(m.ciphers) + m.ephemeral + m.nonce


def response_bytes(m: HandshakeResponse) -> bytes:
    """u16 version | u8 cipher | ephemeral[32] | nonce[32]."""
    return struct.pack(">HB", m.version, int(m.cipher)) + m.ephemeral + m.nonce


def init_mac_key(mesh_secret: bytes) -> bytes:
    return crypto.hkdf(mesh_secret, salt=b"", info=L_INIT_MAC, length=32)


def _pack_struct(s: Struct) -> bytes:
    return msgpack.packb(s.to_wire(), use_bin_type=True)  # type: ignore[no-any-return]


def _unpack_struct(cls: type[Struct], data: bytes) -> Any:
    raw = unpack_body(data, what="sealed identity")
    try:
        return cls.from_wire(raw)
    except SchemaViolation as exc:
        raise RemoteProtocolError(str(exc), code=ErrorCode.SCHEMA_VIOLATION) from None
    except LocalProtocolError as exc:
        raise exc.to_remote() from None


def _verify(node_id: bytes, signature: bytes, data: bytes) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(node_id).verify(signature, data)
    except (InvalidSignature, ValueError):
        raise RemoteProtocolError("identity signature does not verify", code=ErrorCode.AUTH_FAILED) from None


def _exchange(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # low-order point: all-zero shared secret
        raise RemoteProtocolError("bad ephemeral key", code=ErrorCode.AUTH_FAILED) from None


class Phase(enum.Enum):
    START = "start"
    AWAIT_INIT = "await-init"
    AWAIT_RESPONSE = "await-response"
    AWAIT_FINISH = "await-finish"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class SessionKeys:
    tx: RecordCipher
    rx: RecordCipher


class Handshake:
    """One side of the handshake. Feed it the peer's handshake messages in order; it returns
    what to send and, when done, ``peer`` and ``keys``. Raises ``RemoteProtocolError`` on any
    failure (then ``phase`` is FAILED); ``keys`` may be set even then (see ``on_finish``)."""

    def __init__(
        self,
        *,
        role: Role,
        identity: Ed25519PrivateKey,
        mesh_secret: bytes,
        options: HandshakeOptions,
        token_bytes: TokenBytes,
    ) -> None:
        if not isinstance(mesh_secret, bytes) or not 16 <= len(mesh_secret) <= 64:
            raise ConfigError("the mesh secret must be 16..64 bytes (new_mesh_secret() makes 32)")
        self.role = role
        self._identity = identity
        self._node_id = crypto.node_id_of(identity)
        self._secret = mesh_secret
        self._options = options
        self._token_bytes = token_bytes
        self._ephemeral: X25519PrivateKey | None = X25519PrivateKey.from_private_bytes(token_bytes(32))
        self.phase = Phase.AWAIT_INIT if role is Role.RESPONDER else Phase.START
        self.peer: PeerInfo | None = None
        self.keys: SessionKeys | None = None
        self._version = 0
        self._cipher = Cipher.AES_256_GCM
        self._dh = b""
        self._th = b""
        self._init_hash = b""
        self._sealed_r = b""

    def _fail(self, exc: RemoteProtocolError) -> RemoteProtocolError:
        self.phase = Phase.FAILED
        return exc

    def wipe(self) -> None:
        """Forget this handshake's secrets: the ephemeral private key, the X25519 result and
        ``keys`` (whose ciphers the connection holds now, if it took them). Call it once the
        handshake is DONE and its keys were taken, or when the connection ends; a handshake
        not DONE becomes FAILED (it accepts nothing more either way)."""
        self._ephemeral = None
        self._dh = b""
        self.keys = None
        if self.phase is not Phase.DONE:
            self.phase = Phase.FAILED

    def _own_ephemeral(self) -> X25519PrivateKey:
        if self._ephemeral is None:
            raise LocalProtocolError("the handshake was wiped", code=ErrorCode.INTERNAL)
        return self._ephemeral

    def _expect(self, phase: Phase, what: str) -> None:
        if self.phase is not phase:
            raise self._fail(RemoteProtocolError(f"{what} not expected in phase {self.phase.value}",
                                                 code=ErrorCode.UNEXPECTED_MESSAGE))

    def _hs_keys(self) -> tuple[bytes, bytes]:
        okm = crypto.hkdf(self._dh, salt=self._secret, info=L_HANDSHAKE_KEYS + self._th, length=64)
        return okm[:32], okm[32:]  # (initiator->responder, responder->initiator)

    def _session(self, th4: bytes) -> SessionKeys:
        okm = crypto.hkdf(self._dh, salt=self._secret, info=L_SESSION_KEYS + th4, length=64)
        i2r, r2i = RecordCipher(self._cipher, okm[:32]), RecordCipher(self._cipher, okm[32:])
        return SessionKeys(tx=i2r, rx=r2i) if self.role is Role.INITIATOR else SessionKeys(tx=r2i, rx=i2r)

    # ---- initiator -------------------------------------------------------------------------

    def initiate(self) -> HandshakeInit:
        """Initiator: the first flight."""
        if self.role is not Role.INITIATOR or self.phase is not Phase.START:
            raise LocalProtocolError("initiate() is for a fresh initiator", code=ErrorCode.INTERNAL)
        o = self._options
        draft = HandshakeInit(
            min_version=o.min_version, max_version=o.max_version, version=o.version,
            ciphers=tuple(int(c) for c in o.ciphers),
            ephemeral=self._own_ephemeral().public_key().public_bytes_raw(),
            nonce=self._token_bytes(32), mac=bytes(32),
        )
        ib = init_bytes(draft)
        mac = crypto.hmac_sha256(init_mac_key(self._secret), ib)
        self._init_hash = ib + mac
        self.phase = Phase.AWAIT_RESPONSE
        return dataclasses.replace(draft, mac=mac)

    def on_response(self, m: HandshakeResponse) -> HandshakeFinish:
        """Initiator: authenticate the responder; returns FINISH. Sets ``peer`` and ``keys``."""
        self._expect(Phase.AWAIT_RESPONSE, "HANDSHAKE_RESPONSE")
        o = self._options
        try:
            if not o.min_version <= m.version <= o.version:
                raise RemoteProtocolError(
                    f"peer chose version {m.version}, we speak {o.min_version}..{o.version}",
                    code=ErrorCode.VERSION_MISMATCH)
            if m.cipher not in o.ciphers:
                raise RemoteProtocolError(f"peer chose cipher {m.cipher.name} we did not offer",
                                          code=ErrorCode.VERSION_MISMATCH)
            self._version, self._cipher = m.version, m.cipher
            self._dh = _exchange(self._own_ephemeral(), m.ephemeral)
            self._th = crypto.sha256(L_TRANSCRIPT, self._init_hash, response_bytes(m))
            k_i2r, k_r2i = self._hs_keys()
            plain = crypto.open_once(m.cipher, k_r2i, m.sealed, self._th, code=ErrorCode.AUTH_FAILED)
            who: ResponderIdentity = _unpack_struct(ResponderIdentity, plain)
            _verify(who.node_id, who.signature, L_SIG_RESPONDER + self._th)
        except RemoteProtocolError as exc:
            raise self._fail(exc) from None
        th3 = crypto.sha256(self._th, m.sealed)
        mine = InitiatorIdentity(
            node_id=self._node_id, signature=self._identity.sign(L_SIG_INITIATOR + th3),
            channel=o.channel, listen_address=o.listen_address, capabilities=o.capabilities,
        )
        sealed = crypto.seal_once(self._cipher, k_i2r, _pack_struct(mine), th3)
        self.keys = self._session(crypto.sha256(th3, sealed))
        self.peer = PeerInfo(node_id=who.node_id, listen_address=who.listen_address, channel=o.channel,
                             capabilities=who.capabilities, protocol_version=m.version)
        self.phase = Phase.DONE
        return HandshakeFinish(sealed=sealed)

    # ---- responder -------------------------------------------------------------------------

    def on_init(self, m: HandshakeInit) -> HandshakeResponse:
        """Responder: check version range, then the mesh-secret MAC; returns RESPONSE."""
        self._expect(Phase.AWAIT_INIT, "HANDSHAKE_INIT")
        try:
            self._version, self._cipher = self._negotiate(m)
            ib = init_bytes(m)
            if not crypto.hmac_verify(init_mac_key(self._secret), ib, m.mac):
                raise RemoteProtocolError("mesh secret proof failed", code=ErrorCode.AUTH_FAILED)
            self._dh = _exchange(self._own_ephemeral(), m.ephemeral)
        except RemoteProtocolError as exc:
            raise self._fail(exc) from None
        o = self._options
        draft = HandshakeResponse(
            version=self._version, cipher=self._cipher,
            ephemeral=self._own_ephemeral().public_key().public_bytes_raw(),
            nonce=self._token_bytes(32), sealed=bytes(crypto.TAG_BYTES),
        )
        self._th = crypto.sha256(L_TRANSCRIPT, ib, m.mac, response_bytes(draft))
        _, k_r2i = self._hs_keys()
        mine = ResponderIdentity(
            node_id=self._node_id, signature=self._identity.sign(L_SIG_RESPONDER + self._th),
            listen_address=o.listen_address, capabilities=o.capabilities,
        )
        sealed = crypto.seal_once(self._cipher, k_r2i, _pack_struct(mine), self._th)
        self._sealed_r = sealed
        self.phase = Phase.AWAIT_FINISH
        return dataclasses.replace(draft, sealed=sealed)

    def _negotiate(self, m: HandshakeInit) -> tuple[int, Cipher]:
        o = self._options
        chosen = min(m.version, o.version)
        if not max(m.min_version, o.min_version) <= chosen <= min(m.max_version, o.max_version):
            raise RemoteProtocolError(
                f"no common protocol version: peer speaks {m.min_version}..{m.max_version} (now {m.version}), "
                f"we speak {o.min_version}..{o.max_version} (now {o.version})",
                code=ErrorCode.VERSION_MISMATCH)
        for c in m.ciphers:
            if c in o.ciphers:
                return chosen, Cipher(c)
        raise RemoteProtocolError("no common cipher", code=ErrorCode.VERSION_MISMATCH)

    def on_finish(self, m: HandshakeFinish) -> None:
        """Responder: authenticate the initiator. ``keys`` is set *before* verification, so
        that even a rejection can be reported encrypted (the initiator already switched)."""
        self._expect(Phase.AWAIT_FINISH, "HANDSHAKE_FINISH")
        th3 = crypto.sha256(self._th, self._sealed_r)
        self.keys = self._session(crypto.sha256(th3, m.sealed))
        k_i2r, _ = self._hs_keys()
        try:
            plain = crypto.open_once(self._cipher, k_i2r, m.sealed, th3, code=ErrorCode.AUTH_FAILED)
            who: InitiatorIdentity = _unpack_struct(InitiatorIdentity, plain)
            _verify(who.node_id, who.signature, L_SIG_INITIATOR + th3)
        except RemoteProtocolError as exc:
            raise self._fail(exc) from None
        self.peer = PeerInfo(node_id=who.node_id, listen_address=who.listen_address, channel=who.channel,
                             capabilities=who.capabilities, protocol_version=self._version)
        self.phase = Phase.DONE
