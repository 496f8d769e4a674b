"""The one error tree of Starmesh.

::

    StarmeshError
    ├── ProtocolError                 the wire was violated; carries an ErrorCode
    │   ├── LocalProtocolError        *we* were about to violate it (a bug or bad input from our caller)
    │   └── RemoteProtocolError       the *peer* violated it: close that connection, serve everyone else
    ├── CodecError                    a tensor chunk could not be encoded/decoded (bad dtype, zstd bomb, size mismatch)
    │   (also a RemoteProtocolError when it came off the wire: see ``RemoteCodecError``)
    ├── TransportError                a socket failed (connect refused, reset, EOF mid-frame)
    ├── TimeoutError                  a deadline passed (handshake, RPC, all-reduce round)
    └── ConfigError                   a user-supplied setting or file is unusable

Foreign exceptions (msgpack, zstandard, cryptography, OSError) are mapped into this tree
at the call site (``map_exceptions``; msgpack's all in ``protocol.schema.unpack_body``);
nothing else escapes a decoder. The receive path of a
connection converts ``LocalProtocolError`` raised while parsing peer bytes into
``RemoteProtocolError`` and moves the connection to its ERROR state (h11's rule).

An exception kept after it was caught (a connection's ``ConnectionTerminated.error``, a
link's close reason) is ``detached`` first: its traceback's frames hold their callers, and
their locals (a link and its buffers), in a cycle only the cyclic GC would free.
"""

from __future__ import annotations

import builtins
import contextlib
import enum
from collections.abc import Iterator, Mapping
from typing import TypeVar

_E = TypeVar("_E", bound=BaseException)


class ErrorCode(enum.IntEnum):
    """Error codes carried in ``ProtocolErrorMsg`` frames and logs (PROTOCOL.md §Errors).

    Append only: a code, once shipped, keeps its number and meaning.
    """

    INTERNAL = 0
    MALFORMED_FRAME = 1
    FRAME_TOO_LARGE = 2
    BAD_MSGPACK = 3
    UNKNOWN_MESSAGE = 4
    SCHEMA_VIOLATION = 5
    VERSION_MISMATCH = 6
    AUTH_FAILED = 7
    DECRYPT_FAILED = 8
    UNEXPECTED_MESSAGE = 9
    HANDSHAKE_TIMEOUT = 10
    CODEC_ERROR = 11
    LIMIT_EXCEEDED = 12
    SHUTTING_DOWN = 13


class StarmeshError(Exception):
    """Base of every error Starmesh raises on purpose."""


class ProtocolError(StarmeshError):
    """The wire protocol was violated. ``code`` says how; the message says where."""

    def __init__(self, msg: str, *, code: ErrorCode = ErrorCode.SCHEMA_VIOLATION) -> None:
        super().__init__(msg)
        self.code = code

    def __reduce__(self) -> tuple[object, ...]:  # keep pickling (tracebacks in executors) working
        return (_rebuild, (type(self), str(self), int(self.code)))


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol forbids."""

    def to_remote(self) -> RemoteProtocolError:
        return RemoteProtocolError(str(self), code=self.code)


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; its connection must be closed."""


class CodecError(StarmeshError):
    """A tensor chunk could not be encoded or decoded."""


class RemoteCodecError(CodecError, RemoteProtocolError):
    """A tensor chunk received from a peer is invalid (bad header, bomb, size mismatch)."""

    def __init__(self, msg: str, *, code: ErrorCode = ErrorCode.CODEC_ERROR) -> None:
        RemoteProtocolError.__init__(self, msg, code=code)


class TransportError(StarmeshError):
    """The byte stream under a connection failed."""


class TimeoutError(StarmeshError, builtins.TimeoutError):
    """A deadline passed. Also an ``builtins.TimeoutError`` so generic handlers catch it."""


class ConfigError(StarmeshError):
    """A user-supplied setting, flag, environment variable or file is unusable."""


def detached(error: _E) -> _E:
    """``error`` made fit to be stored: without its traceback (whose frames keep every caller
    up the stack alive, with its locals) and without the ``__cause__`` / ``__context__`` chain
    (each link has a traceback of its own, and a foreign exception may hold the very data it
    failed on, e.g. msgpack's ``ExtraData``). The message and ``code`` say what happened.
    Modifies ``error`` in place and returns it."""
    error.__traceback__ = None
    error.__cause__ = None
    error.__context__ = None
    return error


def _rebuild(cls: type[ProtocolError], msg: str, code: int) -> ProtocolError:
    return cls(msg, code=ErrorCode(code))


@contextlib.contextmanager
def map_exceptions(
    mapping: Mapping[type[BaseException], type[StarmeshError]],
    *,
    code: ErrorCode = ErrorCode.INTERNAL,
) -> Iterator[None]:
    """Re-raise foreign exceptions listed in ``mapping`` as the mapped Starmesh error.

    ``code`` is used when the target is a ``ProtocolError`` subclass. Example (decoding a
    tensor chunk off the wire)::

        with map_exceptions({ValueError: RemoteCodecError}, code=ErrorCode.CODEC_ERROR):
            values = VALUES[value].decode(parts, block=chunk.block)

    msgpack is not unpacked this way: every decoder goes through
    ``protocol.schema.unpack_body``, which maps all of msgpack's failures in one place.
    """
    try:
        yield
    except StarmeshError:
        raise
    except Exception as exc:
        for foreign, target in mapping.items():
            if isinstance(exc, foreign):
                if issubclass(target, ProtocolError):
                    raise target(f"{type(exc).__name__}: {exc}", code=code) from exc
                raise target(f"{type(exc).__name__}: {exc}") from exc
        raise
