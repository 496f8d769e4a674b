"""Typed, bounded message schemas and the one decoder per direction.

A wire message is a frozen dataclass whose fields each carry a ``Spec`` (type, range,
length cap). Construction validates every field (``__post_init__``), so an invalid
message object cannot exist: building one raises ``LocalProtocolError``. On the wire a
message is a msgpack *map* ``{"t": <MsgType>, "<field>": <value>, ...}`` with named
fields, never a positional array (PROTOCOL.md §Messages).

Decoding (``decode_body``) is the only way bytes become messages. It unpacks with hard
caps on every msgpack length, refuses ext types, then checks the type tag and each field
against its spec. Any failure is a ``RemoteProtocolError`` with an ``ErrorCode``; no other
exception escapes. Unknown *keys* are ignored (a newer peer may add optional fields);
unknown *tags* are rejected.

Defining a message::

    @register
    @dataclass(frozen=True, slots=True, kw_only=True)
    class Ping(Message):
        TAG: ClassVar[MsgType] = MsgType.PING
        seq: int = spec(UInt(32))
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import msgpack

from protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocol.limits import (
    MAX_CONTAINERS,
    MAX_FRAME_BYTES,
    MAX_LIST_LEN,
    MAX_MAP_LEN,
    MAX_STR_BYTES,
)
from protocol.tags import MsgType

_SPEC_KEY = "starmesh_spec"


class SchemaViolation(Exception):
    """Internal: a value does not fit its spec. Converted to Local/RemoteProtocolError."""


class Spec(abc.ABC):
    """How one field is typed, bounded, and put on / taken off the wire."""

    __slots__ = ()

    @abc.abstractmethod
    def check(self, value: Any, where: str) -> None:
        """Raise ``SchemaViolation`` unless ``value`` (a Python-side value) fits."""

    def to_wire(self, value: Any) -> Any:
        return value

    def from_wire(self, raw: Any, where: str) -> Any:
        """Convert a msgpack-decoded value to the Python-side value (then ``check``ed)."""
        return raw


@dataclass(frozen=True, slots=True)
class UInt(Spec):
    """Unsigned integer of at most ``bits`` bits (``0 <= v < 2**bits``)."""

    bits: int = 64

    def check(self, value: Any, where: str) -> None:
        if type(value) is not int or not 0 <= value < (1 << self.bits):
            raise SchemaViolation(f"{where}: expected uint{self.bits}, got {value!r:.60}")


@dataclass(frozen=True, slots=True)
class IntRange(Spec):
    """Integer with ``lo <= v <= hi``."""

    lo: int
    hi: int

    def check(self, value: Any, where: str) -> None:
        if type(value) is not int or not self.lo <= value <= self.hi:
            raise SchemaViolation(f"{where}: expected int in [{self.lo}, {self.hi}], got {value!r:.60}")


@dataclass(frozen=True, slots=True)
class Float(Spec):
    """Finite float with ``lo <= v <= hi`` (msgpack float64). Ints are accepted on decode."""

    lo: float = -math.inf
    hi: float = math.inf

    def check(self, value: Any, where: str) -> None:
        if type(value) is not float or not math.isfinite(value) or not self.lo <= value <= self.hi:
            raise SchemaViolation(f"{where}: expected finite float in [{self.lo}, {self.hi}], got {value!r:.60}")

    def from_wire(self, raw: Any, where: str) -> Any:
        return float(raw) if type(raw) is int else raw


@dataclass(frozen=True, slots=True)
class Bool(Spec):
    def check(self, value: Any, where: str) -> None:
        if type(value) is not bool:
            raise SchemaViolation(f"{where}: expected bool, got {value!r:.60}")


@dataclass(frozen=True, slots=True)
class Bytes(Spec):
    """Binary string with ``min_len <= len <= max_len``. With ``views`` a sender may also give
    a read-only, C-contiguous byte ``memoryview`` (packed as is: no copy of a large payload);
    a receiver always gets ``bytes``."""

    max_len: int
    min_len: int = 0
    views: bool = False

    def check(self, value: Any, where: str) -> None:
        if self.views and type(value) is memoryview:
            if not (value.readonly and value.c_contiguous and value.format == "B"
                    and self.min_len <= value.nbytes <= self.max_len):
                raise SchemaViolation(f"{where}: expected a read-only contiguous byte view of "
                                      f"{self.min_len}..{self.max_len} bytes")
            return
        if type(value) is not bytes or not self.min_len <= len(value) <= self.max_len:
            n = len(value) if isinstance(value, bytes | bytearray | memoryview) else "?"
            raise SchemaViolation(f"{where}: expected {self.min_len}..{self.max_len} bytes, got {type(value).__name__}[{n}]")


@dataclass(frozen=True, slots=True)
class Str(Spec):
    """UTF-8 string of at most ``max_len`` characters, optionally matching ``pattern`` fully."""

    max_len: int = MAX_STR_BYTES
    pattern: str | None = None

    def check(self, value: Any, where: str) -> None:
        if type(value) is not str or len(value) > self.max_len:
            raise SchemaViolation(f"{where}: expected str of <= {self.max_len} chars, got {value!r:.60}")
        if self.pattern is not None and re.fullmatch(self.pattern, value) is None:
            raise SchemaViolation(f"{where}: {value!r:.60} does not match {self.pattern}")


E = TypeVar("E", bound=enum.IntEnum)


@dataclass(frozen=True, slots=True)
class EnumOf(Spec):
    """An ``IntEnum`` member; an int on the wire. Unknown values are rejected."""

    enum_cls: type[enum.IntEnum]

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, self.enum_cls):
            raise SchemaViolation(f"{where}: expected {self.enum_cls.__name__}, got {value!r:.60}")

    def to_wire(self, value: Any) -> Any:
        return int(value)

    def from_wire(self, raw: Any, where: str) -> Any:
        if type(raw) is not int:
            raise SchemaViolation(f"{where}: expected int for {self.enum_cls.__name__}, got {raw!r:.60}")
        try:
            return self.enum_cls(raw)
        except ValueError:
            raise SchemaViolation(f"{where}: unknown {self.enum_cls.__name__} value {raw}") from None


@dataclass(frozen=True, slots=True)
class Optional(Spec):
    """``None`` (msgpack nil) or a value of ``inner``."""

    inner: Spec

    def check(self, value: Any, where: str) -> None:
        if value is not None:
            self.inner.check(value, where)

    def to_wire(self, value: Any) -> Any:
        return None if value is None else self.inner.to_wire(value)

    def from_wire(self, raw: Any, where: str) -> Any:
        return None if raw is None else self.inner.from_wire(raw, where)


@dataclass(frozen=True, slots=True)
class ListOf(Spec):
    """A tuple (msgpack array) of at most ``max_len`` items of ``item``."""

    item: Spec
    max_len: int = MAX_LIST_LEN

    def check(self, value: Any, where: str) -> None:
        if type(value) is not tuple or len(value) > self.max_len:
            raise SchemaViolation(f"{where}: expected tuple of <= {self.max_len} items, got {type(value).__name__}")
        for i, v in enumerate(value):
            self.item.check(v, f"{where}[{i}]")

    def to_wire(self, value: Any) -> Any:
        return [self.item.to_wire(v) for v in value]

    def from_wire(self, raw: Any, where: str) -> Any:
        if type(raw) is not list or len(raw) > self.max_len:
            raise SchemaViolation(f"{where}: expected array of <= {self.max_len} items")
        return tuple(self.item.from_wire(v, f"{where}[{i}]") for i, v in enumerate(raw))


@dataclass(frozen=True, slots=True)
class StructOf(Spec):
    """A nested ``Struct`` (msgpack map of named fields, no type tag)."""

    cls: type[Struct]

    def check(self, value: Any, where: str) -> None:
        if type(value) is not self.cls:
            raise SchemaViolation(f"{where}: expected {self.cls.__name__}, got {type(value).__name__}")

    def to_wire(self, value: Any) -> Any:
        return value.to_wire()

    def from_wire(self, raw: Any, where: str) -> Any:
        return self.cls.from_wire(raw, where)


def spec(s: Spec, *, default: Any = dataclasses.MISSING) -> Any:
    """Declare a dataclass field with its wire spec (and an optional immutable default)."""
    return dataclasses.field(default=default, metadata={_SPEC_KEY: s})


_FIELD_CACHE: dict[type, tuple[tuple[str, Spec, bool], ...]] = {}


def _fields_of(cls: type) -> tuple[tuple[str, Spec, bool], ...]:
    """(name, spec, required) for each field of a Struct/Message class, cached."""
    got = _FIELD_CACHE.get(cls)
    if got is None:
        out = []
        for f in dataclasses.fields(cls):
            s = f.metadata.get(_SPEC_KEY)
            if s is None:
                raise TypeError(f"{cls.__name__}.{f.name} has no wire spec")
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            out.append((f.name, s, required))
        got = _FIELD_CACHE[cls] = tuple(out)
    return got


class Struct:
    """Base of every schema'd dataclass. Validates all fields on construction."""

    __slots__ = ()

    def __post_init__(self) -> None:
        where = type(self).__name__
        for name, s, _ in _fields_of(type(self)):
            try:
                s.check(getattr(self, name), f"{where}.{name}")
            except SchemaViolation as exc:
                raise LocalProtocolError(str(exc), code=ErrorCode.SCHEMA_VIOLATION) from None

    def to_wire(self) -> dict[str, Any]:
        return {name: s.to_wire(getattr(self, name)) for name, s, _ in _fields_of(type(self))}

    @classmethod
    def from_wire(cls, raw: Any, where: str = "") -> Any:
        """Build from a msgpack-decoded map; raises ``SchemaViolation`` or ``LocalProtocolError``."""
        where = where or cls.__name__
        if type(raw) is not dict:
            raise SchemaViolation(f"{where}: expected map, got {type(raw).__name__}")
        kwargs: dict[str, Any] = {}
        for name, s, required in _fields_of(cls):
            if name in raw:
                kwargs[name] = s.from_wire(raw[name], f"{where}.{name}")
            elif required:
                raise SchemaViolation(f"{where}: missing field {name!r}")
        return cls(**kwargs)


