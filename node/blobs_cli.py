"""``python -m node blob put | get | ls | pin | unpin | gc``: the node's blob cache.

``blob put PATH`` streams a file to the node (1 MiB pieces over a CLIENT link; no shared disk
assumed), which stores it verified and pinned and serves it to the mesh; it prints the blob id
(64 hex digits: the content id of ``node.bundles.manifest``). ``blob get ID --out PATH`` asks the
node for the blob: the node fetches it from whoever holds it (verified chunk by chunk) and
streams it back; a progress bar shows on a terminal; the file is written whole or not at all.
``blob ls`` lists what the node holds, ``pin``/``unpin`` keep a blob from eviction or release
it, ``gc`` drops what is unpinned. Each takes ``--connect``, ``--data-dir``,
``--mesh-key-file``, ``--timeout`` like ``status``. Exit codes: 0 ok, 1 failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from node.config import ClientConfig
from protocol.errors import ConfigError, StarmeshError, TransportError

ACTIONS = ("put", "get", "ls", "pin", "unpin", "gc")
PIECE_BYTES = 1024 * 1024
_REPLIES = ("BLOB_REPLY", "BLOB_DATA", "BLOB_LIST_REPLY")


class BlobRefused(StarmeshError):
    """The node answered a blob request with an error code."""


def build_parser() -> argparse.ArgumentParser:
    from node.cli import ClientOptions

    common = argparse.ArgumentParser(add_help=False)  # the client flags go before or after ACTION
    ClientOptions("blob", default=ClientConfig(timeout=30.0)).add_to(common)
    p = argparse.ArgumentParser(prog="python -m node blob", description="The node's blob cache.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, parents=[common])

    put = action("put", "store a file on the node (pinned) and print its blob id")
    put.add_argument("path", metavar="PATH", type=Path)
    put.add_argument("--no-pin", action="store_true", help="let the cache evict it when it needs room")
    put.add_argument("--json", action="store_true", help='print {"id": ..., "size": ...}')
    get = action("get", "fetch a blob from whoever holds it, verify it, write it")
    get.add_argument("blob_id", metavar="ID")
    get.add_argument("--out", metavar="PATH", type=Path, required=True)
    get.add_argument("--no-progress", action="store_true")
    ls = action("ls", "what this node holds: id, size, pinned, last used")
    ls.add_argument("--json", action="store_true")
    for name, what in (("pin", "keep ID on this node (fetched first if needed)"), ("unpin", "let the cache evict ID")):
        one = action(name, what)
        one.add_argument("blob_id", metavar="ID")
    action("gc", "drop every unpinned blob now")
    return p


def parse_blob_id(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{text!r} is not a blob id (64 hex digits, as blob put prints)")
    return raw


async def _session(client: ClientConfig, body: Any) -> int:
    from node.client_link import ClientLink
    from node.identity import load_mesh_key
    from protocol.tags import MsgType

    try:
        secret = load_mesh_key(client.mesh_key_path)
    except ConfigError as exc:
        raise ConfigError(f"{exc}\nblob needs the mesh key of the node it asks: pass --mesh-key-file PATH "
                          "or --data-dir DIR") from None
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    link = await ClientLink.connect(client.connect, mesh_secret=secret, spawn=spawn,
                                    replies=[MsgType[name] for name in _REPLIES], timeout=client.timeout)
    try:
        result: int = await body(link)
        return result
    finally:
        link.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _check(reply: Any) -> Any:
    from protocol.messages.blobs import BlobErrorCode, BlobReply

    if isinstance(reply, BlobReply) and reply.code is not BlobErrorCode.OK:
        raise BlobRefused(f"{reply.code.name}: {reply.message}")
    return reply


async def _put(link: Any, args: argparse.Namespace, timeout: float) -> int:
    from protocol.messages.blobs import BlobPut, BlobReply

    path: Path = args.path.expanduser()
    try:
        f = open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    upload = int.from_bytes(os.urandom(8), "big")
    offset = 0
    with f:
        piece = f.read(PIECE_BYTES)
        while True:
            following = f.read(PIECE_BYTES) if piece else b""
            last = not following
            message = BlobPut(req=0, upload=upload, offset=offset, last=last, pin=not args.no_pin, data=piece)
            reply = _check(await link.request(lambda req, m=message: _with_req(m, req), timeout=timeout))
            offset += len(piece)
            if last:
                break
            piece = following
    if not isinstance(reply, BlobReply) or reply.blob_id is None:
        raise TransportError("the node did not say the blob's id")
    if args.json:
        print(json.dumps({"id": reply.blob_id.hex(), "size": offset}))
    else:
        print(reply.blob_id.hex())
    return 0


def _with_req(message: Any, req: int) -> Any:
    import dataclasses

    return dataclasses.replace(message, req=req)


async def _get(link: Any, args: argparse.Namespace, timeout: float) -> int:
    from protocol.messages.blobs import BlobData, BlobGet

    blob_id = parse_blob_id(args.blob_id)
    out: Path = args.out.expanduser()
    tmp = out.with_name(f".{out.name}.part-{os.getpid()}")
    bar = _Bar(enabled=not args.no_progress)
    offset = 0
    try:
        with open(tmp, "wb") as f, bar:
            while True:
                request = BlobGet(req=0, blob_id=blob_id, offset=offset, wait_s=min(10.0, timeout / 2))
                reply = _check(await link.request(lambda req, m=request: _with_req(m, req), timeout=timeout))
                if not isinstance(reply, BlobData):
                    raise TransportError(f"unexpected reply {type(reply).__name__}")
                if not reply.ready:
                    bar.update(reply.held, reply.size, "fetching")
                    continue
                f.write(reply.data)
                offset += len(reply.data)
                bar.update(offset, reply.size, "receiving")
                if offset >= reply.size or not reply.data:
                    break
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    print(f"wrote {offset} bytes to {out}", file=sys.stderr)
    return 0


async def _ls(link: Any, args: argparse.Namespace, timeout: float) -> int:
    from protocol.messages.blobs import BlobList, BlobListReply

    entries: list[dict[str, Any]] = []
    after: bytes | None = None
    while True:
        request = BlobList(req=0, after=after)
        reply = _check(await link.request(lambda req, m=request: _with_req(m, req), timeout=timeout))
        assert isinstance(reply, BlobListReply)
        entries.extend({"id": b.blob_id.hex(), "size": b.size, "pinned": b.pinned, "last_used": b.last_used}
                       for b in reply.blobs)
        if reply.next_after is None:
            break
        after = reply.next_after
    if args.json:
        print(json.dumps(entries))
        return 0
    for e in entries:
        when = datetime.datetime.fromtimestamp(e["last_used"]).strftime("%Y-%m-%d %H:%M:%S") if e["last_used"] else "-"
        print(f"{e['id']}  {e['size']:>12}  {'pinned' if e['pinned'] else '      '}  {when}")
    return 0


async def _pin(link: Any, args: argparse.Namespace, timeout: float) -> int:
    from protocol.messages.blobs import BlobPin

    request = BlobPin(req=0, blob_id=parse_blob_id(args.blob_id), pin=args.action == "pin")
    _check(await link.request(lambda req, m=request: _with_req(m, req), timeout=timeout))
    print(f"{args.action}ned {args.blob_id}", file=sys.stderr)
    return 0


async def _gc(link: Any, args: argparse.Namespace, timeout: float) -> int:
    from protocol.messages.blobs import BlobGc, BlobReply

    reply = _check(await link.request(lambda req: BlobGc(req=req), timeout=timeout))
    assert isinstance(reply, BlobReply)
    print(f"freed {reply.freed} bytes")
    return 0


class _Bar:
    """Bytes held/received of the blob, on stderr while it is a terminal."""

    def __init__(self, *, enabled: bool) -> None:
        self._enabled = enabled and sys.stderr.isatty()
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> _Bar:
        if self._enabled:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn())
            self._bar.start()
            self._task = self._bar.add_task("blob", total=None)
        return self

    def update(self, done: int, total: int, what: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total or None, description=what)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def main(argv: Sequence[str]) -> int:
    """``python -m node blob ...``; the exit code."""
    from node.cli import ClientOptions, parse_args

    args = parse_args(build_parser(), argv)
    client = ClientOptions("blob", default=ClientConfig(timeout=30.0)).resolve(args)
    action = {"put": _put, "get": _get, "ls": _ls, "pin": _pin, "unpin": _pin, "gc": _gc}[args.action]

    async def body(link: Any) -> int:
        return await action(link, args, client.timeout)

    try:
        return asyncio.run(_session(client, body))
    except ConfigError:
        raise
    except (StarmeshError, OSError) as exc:
        print(f"error: blob {args.action} via {client.connect}: {exc}", file=sys.stderr)
        return 1
