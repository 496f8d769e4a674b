"""``python -m simulations.blob_liar_worker``: a member that serves corrupted blob chunks.

The liar of ``bench blobs``: a real ``Node`` with the mesh key (a member like any other: it
answers probes, takes ``blob put`` from a client, records itself as a holder in the provider
directory and answers ``BLOB_WANT`` with the true manifest), except that every chunk it
serves (``--fraction`` of them, drawn with ``--seed``) has one byte flipped before it goes out,
as a faulty disk or a malicious peer would send it. Its chunks still say ``OK``; only the
digest check of the fetcher can tell. Each corrupted chunk is counted in ``--acts`` (a JSON
file ``{"corrupted": n, "served": m}``, replaced after every chunk). SIGTERM leaves the mesh.

The node's code is untouched: the store object of this one process is wrapped here.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import threading
from pathlib import Path

from node.runtime import Node
from simulations.worker_node import add_node_arguments, node_config, setup_logging, write_json


class Liar:
    """Wraps ``BlobStore.read_chunk`` of one node so that what it serves is corrupted."""

    def __init__(self, node: Node, *, fraction: float, rng: random.Random, acts: Path) -> None:
        self._read = node.blobs.store.read_chunk
        self._fraction = fraction
        self._rng = rng
        self._acts = acts
        self._lock = threading.Lock()  # read_chunk runs on the node's io threads
        self.served = 0
        self.corrupted = 0
        node.blobs.store.read_chunk = self.read_chunk  # type: ignore[method-assign]
        write_json(acts, {"corrupted": 0, "served": 0})

    def read_chunk(self, blob_id: bytes, index: int) -> bytes | None:
        data = self._read(blob_id, index)
        if data is None or not data:
            return data
        with self._lock:
            self.served += 1
            lie = self._rng.random() < self._fraction
            position = self._rng.randrange(len(data))
            if lie:
                self.corrupted += 1
            write_json(self._acts, {"corrupted": self.corrupted, "served": self.served})
        if not lie:
            return data
        flipped = bytearray(data)
        flipped[position] ^= 0xFF
        return bytes(flipped)


async def _main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Node(node_config(args, seed=args.seed)) as node:
        Liar(node, fraction=args.fraction, rng=random.Random(f"liar:{args.seed}"), acts=Path(args.acts))
        await stop.wait()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.blob_liar_worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_node_arguments(parser)
    parser.add_argument("--acts", required=True, help="JSON file: chunks served and corrupted so far")
    parser.add_argument("--fraction", type=float, default=1.0, help="share of served chunks corrupted")
    parser.add_argument("--seed", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