class Message(Struct):
    """A top-level wire message: a Struct with a stable integer type tag."""

    __slots__ = ()
    TAG: ClassVar[MsgType]
    BLOB: ClassVar[tuple[str, ...]] = ()
    """Field path of a large ``Bytes`` field that encodes last (each step the last field of
    its struct), e.g. ``("data", "payload")``; see ``encode_split``. Empty: none."""

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": int(self.TAG)}  # the tag first, then the fields in order
        out.update(Struct.to_wire(self))
        return out


REGISTRY: dict[MsgType, type[Message]] = {}

M = TypeVar("M", bound=type[Message])


#: Message classes with a ``BLOB`` field, by their integer tag (what ``split_head`` reads).
_BLOB_CLASSES: dict[int, type[Message]] = {}


def _check_blob_path(cls: type[Message]) -> None:
    """A ``BLOB`` path runs through last fields, nested structs, to a ``Bytes(views=True)``."""
    owner: type = cls
    for depth, name in enumerate(cls.BLOB):
        fields = _fields_of(owner)
        last, s, _ = fields[-1]
        if last != name:
            raise TypeError(f"{cls.__name__}.BLOB: {name!r} is not the last field of {owner.__name__}")
        if depth == len(cls.BLOB) - 1:
            if not (isinstance(s, Bytes) and s.views):
                raise TypeError(f"{cls.__name__}.BLOB must end at a Bytes(views=True) field")
        elif isinstance(s, StructOf):
            owner = s.cls
        else:
            raise TypeError(f"{cls.__name__}.BLOB: {name!r} is not a nested struct")
    _fields_of(cls)


