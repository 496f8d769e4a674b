"""One data-parallel training process of ``python -m simulations train``.

``python -m simulations.train_worker ...`` embeds a real Starmesh node (``MeshNode``), joins
the mesh, waits until it sees ``--nodes`` live members, then trains the shared model
(``build_model``) on its shard of the synthetic dataset (``make_dataset``): per step, a
forward/backward pass on its shard's minibatch (``shard_batches``), the gradients averaged
over the mesh with ``MeshGradientAverager``, an SGD step. Every worker starts from the same
weights (``--seed``) and applies the same averaged gradient, so all stay identical.

It appends one JSON line per step to ``progress.jsonl`` (step, loss, bytes sent, seconds)
for the parent to show, and writes ``results.json`` at the end: final training loss and
held-out accuracy, the SHA-256 of its parameters (to check the workers agree bit for bit)
and the bytes it sent. The dataset, model and batch order are also used by the parent for
its single-process reference, so both see exactly the same examples.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from simulations.worker_node import add_node_arguments, node_config, setup_logging, write_json

#: Synthetic task: CLASSES Gaussian clusters in FEATURES dimensions (overlapping: not trivial).
FEATURES = 16
CLASSES = 6
HIDDEN = 64
TRAIN_EXAMPLES = 6144
TEST_EXAMPLES = 2048
CLUSTER_SPREAD = 1.1
NOISE = 1.0
LEARNING_RATE = 0.05
MOMENTUM = 0.9


@dataclass(frozen=True)
class Dataset:
    """Training and held-out examples (float32 features, int64 labels)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def make_dataset(seed: int) -> Dataset:
    """Points drawn around CLASSES random centres; the same ``seed`` gives the same data."""
    rng = np.random.default_rng([seed, 0xDA7A])
    centres = rng.normal(0.0, CLUSTER_SPREAD, (CLASSES, FEATURES))
    mix = rng.normal(0.0, 1.0, (FEATURES, FEATURES)) / np.sqrt(FEATURES)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = rng.integers(0, CLASSES, n)
        points = centres[labels] + rng.normal(0.0, NOISE, (n, FEATURES))
        points = np.tanh(points @ mix) * 2.0  # a non-linear warp so a linear model is not enough
        return torch.from_numpy(points.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))

    x_train, y_train = draw(TRAIN_EXAMPLES)
    x_test, y_test = draw(TEST_EXAMPLES)
    return Dataset(x_train, y_train, x_test, y_test)


def build_model(seed: int) -> torch.nn.Module:
    """The 2-layer MLP classifier, initialised from ``seed`` (identical in every process)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(),
                               torch.nn.Linear(HIDDEN, CLASSES))


def build_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)


def shard_batches(seed: int, rank: int, nodes: int, batch: int) -> Iterator[NDArray[np.int64]]:
    """Training-set indices of rank ``rank``'s minibatches, forever: its shard (every
    ``nodes``-th example) in a fresh seeded order each epoch."""
    shard = np.arange(rank, TRAIN_EXAMPLES, nodes, dtype=np.int64)
    rng = np.random.default_rng([seed, rank, 0xBA7C])
    while True:
        order = rng.permutation(shard)
        for start in range(0, len(order) - batch + 1, batch):
            yield order[start:start + batch]


def warm_up(data: Dataset) -> None:
    """One throwaway step on a throwaway model: torch's one-time set-up (about a second on a
    small CPU) is then not counted in the first training step."""
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(),
                                torch.nn.Linear(HIDDEN, CLASSES))
    optimizer = build_optimizer(model)
    torch.nn.functional.cross_entropy(model(data.x_train[:8]), data.y_train[:8]).backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    evaluate(model, data)


def evaluate(model: torch.nn.Module, data: Dataset) -> tuple[float, float]:
    """(mean loss on the whole training set, accuracy on the held-out set)."""
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(data.x_train), data.y_train).item()
        accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    return float(loss), float(accuracy)


def params_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor of the state dict (names and raw bytes), in order."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- worker


def _sent_bytes(mesh: Any) -> int:
    async def read() -> int:
        return sum(mesh.node.traffic.sent.values())

    return mesh.submit(read()).result()  # type: ignore[no-any-return]


def _train(args: argparse.Namespace, mesh: Any, group: list[bytes], progress: Any) -> dict[str, Any]:
    from node.torch_hooks import MeshGradientAverager

    data = make_dataset(args.seed)
    warm_up(data)
    model = build_model(args.seed)
    optimizer = build_optimizer(model)
    # one round before the clock starts: opens the BULK links between every pair
    alone = 1 if args.nodes == 1 else None  # a one-node run trains alone on purpose
    mesh.all_reduce(torch.zeros(64), group=group, codec=args.codec, timeout=args.timeout, key="warmup",
                    min_contributors=alone)
    averager = MeshGradientAverager(model.parameters(), mesh, group=group, codec=args.codec,
                                    timeout=args.timeout, min_contributors=alone)
    batches = shard_batches(args.seed, args.rank, args.nodes, args.batch)
    sent0, t0, partial = _sent_bytes(mesh), time.perf_counter(), 0
    dropped: collections.Counter[str] = collections.Counter()
    for step in range(args.steps):
        idx = torch.from_numpy(next(batches))
        optimizer.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()  # type: ignore[no-untyped-call]
        outcome = averager.step()
        partial += len(outcome.contributors) < len(group)
        dropped.update(reason.name for reason in outcome.dropped.values())
        optimizer.step()
        progress.write(json.dumps({"step": step + 1, "loss": loss.item(),
                                   "sent_bytes": _sent_bytes(mesh) - sent0,
                                   "seconds": time.perf_counter() - t0}) + "\n")
        progress.flush()
    final_loss, accuracy = evaluate(model, data)
    return {"final_loss": final_loss, "accuracy": accuracy, "params_sha256": params_digest(model),
            "sent_bytes": _sent_bytes(mesh) - sent0, "seconds": time.perf_counter() - t0,
            "partial_rounds": partial, "dropped": dict(dropped), "parameters": averager.numel}


def _worker(args: argparse.Namespace) -> int:
    from node.embedded import MeshNode

    setup_logging(args)
    torch.set_num_threads(1)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = node_config(args, seed=args.rank)
    result: dict[str, Any] = {"rank": args.rank, "pid": os.getpid(), "error": None}
    with MeshNode(config) as mesh, open(out_dir / "progress.jsonl", "w") as progress:
        result["node_id"] = mesh.node_id.hex()
        group = mesh.wait_for_members(args.nodes, timeout=args.join_timeout)
        try:
            result.update(_train(args, mesh, group, progress))
        except Exception as exc:  # recorded for the parent, which reports it
            result["error"] = f"{type(exc).__name__}: {exc}"
            write_json(out_dir / "results.json", result)
            raise
        write_json(out_dir / "results.json", result)
        time.sleep(args.linger)  # let the last round's FINISH reach everyone before leaving
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.train_worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, required=True, help="this worker's shard")
    parser.add_argument("--nodes", type=int, required=True, help="workers in the mesh (the group)")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True, help="examples per worker per step")
    parser.add_argument("--codec", default="int8+zstd")
    parser.add_argument("--seed", type=int, default=0, help="data, batch order and initial weights")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per gradient all-reduce")
    parser.add_argument("--out-dir", required=True)
    add_node_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks for stacks on a hang
    return _worker(args)


if __name__ == "__main__":
    sys.exit(main())
