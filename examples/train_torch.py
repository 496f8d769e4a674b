"""Data-parallel training with torch over the mesh: one process per worker, gradients averaged.

Every worker builds the same model (same seed), trains on its own shard of the data
(``--rank``) and averages the gradients over the job's workers after each backward pass
(``MeshGradientAverager``), so all of them take the same steps and end with the same
parameters. The group is the nodes tagged ``job=NAME``: no other member of the mesh joins it.

Several trainers on one host share its cores: cap each one's threads (``--threads``) or
they oversubscribe them. That is three settings: ``OMP_NUM_THREADS`` (read when torch is
imported, so set it first), ``torch.set_num_threads`` (torch's intra-op pool) and the node's
codec threads (``ExecutorConfig(codec_threads=...)``, ``--codec-threads`` on ``python -m node``).

Terminal 1: any member of the mesh as the seed, e.g. a node that starts a new mesh (it
writes the mesh secret to mesh-seed/mesh.key):

    python -m node --listen 127.0.0.1:7400 --data-dir mesh-seed

Terminals 2 and 3: one worker each (on other machines: copy mesh.key over first, and use
the seed's address):

    python examples/train_torch.py --join 127.0.0.1:7400 --mesh-key-file mesh-seed/mesh.key --data-dir worker-1 --rank 0 --threads 1
    python examples/train_torch.py --join 127.0.0.1:7400 --mesh-key-file mesh-seed/mesh.key --data-dir worker-2 --rank 1 --threads 1

Both print the final loss of their shard and the same parameter digest. Needs torch
(``pip install torch``; ``scripts/setup.sh`` installs the CPU build).
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

from node.config import ExecutorConfig, NodeConfig, parse_address
from node.embedded import MeshNode
from node.torch_hooks import MeshGradientAverager


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--join", action="append", default=[], metavar="HOST:PORT", help="a member to join through")
    p.add_argument("--mesh-key-file", required=True, help="the mesh's secret (a copy of the seed's mesh.key)")
    p.add_argument("--data-dir", required=True, help="this process's identity and state (one per process)")
    p.add_argument("--listen", default="0.0.0.0:0", help="HOST:PORT for peers (port 0: any free port)")
    p.add_argument("--job", default="train", help="the job's name: the processes with one name form the group")
    p.add_argument("--workers", type=int, default=2, help="processes in the job (the group's size)")
    p.add_argument("--rank", type=int, required=True, help="this worker's shard of the data (0, 1, ...)")
    p.add_argument("--steps", type=int, default=20, help="training steps")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch and for the node's codecs")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # before torch is imported
    import torch

    torch.set_num_threads(args.threads)
    tag = f"job={args.job}"
    config = NodeConfig(listen=parse_address(args.listen), seeds=tuple(parse_address(s) for s in args.join),
                        data_dir=Path(args.data_dir), mesh_key_file=Path(args.mesh_key_file), tags=(tag,),
                        executors=ExecutorConfig(codec_threads=args.threads))
    torch.manual_seed(0)  # every worker starts from the same model
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    shard = torch.Generator().manual_seed(1 + args.rank)  # ...and trains on its own data
    x = torch.randn(256, 8, generator=shard)
    y = x @ torch.arange(1.0, 9.0).unsqueeze(1) + 0.01 * torch.randn(256, 1, generator=shard)

    with MeshNode(config) as mesh:
        group = mesh.wait_for_members(args.workers, tag=tag, timeout=60)  # this job's nodes, no one else
        averager = MeshGradientAverager(model.parameters(), mesh, group=group, codec="fp16", timeout=60)
        for _ in range(args.steps):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            averager.step()  # the gradients, averaged over the job (TooFewContributors if left alone)
            optimizer.step()
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
    print(f"rank {args.rank}: loss {loss.item():.4f} after {args.steps} steps, parameters {digest.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
