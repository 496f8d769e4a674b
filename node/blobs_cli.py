"""``python -m node blob put | get | ls | pin | unpin | gc``: the node's blob cache.

``blob put PATH`` streams a file to the node (1 MiB pieces over a CLIENT link; no shared disk
assumed), which stores it verified and pinned and serves it to the mesh; it prints the blob id
(64 hex digits: the content id of ``node.bundles.manifest``). ``blob get ID --out PATH`` asks the
node for the blob: the node fetches it from whoever holds it (verified chunk by chunk) and
streams it back; a progress bar shows on a terminal; the file is written whole or not at all.
``blob put PATH --copies K`` also has the node keep K leased copies on other members
(``replicate``; renewed by the node until the blob is unpinned there) and waits, up to
``--copies-timeout``, until they are confirmed, printing their node ids. ``blob ls`` lists
what the node holds, ``pin``/``unpin`` keep a blob from eviction or release it (and its
copies elsewhere), ``gc`` drops what is unpinned. The requests are ``node.blob_client``'s. Each takes ``--connect``, ``--data-dir``,
``--mesh-key-file``, ``--timeout`` like ``status``. Exit codes: 0 ok, 1 failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.blob_client import REPLIES, AsyncBlobClient, BlobId, BlobRefused, ReplicationTimeout
from node.config import ClientConfig
from protocol.errors import ConfigError, StarmeshError

if TYPE_CHECKING:
    from node.client_link import ClientLink

ACTIONS = ("put", "get", "ls", "pin", "unpin", "gc")
__all__ = ["ACTIONS", "BlobRefused", "build_parser", "main", "parse_blob_id"]


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
    put.add_argument("--json", action="store_true", help='print {"id": ..., "size": ...} (and "copies": [...])')
    put.add_argument("--copies", type=int, default=0, metavar="K",
                     help="also keep K leased copies on other members (renewed by the node until unpin); "
                          "waits until they are confirmed and prints their node ids")
    put.add_argument("--copies-timeout", type=float, default=60.0, metavar="SECONDS",
                     help="how long to wait for the copies (default 60; exit 1 if fewer were confirmed)")
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
        return BlobId(text).raw
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


async def _session(client: ClientConfig, body: Callable[[AsyncBlobClient], Awaitable[int]]) -> int:
    from node.client_link import with_client
    from node.identity import load_mesh_key

    try:
        secret = load_mesh_key(client.mesh_key_path)
    except ConfigError as exc:
        raise ConfigError(f"{exc}\nblob needs the mesh key of the node it asks: pass --mesh-key-file PATH "
                          "or --data-dir DIR") from None

    async def run(link: ClientLink) -> int:
        return await body(AsyncBlobClient(link, timeout=client.timeout))

    return await with_client(client.connect, mesh_secret=secret, replies=REPLIES, timeout=client.timeout, body=run)


async def _put(blobs: AsyncBlobClient, args: argparse.Namespace) -> int:
    path: Path = args.path.expanduser()
    try:
        size = path.stat().st_size
        blob_id = await blobs.put(path, pin=not args.no_pin)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    holders: list[str] = []
    short = False
    if args.copies:
        try:
            holders = await blobs.replicate(blob_id, args.copies, timeout=args.copies_timeout)
        except ReplicationTimeout as exc:
            holders, short = exc.holders, True
    if args.json:
        out: dict[str, object] = {"id": str(blob_id), "size": size}
        if args.copies:
            out.update(copies=holders, wanted=args.copies)
        print(json.dumps(out))
    else:
        print(blob_id)
        if args.copies:
            print(f"copies: {len(holders)} of {args.copies} confirmed")
            for holder in holders:
                print(f"  {holder}")
    if short:
        print(f"error: only {len(holders)} of {args.copies} copies confirmed within {args.copies_timeout}s; "
              "the node keeps trying", file=sys.stderr)
        return 1
    return 0


async def _get(blobs: AsyncBlobClient, args: argparse.Namespace) -> int:
    blob_id = parse_blob_id(args.blob_id)
    out: Path = args.out.expanduser()
    with _Bar(enabled=not args.no_progress) as bar:
        await blobs.get(blob_id, out, on_progress=bar.update)
    print(f"wrote {out.stat().st_size} bytes to {out}", file=sys.stderr)
    return 0


async def _ls(blobs: AsyncBlobClient, args: argparse.Namespace) -> int:
    entries: list[dict[str, Any]] = [{"id": str(b.id), "size": b.size, "pinned": b.pinned, "held": b.held, "last_used": b.last_used}
               for b in await blobs.ls()]
    if args.json:
        print(json.dumps(entries))
        return 0
    for e in entries:
        when = datetime.datetime.fromtimestamp(e["last_used"]).strftime("%Y-%m-%d %H:%M:%S") if e["last_used"] else "-"
        kept = "pinned" if e["pinned"] else "leased" if e["held"] else ""
        print(f"{e['id']}  {e['size']:>12}  {kept:6}  {when}")
    return 0


async def _pin(blobs: AsyncBlobClient, args: argparse.Namespace) -> int:
    blob_id = parse_blob_id(args.blob_id)
    await (blobs.pin(blob_id) if args.action == "pin" else blobs.unpin(blob_id))
    print(f"{args.action}ned {args.blob_id}", file=sys.stderr)
    return 0


async def _gc(blobs: AsyncBlobClient, args: argparse.Namespace) -> int:
    print(f"freed {await blobs.gc()} bytes")
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

    if args.action == "put" and not 0 <= args.copies <= 16:
        raise ConfigError(f"--copies {args.copies}: expected 0..16")

    async def body(blobs: AsyncBlobClient) -> int:
        return await action(blobs, args)

    try:
        return asyncio.run(_session(client, body))
    except ConfigError:
        raise
    except (StarmeshError, OSError) as exc:
        print(f"error: blob {args.action} via {client.connect}: {exc}", file=sys.stderr)
        return 1
