"""Average a numpy array over the processes of one job, from plain (synchronous) code.

``MeshNode`` runs the mesh node on a background thread; its calls block. numpy in gives
numpy out (a torch tensor gives a torch tensor). As in ``allreduce_asyncio.py``, the group
is the nodes tagged ``job=NAME``, so no other member of the mesh joins it.

Terminal 1: any member of the mesh as the seed, e.g. a node that starts a new mesh (it
writes the mesh secret to mesh-seed/mesh.key):

    python -m node --listen 127.0.0.1:7400 --data-dir mesh-seed

Terminals 2 and 3: one worker each, joining through the seed with the mesh's secret (on
other machines: copy mesh.key over first, and use the seed's address):

    python examples/allreduce_sync.py --join 127.0.0.1:7400 --mesh-key-file mesh-seed/mesh.key --data-dir worker-1 --value 1
    python examples/allreduce_sync.py --join 127.0.0.1:7400 --mesh-key-file mesh-seed/mesh.key --data-dir worker-2 --value 3

Both print ``averaged over 2 members of job=demo: [2. 2. 2. 2.]``. A worker left alone
(its peer died mid-round) raises ``TooFewContributors`` instead of returning its own array.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from node.config import NodeConfig, parse_address
from node.embedded import MeshNode


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


def main() -> None:
    args = parse_args()
    tag = f"job={args.job}"
    config = NodeConfig(listen=parse_address(args.listen), seeds=tuple(parse_address(s) for s in args.join),
                        data_dir=Path(args.data_dir), mesh_key_file=Path(args.mesh_key_file), tags=(tag,))
    array = np.full(4, args.value)
    with MeshNode(config) as mesh:
        group = mesh.wait_for_members(args.workers, tag=tag, timeout=60)  # this job's nodes, no one else
        out = mesh.all_reduce(array, group=group, codec="fp16+zstd", timeout=60)
        print(f"averaged over {len(out.contributors)} members of {tag}: {out.tensor}")


if __name__ == "__main__":
    main()
