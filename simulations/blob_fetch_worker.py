"""``python -m simulations.blob_fetch_worker``: one node's client in ``bench blobs``.

It runs next to its node (inside the node's network namespace on shaped links, where the
harness cannot reach the node) and talks to it over CLIENT links only, as ``python -m node
blob get`` and ``status`` do. The harness and it meet through files in ``--run-dir``:

1. it dials its node, reads its status (the ``blob_*`` metrics: ``before``) and writes
   ``NAME.ready``;
2. once ``go`` exists it asks the node for the blob (``--blob-id``; without one it only
   watches): ``BLOB_GET`` with a short ``wait_s``, so every unready answer tells how much
   the node holds, which it writes to ``NAME.progress`` (``{"held": bytes, "size": bytes}``);
   the first ready answer is the moment the node holds the whole blob, verified; it writes
   ``NAME.fetched`` (``{"t_ready": unix time}``);
3. once ``verify`` exists it reads the whole blob back from the node, piece by piece, and
   checks its SHA-256 against ``--sha256`` (after every fetch of a run is done, so reading
   back never competes with a fetch still running);
4. it reads the status again (``after``) and writes ``NAME.json``: times, bytes, digest,
   ``verified``, ``before``/``after`` metrics, or ``error``; exit 0, or 1 on an error.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from node.client_link import ClientLink
from node.config import parse_address
from node.identity import load_mesh_key
from node.status import StatusClient, reply_to_json
from protocol.errors import StarmeshError
from protocol.messages.blobs import BlobData, BlobGet, BlobReply
from protocol.tags import MsgType
from simulations.worker_node import write_json

WAIT_S = 0.25
"""``wait_s`` of each ``BLOB_GET`` while the node fetches: how often progress is written."""
POLL_S = 0.005


class FetchFailed(Exception):
    """The node answered the get with an error, or the blob read back is wrong."""


async def _wait_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path.name} did not appear within {timeout}s")
        await asyncio.sleep(POLL_S)


def blob_metrics(reply: Any) -> dict[str, float]:
    """The ``blob_*`` metrics (and the loop lag) of one status answer."""
    metrics: dict[str, float] = reply_to_json(reply)["metrics"]
    return {k: v for k, v in metrics.items() if k.startswith("blob_") or k.startswith("loop_lag_max")}


async def _get(link: ClientLink, blob_id: bytes, offset: int, timeout: float) -> BlobData:
    request = BlobGet(req=0, blob_id=blob_id, offset=offset, wait_s=WAIT_S)
    reply = await link.request(lambda req: dataclasses.replace(request, req=req), timeout=timeout)
    if isinstance(reply, BlobReply):
        raise FetchFailed(f"the node refused the get: {reply.code.name}: {reply.message}")
    if not isinstance(reply, BlobData):
        raise FetchFailed(f"unexpected reply {type(reply).__name__}")
    return reply


async def fetch(link: ClientLink, blob_id: bytes, run_dir: Path, name: str, timeout: float) -> BlobData:
    """Ask until the node holds the blob; the first ready answer (its first piece)."""
    deadline = time.monotonic() + timeout
    while True:
        reply = await _get(link, blob_id, 0, 30.0)
        if reply.ready:
            return reply
        write_json(run_dir / f"{name}.progress", {"held": reply.held, "size": reply.size})
        if time.monotonic() > deadline:
            raise TimeoutError(f"the blob was not fetched within {timeout}s ({reply.held} of {reply.size} bytes)")


async def read_back(link: ClientLink, blob_id: bytes, first: BlobData) -> tuple[int, str]:
    """Bytes and SHA-256 of the whole blob as the node serves it."""
    digest = hashlib.sha256(first.data)
    offset = len(first.data)
    while offset < first.size:
        piece = await _get(link, blob_id, offset, 30.0)
        if not piece.ready or not piece.data:
            raise FetchFailed(f"the node stopped serving the blob at {offset} of {first.size} bytes")
        digest.update(piece.data)
        offset += len(piece.data)
    return offset, digest.hexdigest()


async def _main(args: argparse.Namespace) -> int:
    run_dir, name = Path(args.run_dir), args.name
    result: dict[str, Any] = {"name": name, "fetch": bool(args.blob_id)}
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    secret = load_mesh_key(Path(args.mesh_key_file))
    address = parse_address(args.connect)
    links: list[ClientLink | StatusClient] = []

    async def blob_link() -> ClientLink:
        link = await ClientLink.connect(address, mesh_secret=secret, spawn=spawn,
                                        replies=[MsgType.BLOB_REPLY, MsgType.BLOB_DATA], timeout=10.0)
        links.append(link)
        return link

    async def metrics() -> dict[str, float]:
        status = await StatusClient.connect(address, mesh_secret=secret, spawn=spawn, timeout=10.0)
        links.append(status)
        try:
            return blob_metrics(await status.request(timeout=10.0))
        finally:
            status.close()

    # Every link is dialed when it is needed: a node closes a CLIENT link idle for 10 s.
    try:
        result["before"] = await metrics()
        (run_dir / f"{name}.ready").touch()
        await _wait_file(run_dir / "go", args.timeout)
        result["t_start"] = time.time()
        if args.blob_id:
            blob_id = bytes.fromhex(args.blob_id)
            first = await fetch(await blob_link(), blob_id, run_dir, name, args.timeout)
            result["t_ready"] = time.time()
            write_json(run_dir / f"{name}.fetched", {"t_ready": result["t_ready"]})
            await _wait_file(run_dir / "verify", args.timeout)
            size, sha = await read_back(await blob_link(), blob_id, first)
            result.update(bytes=size, sha256=sha, verified=sha == args.sha256)
        else:
            await _wait_file(run_dir / "verify", args.timeout)
        result["after"] = await metrics()
    except (StarmeshError, OSError, TimeoutError, FetchFailed) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for client in links:
            client.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    write_json(run_dir / f"{name}.json", result)
    return 1 if "error" in result or result.get("verified") is False else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.blob_fetch_worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connect", required=True, help="HOST:PORT of the node")
    parser.add_argument("--mesh-key-file", required=True)
    parser.add_argument("--run-dir", required=True, help="where the harness and this process meet")
    parser.add_argument("--name", required=True, help="file name stem of this process's files")
    parser.add_argument("--blob-id", default="", help="the blob to fetch (hex); none: only read the status")
    parser.add_argument("--sha256", default="", help="the SHA-256 (hex) the blob must have")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each step")
    return parser


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_main(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
