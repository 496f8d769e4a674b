"""A training job's data from a file or a directory, as one blob (``python -m node train --data``).

Two kinds (``JobSpec.data_kind``):

``text``
    A file of text: the blob is the file, byte for byte. The char GPT's vocabulary is its sorted
    characters, as for the built-in tiny Shakespeare: UTF-8 when the file decodes as UTF-8,
    else one character per byte (Latin-1), so any file of bytes trains.

``tokens``
    A directory of ``.npy`` files (each one 1-D integer array; no pickles) and/or
    ``.safetensors`` files (each exactly one 1-D integer tensor), or one such file: the token
    stream is their concatenation in sorted file-name order. Other files and subdirectories are
    left out. The blob is a *deterministic archive* of the arrays: an uncompressed POSIX tar
    (``PAX`` format) of just those files, flat names in sorted order, mtime 0, uid/gid 0, no
    owner names, mode 0644. The same arrays always make the same bytes, so the same blob id.

``pack(path)`` reads and checks the data where the job is submitted (``DataError``: missing,
empty, no usable arrays, a non-integer or multi-dimensional array, negative ids, a vocabulary
past ``MAX_VOCAB``) and returns a ``Packed``: the file to put into the blob cache (a
directory's archive in a temporary directory, removed by ``Packed.close``) and the data's
fingerprint (name, kind, bytes, sha256, tokens, vocabulary). ``store(packed, blobs, copies=)``
puts it, pinned, into the blob cache of the node the submitter talks to and has that node keep
``copies`` leased copies on other members (as checkpoints are kept); the ``JobSpec`` carries
the blob id and those holders (``spec_fields``), and each worker's node fetches the blob
before it opens the job (``node.training.service``). On a worker
``read_tokens(path)`` reads the archive back (or a directory, for the one-process reference),
checking it again as untrusted bytes: only regular files with flat, sorted, distinct names,
each array's bytes inside its member. Arrays are memory-mapped, not copied, until they are
joined into one ``int64`` stream.

Bounds: ``MAX_FILES`` arrays, ``MAX_NAME`` characters a name, ``MAX_HEADER`` bytes of a
safetensors header, ``MAX_BLOB_BYTES`` in all (the blob cache's own limit).

This module has no torch: the submitter never imports it; the worker side wraps the numpy
stream (``node.training.runner.data``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from node.blobs.manifest import MAX_BLOB_BYTES
from protocol.errors import ConfigError
from protocol.messages.training import MAX_DATA_HOLDERS

if TYPE_CHECKING:
    from node.blob_client import AsyncBlobClient

#: Arrays (files) of one token directory.
MAX_FILES = 10_000
#: Characters of a file name in a token directory (and of ``JobSpec.data_name``).
MAX_NAME = 255
#: Bytes of a ``.safetensors`` header (its JSON): one tensor's needs a few hundred.
MAX_HEADER = 1 << 20
#: The largest vocabulary a token stream may ask for (its largest id + 1).
MAX_VOCAB = 1 << 20
#: What a token directory's files end with.
SUFFIXES = (".npy", ".safetensors")
#: The built-in text's bytes and sha256 (``node.training.runner.data`` ships it).
SHAKESPEARE_BYTES = 1_115_394
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
#: The built-in text's fingerprint, as the job summary's ``data`` shows it.
SHAKESPEARE: dict[str, Any] = {"name": "shakespeare", "kind": "builtin", "bytes": SHAKESPEARE_BYTES,
                               "sha256": SHAKESPEARE_SHA256}
#: The char GPT's default context length (``CharConfig.block_size``; a test keeps them equal).
CHARLM_BLOCK = 64

_SAFETENSORS_INTS = {"I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8",
                     "U8": "<u1", "U16": "<u2", "U32": "<u4", "U64": "<u8"}
_HASH_PIECE = 1 << 20


class DataError(ConfigError, ValueError):
    """The training data is missing, empty, malformed or too short for the job (at the
    submitter a usage error, exit 2; on a worker the seat's failure type)."""


@dataclass(frozen=True, slots=True)
class Array:
    """One 1-D integer array inside a file: where its elements start and what they are."""

    name: str
    dtype: np.dtype[Any]
    count: int
    offset: int
    """Byte offset of element 0 in the file that holds it."""


@dataclass(frozen=True, slots=True)
class Packed:
    """What ``pack`` made: the file to put as the job's data blob, and its fingerprint."""

    path: Path
    """The blob's bytes: the text file itself, or the archive ``pack`` wrote."""
    name: str
    kind: str
    """``text`` or ``tokens`` (module docstring)."""
    size: int
    sha256: str
    tokens: int
    """Characters of a text, ids of a token stream."""
    vocab: int
    """Distinct characters of a text; largest id + 1 of a token stream."""
    files: int = 1
    tmp: Path | None = None
    """The temporary directory ``pack`` made for an archive (``close`` removes it)."""

    def fingerprint(self) -> dict[str, Any]:
        """The job summary's ``data`` entry (without the blob id, which the cache assigns)."""
        return {"name": self.name, "kind": self.kind, "bytes": self.size, "sha256": self.sha256,
                "tokens": self.tokens, "vocab": self.vocab, "files": self.files}

    def close(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class Stored:
    """Where ``store`` put the data: its blob id and the members holding it."""

    blob: bytes
    holders: tuple[bytes, ...]
    note: str = ""
    """Why fewer copies than asked were confirmed (the node keeps trying); empty if all were."""


# ------------------------------------------------------------------------------ submitter


def pack(path: str | Path) -> Packed:
    """Check the data at ``path`` and make its blob file (module docstring); close it when done.

    ``DataError`` for a path that is missing or neither a file nor a directory, an empty text,
    and whatever ``read_tokens`` refuses."""
    source = Path(path).expanduser()
    name = source.resolve().name[:MAX_NAME] if source.exists() else source.name[:MAX_NAME]
    if source.is_dir() or (source.is_file() and source.name.endswith(SUFFIXES)):
        files = token_files(source)
        tmp = Path(tempfile.mkdtemp(prefix="starmesh-data-"))
        try:
            archive = tmp / "data.tar"
            write_archive(files, archive)
            arrays = token_arrays(archive)
            vocab = max(int(a.max()) for a in arrays) + 1
            if vocab > MAX_VOCAB:
                raise DataError(f"{source}: the largest token id is {vocab - 1}: more than a vocabulary "
                                f"of {MAX_VOCAB} allows")
            return Packed(path=archive, name=name, kind="tokens", size=archive.stat().st_size,
                          sha256=sha256_of(archive), tokens=sum(map(len, arrays)), vocab=vocab,
                          files=len(files), tmp=tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if not source.is_file():
        raise DataError(f"{source}: no such file or directory" if not source.exists()
                        else f"{source}: not a regular file or a directory")
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {source}: {exc}") from exc
    if not raw:
        raise DataError(f"{source} is empty")
    if len(raw) > MAX_BLOB_BYTES:
        raise DataError(f"{source}: {len(raw)} bytes, more than a blob holds ({MAX_BLOB_BYTES})")
    text = text_of(raw)
    return Packed(path=source, name=name, kind="text", size=len(raw), sha256=hashlib.sha256(raw).hexdigest(),
                  tokens=len(text), vocab=len(set(text)))


async def store(packed: Packed, blobs: AsyncBlobClient, *, copies: int, timeout: float = 60.0) -> Stored:
    """Put ``packed`` (pinned) into the blob cache of the node ``blobs`` talks to and have it keep
    ``copies`` leased copies on other members (0: none, a mesh of one). A copy not confirmed
    within ``timeout`` is a ``note``, not an error: the node holds the blob and keeps trying.
    ``BlobRefused`` (no space, too large) and the client's transport errors."""
    from node.blob_client import ReplicationTimeout

    blob_id = await blobs.put(packed.path, pin=True)
    link = blobs.link.link
    holders = [link.peer.node_id] if link is not None and link.peer is not None else []
    note = ""
    if copies > 0:
        try:
            copied = await blobs.replicate(blob_id, copies, timeout=timeout)
        except ReplicationTimeout as exc:
            copied, note = exc.holders, str(exc)
        holders += [bytes.fromhex(h) for h in copied]
    return Stored(blob=blob_id.raw, holders=tuple(dict.fromkeys(holders))[:MAX_DATA_HOLDERS], note=note)


def spec_fields(packed: Packed, stored: Stored) -> dict[str, Any]:
    """The ``JobSpec`` fields that name the stored data."""
    return {"data": stored.blob, "data_kind": packed.kind, "data_name": packed.name,
            "data_bytes": packed.size, "data_holders": stored.holders}


def token_files(source: Path) -> list[Path]:
    """The ``.npy`` / ``.safetensors`` files of directory ``source`` (or ``source`` itself), in
    sorted name order; ``DataError`` if there are none or too many."""
    if source.is_file():
        return [source]
    try:
        found = sorted((p for p in source.iterdir() if p.name.endswith(SUFFIXES) and p.is_file()),
                       key=lambda p: p.name)
    except OSError as exc:
        raise DataError(f"cannot list {source}: {exc}") from exc
    if not found:
        raise DataError(f"{source}: no .npy or .safetensors arrays in the directory")
    if len(found) > MAX_FILES:
        raise DataError(f"{source}: {len(found)} arrays, more than {MAX_FILES}")
    for p in found:
        if len(p.name) > MAX_NAME:
            raise DataError(f"{p}: a name longer than {MAX_NAME} characters")
    return found


def write_archive(files: list[Path], out: Path) -> None:
    """The deterministic tar of ``files`` (module docstring) at ``out``."""

    def normal(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
        return info

    try:
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
            for f in files:
                tar.add(f, arcname=f.name, recursive=False, filter=normal)
    except OSError as exc:
        raise DataError(f"cannot pack the arrays into {out}: {exc}") from exc


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(_HASH_PIECE):
            h.update(piece)
    return h.hexdigest()


def text_of(raw: bytes) -> str:
    """A text file's characters: UTF-8 if it decodes, else one per byte (Latin-1)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def charlm_fits(tokens: int, *, block: int, shards: int) -> str | None:
    """Why ``tokens`` ids are too few for the char GPT's 90/10 split at ``block`` and
    ``shards`` (None: they are enough). The same arithmetic as ``charlm.CharData``: the
    training split needs ``shards`` windows, the validation split one."""
    cut = int(0.9 * tokens)
    windows = (cut - 2 * block) // block + 1
    if windows < shards:
        return (f"{tokens} tokens give a training split of {cut}: {max(0, windows)} windows of {block}, "
                f"fewer than the {shards} shards (use more data, or lower --shards or block_size)")
    if (tokens - cut - 1) // block < 1:
        return f"{tokens} tokens give a validation split of {tokens - cut}: shorter than a window of {block}"
    return None


# ------------------------------------------------------------------------------ both sides


def read_tokens(path: str | Path) -> np.ndarray[Any, np.dtype[np.int64]]:
    """The token stream of an archive ``pack`` wrote, or of a directory / array file: ``int64``
    ids, checked (1-D integer arrays, no negative ids, at least one id). ``DataError``."""
    return np.concatenate(token_arrays(path), dtype=np.int64, casting="unsafe")  # in range: checked


def token_arrays(path: str | Path) -> list[np.ndarray[Any, Any]]:
    """The non-empty arrays of ``read_tokens``'s stream, memory-mapped, each checked: ids in
    ``0 ..= int64 max``, at least one in all. ``DataError``."""
    source = Path(path)
    parts: list[np.ndarray[Any, Any]] = []
    try:
        if source.is_dir() or source.name.endswith(SUFFIXES):
            for f in token_files(source):
                with open(f, "rb") as fh:
                    array = parse_array(fh, name=f.name, start=0, size=os.fstat(fh.fileno()).st_size)
                parts.append(_mapped(f, array))
        else:
            parts.extend(_mapped(source, array) for array in _archive_arrays(source))
    except OSError as exc:
        raise DataError(f"cannot read the token data {source}: {exc}") from exc
    full = [p for p in parts if len(p)]
    if not full:
        raise DataError(f"{source}: no tokens (every array is empty)")
    if min(int(p.min()) for p in full) < 0:
        raise DataError(f"{source}: negative token ids")
    if max(int(p.max()) for p in full) > np.iinfo(np.int64).max:
        raise DataError(f"{source}: token ids past int64")
    return full


def _archive_arrays(path: Path) -> Iterator[Array]:
    count = 0
    try:
        with tarfile.open(path, "r:") as tar, open(path, "rb") as raw:
            file_size = os.fstat(raw.fileno()).st_size
            last = ""
            for member in tar:
                count += 1
                if count > MAX_FILES:
                    raise DataError(f"{path}: more than {MAX_FILES} arrays")
                name = member.name
                if (not member.isreg() or "/" in name or name in ("", ".", "..") or len(name) > MAX_NAME
                        or not name.endswith(SUFFIXES)):
                    raise DataError(f"{path}: archive member {name[:80]!r} is not a flat .npy/.safetensors file")
                if name <= last:
                    raise DataError(f"{path}: archive members out of order at {name[:80]!r}")
                last = name
                if member.offset_data + member.size > file_size:
                    raise DataError(f"{path}: archive member {name[:80]!r} runs past the end of the file")
                yield parse_array(raw, name=name, start=member.offset_data, size=member.size)
    except tarfile.TarError as exc:
        raise DataError(f"{path} is not a token archive: {exc}") from exc
    if count == 0:
        raise DataError(f"{path}: an empty token archive")


def parse_array(f: IO[bytes], *, name: str, start: int, size: int) -> Array:
    """The one 1-D integer array of the ``.npy`` / ``.safetensors`` bytes at ``start`` (``size``
    bytes) of ``f``; ``DataError`` if it is anything else."""
    f.seek(start)
    if name.endswith(".npy"):
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy version {version}")
        except (ValueError, OSError, SyntaxError, TypeError) as exc:
            raise DataError(f"{name}: not a .npy array: {exc}") from None
        offset = f.tell()
        return _checked(name, dtype, shape, offset, start + size)
    header_at = start + 8
    head = f.read(8)
    if len(head) < 8:
        raise DataError(f"{name}: too short for a .safetensors file")
    (length,) = struct.unpack("<Q", head)
    if length > MAX_HEADER or header_at + length > start + size:
        raise DataError(f"{name}: a .safetensors header of {length} bytes (at most {MAX_HEADER}, inside the file)")
    try:
        header = json.loads(f.read(length))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{name}: a .safetensors header that is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise DataError(f"{name}: a .safetensors header that is not an object")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(tensors) != 1:
        raise DataError(f"{name}: {len(tensors)} tensors; a token file holds exactly one")
    (key, entry), = tensors.items()
    if not isinstance(entry, dict):
        raise DataError(f"{name}: tensor {key!r} has no dtype, shape and offsets")
    tag, dims, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if tag not in _SAFETENSORS_INTS:
        raise DataError(f"{name}: tensor {key!r} is {tag!r}, not an integer tensor")
    if (not isinstance(dims, list) or not all(type(s) is int and s >= 0 for s in dims)
            or not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)):
        raise DataError(f"{name}: tensor {key!r} has a malformed shape or offsets")
    np_dtype = np.dtype(_SAFETENSORS_INTS[tag])
    array = _checked(name, np_dtype, tuple(dims), header_at + length + offsets[0], start + size)
    if offsets[1] - offsets[0] != array.count * np_dtype.itemsize:
        raise DataError(f"{name}: tensor {key!r}'s offsets do not span its {array.count} elements")
    return array


def _checked(name: str, dtype: np.dtype[Any], shape: tuple[int, ...], offset: int, end: int) -> Array:
    if not np.issubdtype(dtype, np.integer):
        raise DataError(f"{name}: a {dtype} array, not integers")
    if len(shape) != 1:
        raise DataError(f"{name}: an array of shape {shape}, not one-dimensional")
    count = int(shape[0])
    if offset + count * dtype.itemsize > end:
        raise DataError(f"{name}: {count} elements of {dtype} do not fit in the file")
    return Array(name=name, dtype=dtype, count=count, offset=offset)


def _mapped(path: Path, array: Array) -> np.ndarray[Any, Any]:
    if array.count == 0:
        return np.zeros(0, dtype=array.dtype)
    return np.memmap(path, dtype=array.dtype, mode="r", offset=array.offset, shape=(array.count,))


def describe(packed: Packed) -> str:
    """One line for a person: name, kind, size, tokens, vocabulary, sha256."""
    files = f" in {packed.files} files" if packed.kind == "tokens" else ""
    return (f"{packed.name} ({packed.kind}{files}, {packed.size:,} bytes, {packed.tokens:,} tokens, "
            f"vocabulary {packed.vocab}, sha256 {packed.sha256[:16]})")

