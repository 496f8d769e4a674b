"""``python -m simulations.chaos_trainer_worker``: an honest member that averages on a clock.

The all-reduce load of ``python -m simulations chaos``. Each trainer runs a real ``Node``
tagged ``--tag`` (``chaos=train``), imports torch at start (off its loop, so a round's
first fp16 cast does not change its memory mid-run), waits for ``--group-size`` members
with the tag (the group: the trainers' ids, ascending) and then takes part in one round per
slot: slot ``s`` starts at ``--t0 + s * --period`` (unix time, the same for every trainer)
with key ``chaos:s`` and codec ``none``, ``fp16``, ``int8`` in turn, and a timeout of 80% of
the period. A trainer that wakes up late for a slot (it was frozen) skips it. Its input for
a slot is a function of (its node id, slot), so it checks the result against the exact mean
over the contributors the round reports, within the codec's error.

Every slot is one JSON line in ``--out``: ``slot``, ``codec``, ``ok``, ``error``,
``contributors``, ``rel_error``, ``correct``, ``seconds``; a skipped one has
``skipped: true``. Logs use the node's format (``node.cli``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from node.cli import setup_logging
from node.embedded import wait_for_members
from node.runtime import Node
from protocol.errors import StarmeshError
from protocol.tensor import fastcast
from simulations.worker_node import add_node_arguments, node_config

CODECS = ("none", "fp16", "int8")
#: Relative L2 error of a correct result, per codec (fp16: 2^-11 per value; int8 absmax
#: blocks of 512 on normal data: ~1%).
TOLERANCE = {"none": 1e-6, "fp16": 2e-3, "int8": 0.05}


def slot_input(node_id: bytes, slot: int, size: int) -> NDArray[np.float32]:
    """The tensor member ``node_id`` contributes to slot ``slot``."""
    seed = int.from_bytes(hashlib.blake2b(node_id + slot.to_bytes(8, "big"), digest_size=8).digest(), "big")
    out: NDArray[np.float32] = np.random.default_rng(seed).standard_normal(size, dtype=np.float32)
    return out


def rel_error(got: NDArray[np.float32], contributors: list[bytes], slot: int, size: int) -> float:
    exact = np.mean([slot_input(c, slot, size).astype(np.float64) for c in contributors], axis=0)
    return float(np.linalg.norm(got.astype(np.float64) - exact) / max(float(np.linalg.norm(exact)), 1e-300))


async def _slot(node: Node, group: list[bytes], slot: int, args: argparse.Namespace) -> dict[str, object]:
    codec = CODECS[slot % len(CODECS)]
    x = slot_input(node.node_id, slot, args.size)
    t0 = time.perf_counter()
    line: dict[str, object] = {"slot": slot, "codec": codec, "started": time.time()}
    try:
        res = await node.all_reduce(x, group=group, codec=codec, timeout=0.8 * args.period,
                                    key=f"chaos:{slot}")
    except (StarmeshError, TimeoutError) as exc:
        line.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
    else:
        contributors = list(res.contributors)
        err = await asyncio.get_running_loop().run_in_executor(
            None, rel_error, np.asarray(res.tensor, np.float32), contributors, slot, args.size)
        line.update(ok=True, error=None, contributors=len(contributors), rel_error=err,
                    correct=err <= TOLERANCE[codec])
    line["seconds"] = round(time.perf_counter() - t0, 4)
    return line


async def _main(args: argparse.Namespace) -> int:
    config = dataclasses.replace(node_config(args, seed=None), tags=(args.tag,))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, fastcast.preload_torch)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    out = Path(args.out)
    async with Node(config) as node:
        group = await wait_for_members(node, args.group_size, tag=args.tag, timeout=args.join_timeout)
        slot = max(0, int((time.time() - args.t0) // args.period) + 1)
        while not stop.is_set():
            start = args.t0 + slot * args.period
            wait = start - time.time()
            if wait < -args.period / 4:  # woke up late (frozen): skip what already began
                line: dict[str, object] = {"slot": slot, "codec": CODECS[slot % len(CODECS)], "skipped": True}
            else:
                try:
                    await asyncio.wait_for(stop.wait(), max(0.0, wait))
                    break
                except TimeoutError:
                    pass
                line = await _slot(node, group, slot, args)
            with open(out, "a") as f:
                f.write(json.dumps(line) + "\n")
            slot += 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.chaos_trainer_worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_node_arguments(parser)
    parser.add_argument("--tag", default="chaos=train")
    parser.add_argument("--group-size", type=int, required=True)
    parser.add_argument("--t0", type=float, required=True, help="unix time of slot 0")
    parser.add_argument("--period", type=float, default=3.0, help="seconds per slot")
    parser.add_argument("--size", type=int, default=1 << 16, help="elements averaged per round")
    parser.add_argument("--out", required=True, help="JSON-lines file, one line per slot")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
