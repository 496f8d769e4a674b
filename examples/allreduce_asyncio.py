"""Average a tensor over the processes of one job, from asyncio (``node.runtime.Node``).

Every process of the job runs a mesh node tagged ``job=NAME`` and averages with exactly the
nodes carrying that tag: the other members of the mesh (daemons, other jobs) stay out.

Terminal 1: any member of the mesh as the seed, e.g. a node that starts a new mesh (it
writes the mesh secret to mesh-seed/mesh.key):

    python -m node --listen 127.0.0.1:7400 --data-dir mesh-seed

Terminals 2 and 3: one worker each, joining through the seed with the mesh's secret (on
other machines: copy mesh.key over first, and use the seed's address):

    python examples/allreduce_asyncio.py --join 127.0.0.1:7400 --mesh-key-file mesh-seed/mesh.key --data-dir worker-1 --value 1
    python examples/allreduce_asyncio.py --join 127.0.0.1:7400 --mesh-key-file mesh-seed/mesh.key --data-dir worker-2 --value 3

Both print ``averaged over 2 members of job=demo: [2. 2. 2. 2.]``; the seed is not in the
average. Each worker needs its own ``--data-dir`` (its identity). Run it with the Python of
the environment Starmesh is installed in (``.venv/bin/python``, or activate the venv).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import numpy as np

from node.config import NodeConfig, parse_address
from node.embedded import wait_for_members
from node.runtime import Node


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--join", action="append", default=[], metavar="HOST:PORT", help="a member to join through")
    p.add_argument("--mesh-key-file", required=True, help="the mesh's secret (a copy of the seed's mesh.key)")
    p.add_argument("--data-dir", required=True, help="this process's identity and state (one per process)")
    p.add_argument("--listen", default="0.0.0.0:0", help="HOST:PORT for peers (port 0: any free port)")
    p.add_argument("--job", default="demo", help="the job's name: the processes with one name form the group")
    p.add_argument("--workers", type=int, default=2, help="processes in the job (the group's size)")
    p.add_argument("--value", type=float, default=1.0, help="what this process contributes")
    return p.parse_args()


async def main() -> None:
    args = parse_args()
    tag = f"job={args.job}"
    config = NodeConfig(listen=parse_address(args.listen), seeds=tuple(parse_address(s) for s in args.join),
                        data_dir=Path(args.data_dir), mesh_key_file=Path(args.mesh_key_file), tags=(tag,))
    grad = np.full(4, args.value, dtype=np.float32)
    async with Node(config) as node:
        group = await wait_for_members(node, args.workers, tag=tag, timeout=60)  # this job's nodes, no one else
        out = await node.all_reduce(grad, group=group, codec="int8+zstd", timeout=60)
        print(f"averaged over {len(out.contributors)} members of {tag}: {out.tensor}")  # out.dropped: who was left out, why


if __name__ == "__main__":
    asyncio.run(main())