def register(cls: M) -> M:
    """Add a message class to the tag table. A tag is bound exactly once."""
    tag = cls.TAG
    if tag in REGISTRY and REGISTRY[tag] is not cls:
        raise TypeError(f"tag {tag!r} already bound to {REGISTRY[tag].__name__}")
    if "t" in {f.name for f in dataclasses.fields(cls)}:  # type: ignore[arg-type]
        raise TypeError(f"{cls.__name__}: field name 't' is reserved for the type tag")
    _check_blob_path(cls)
    REGISTRY[tag] = cls
    if cls.BLOB:
        _BLOB_CLASSES[int(tag)] = cls
    return cls


def _no_ext(code: int, data: bytes) -> Any:
    raise SchemaViolation(f"msgpack ext type {code} is not allowed")


def _unpack_options() -> dict[str, Any]:
    """The caps and hooks of every unpack: one budget of arrays and maps per message."""
    budget = MAX_CONTAINERS

    def count(obj: Any) -> Any:  # called once per array and map as it is built
        nonlocal budget
        budget -= 1
        if budget < 0:
            raise SchemaViolation(f"more than {MAX_CONTAINERS} arrays and maps in one message")
        return obj

    return {
        "object_hook": count, "list_hook": count, "raw": False, "use_list": True,
        "strict_map_key": True, "ext_hook": _no_ext, "max_str_len": MAX_FRAME_BYTES,
        "max_bin_len": MAX_FRAME_BYTES, "max_array_len": MAX_LIST_LEN, "max_map_len": MAX_MAP_LEN,
        "max_ext_len": 0,
    }


