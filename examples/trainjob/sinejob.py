"""A training job of your own, as a bundle: a small MLP learns y = sin(3x) + noise.

Train it on a mesh (every node runs it in its training process; the bundle travels with the job):

    python -m node train --bundle examples/trainjob --job sinejob:make_job --steps 200 --workers 2 \
        --job-arg hidden=64 --mode sync --out sine-out

or on a throwaway local mesh of 2 nodes: add ``--local 2``. ``make_job`` gets the ``--job-arg``
options as strings, plus ``seed``; it must build the same model on every worker (seeded init).
``batch(shard, position)`` reads the ``position``-th batch of virtual shard ``shard``: the
job's coordinator assigns shards to workers and checkpoints every shard's position, so no batch
is skipped or read twice within an epoch, whoever comes and goes.
"""

from __future__ import annotations

import torch
from torch import nn

from node.training.runner.job import Job

EXAMPLES = 8192  # the training set: (x, y) pairs, fixed by the seed
BATCH = 32
SHARDS = 64  # the default of --shards


def make_job(options: dict[str, str]) -> Job:
    seed = int(options.get("seed", "0"))
    hidden = int(options.get("hidden", "64"))
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(EXAMPLES, 1, generator=g) * 4 - 2
    y = torch.sin(3 * x) + 0.05 * torch.randn(EXAMPLES, 1, generator=g)
    val_x = torch.linspace(-2, 2, 256).unsqueeze(1)
    val_y = torch.sin(3 * val_x)
    torch.manual_seed(seed)  # the same initial parameters on every worker
    model = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                          nn.Linear(hidden, 1))
    per_shard = EXAMPLES // SHARDS

    def batch(shard: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, step = divmod(position * BATCH, per_shard)
        order = torch.randperm(per_shard, generator=torch.Generator().manual_seed(seed + 7919 * epoch + shard))
        rows = shard * per_shard + order[step:step + BATCH]
        return x[rows], y[rows]

    def loss(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.mse_loss(model(b[0]), b[1])

    def evaluate(model: nn.Module) -> float:
        return float(nn.functional.mse_loss(model(val_x), val_y))

    return Job(model=model, batch=batch, loss=loss, evaluate=evaluate, shards=SHARDS,
               optimizer=lambda params: torch.optim.Adam(params, lr=3e-3), tokens_per_batch=BATCH,
               config={"hidden": hidden, "examples": EXAMPLES})