#: Everything unpacking hostile bytes can raise: msgpack's own errors (``ExtraData``,
#: ``FormatError``, ``StackError``, ``OutOfData`` and friends are ``ValueError`` subclasses),
#: ``TypeError`` (e.g. an unhashable map key), ``RecursionError`` (deep nesting) and the
#: ``SchemaViolation`` of our hooks (an ext type, the container budget).
UNPACK_ERRORS: tuple[type[Exception], ...] = (
    msgpack.UnpackException, ValueError, TypeError, RecursionError, SchemaViolation,
)


def unpack_body(body: bytes, *, what: str = "") -> Any:
    """Unpack one msgpack value within the caps of PROTOCOL.md §7 (no ext types, one budget of
    containers). Anything wrong is ``RemoteProtocolError(BAD_MSGPACK)``; ``what`` names the
    value in the message (``"sealed identity"``). The one unpack of every decoder."""
    try:
        return msgpack.unpackb(body, **_unpack_options())
    except UNPACK_ERRORS as exc:
        if isinstance(exc, SchemaViolation):
            detail = str(exc)
        else:
            where = f" in {what}" if what else ""
            detail = f"bad msgpack{where}: {type(exc).__name__}: {exc}"
        raise RemoteProtocolError(detail[:200], code=ErrorCode.BAD_MSGPACK) from None


#: Bytes of a body ``split_head`` looks at: a BLOB message's fields before its payload fit.
SPLIT_HEAD_BYTES = 4096
_BIN_HEADERS = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def split_head(head: bytes | bytearray | memoryview, size: int) -> tuple[dict[str, Any], int] | None:
    """Find the payload of a ``BLOB`` message from the first bytes of its body.

    ``head`` is the start of a ``size``-byte body. If the body is a map whose first key is
    ``"t"`` naming a message class with a ``BLOB`` path, each map on that path ends with the
    path's key, and the last value is a bin running exactly to the end of the body, returns
    ``(raw, offset)``: the unpacked map with ``b""`` in place of the payload and the payload's
    offset in the body. Else None, and the caller decodes the whole body as usual
    (``decode_body``), so this only ever saves a copy: with the payload put back, ``raw`` is
    what unpacking the whole body gives, and is then validated the same way."""
    unpacker = msgpack.Unpacker(**_unpack_options())
    unpacker.feed(head[:SPLIT_HEAD_BYTES])
    try:
        pairs = unpacker.read_map_header()
        if pairs < 1 or unpacker.unpack() != "t":
            return None
        tag = unpacker.unpack()
        cls = _BLOB_CLASSES.get(tag) if type(tag) is int else None
        if cls is None:
            return None
        raw: dict[str, Any] = {"t": tag}
        obj, pairs = raw, pairs - 1
        for depth, name in enumerate(cls.BLOB):
            for _ in range(pairs - 1):
                key = unpacker.unpack()
                if type(key) is not str:  # the full decoder rejects it (strict_map_key)
                    return None
                obj[key] = unpacker.unpack()
            if pairs < 1 or unpacker.unpack() != name:
                return None
            if depth == len(cls.BLOB) - 1:
                break
            pairs = unpacker.read_map_header()
            child: dict[str, Any] = {}
            obj[name] = child
            obj = child
        pos = unpacker.tell()
    except UNPACK_ERRORS:
        return None  # anything odd: the full decoder gives the verdict
    width = _BIN_HEADERS.get(head[pos]) if pos < len(head) else None
    if width is None or pos + 1 + width > len(head):
        return None
    offset = pos + 1 + width
    if offset + int.from_bytes(head[pos + 1:offset], "big") != size:
        return None
    obj[cls.BLOB[-1]] = b""
    return raw, offset


def _blob_parent(wire: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """The map of a wire-form message that holds the ``BLOB`` field at ``path``."""
    for name in path[:-1]:
        wire = wire[name]
    return wire


def put_blob(raw: dict[str, Any], blob: bytes | memoryview) -> None:
    """Put a payload found by ``split_head`` back into its place in ``raw``."""
    path = _BLOB_CLASSES[raw["t"]].BLOB
    _blob_parent(raw, path)[path[-1]] = blob


def encode_body(msg: Message) -> bytes:
    """Serialize a (valid by construction) message to its msgpack body."""
    return msgpack.packb(msg.to_wire(), use_bin_type=True)  # type: ignore[no-any-return]


_EMPTY_BIN = b"\xc4\x00"


def bin_header(n: int) -> bytes:
    """The shortest msgpack bin header for ``n`` bytes."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def blob_size(msg: Message) -> int:
    """Bytes of ``msg``'s ``BLOB`` field (0 without one), read without encoding anything."""
    obj: Any = msg
    for name in type(msg).BLOB:
        obj = getattr(obj, name)
    return len(obj) if type(msg).BLOB else 0


def encode_split(msg: Message) -> tuple[bytes, bytes | memoryview] | None:
    """``(head, blob)`` with ``head + blob == encode_body(msg)`` for a message whose ``BLOB``
    field encodes last (None otherwise): a sender can seal the two back to back and never copy
    a multi-MiB payload into a msgpack buffer."""
    path = type(msg).BLOB
    if not path:
        return None
    wire = msg.to_wire()
    parent = _blob_parent(wire, path)
    blob = parent[path[-1]]
    parent[path[-1]] = b""
    packed: bytes = msgpack.packb(wire, use_bin_type=True)
    if not packed.endswith(_EMPTY_BIN):  # pragma: no cover - BLOB names a field that is not last
        return None
    return packed[: -len(_EMPTY_BIN)] + bin_header(len(blob)), blob


def decode_body(body: bytes, *, allowed: Callable[[MsgType], bool] | None = None) -> Message:
    """Parse one msgpack body into a message. The only decoder; raises only ``RemoteProtocolError``.

    ``allowed`` optionally restricts which tags are acceptable in the current state.
    """
    return message_from_obj(unpack_body(body), allowed=allowed)


def message_from_obj(raw: Any, *, allowed: Callable[[MsgType], bool] | None = None) -> Message:
    """Validate an already-unpacked object as a message (used by ``decode_body`` and simulators)."""
    if type(raw) is not dict:
        raise RemoteProtocolError("message body is not a map", code=ErrorCode.SCHEMA_VIOLATION)
    tag_raw = raw.get("t")
    if type(tag_raw) is not int:
        raise RemoteProtocolError("message has no integer type tag 't'", code=ErrorCode.SCHEMA_VIOLATION)
    try:
        tag = MsgType(tag_raw)
        cls = REGISTRY[tag]
    except (ValueError, KeyError):
        raise RemoteProtocolError(f"unknown message type {tag_raw}", code=ErrorCode.UNKNOWN_MESSAGE) from None
    if allowed is not None and not allowed(tag):
        raise RemoteProtocolError(f"{tag.name} not allowed here", code=ErrorCode.UNEXPECTED_MESSAGE)
    try:
        msg: Message = cls.from_wire(raw)
    except SchemaViolation as exc:
        raise RemoteProtocolError(str(exc), code=ErrorCode.SCHEMA_VIOLATION) from None
    except LocalProtocolError as exc:
        raise exc.to_remote() from None
    return msg


def check_registry_complete(tags: type[MsgType], registry: Mapping[MsgType, type[Message]]) -> None:
    """Raise if some tag in the table has no message class (called once at import)."""
    missing = [t.name for t in tags if t not in registry]
    if missing:
        raise TypeError(f"message tags without a class: {missing}")
