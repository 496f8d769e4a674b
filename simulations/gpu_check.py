"""``python -m simulations.gpu_check``: what a GPU machine gives a training job (issue 13).

A device check, run once on a machine with GPUs (and runnable, CPU parts only, anywhere):

1. **environment**: torch and CUDA versions, GPU count and names, NCCL, usable CPUs;
2. **throughput**: tokens/s of the built-in char GPT (``node.training.runner.charlm``,
   nanoGPT's baby GPT: 4 layers, 4 heads, 128-dim, context 64) doing forward, backward and
   an AdamW step on random tokens: on the CPU at the baby GPT's batch (12), and on CUDA at
   that batch, at ``--big-batch`` and at ``--big-batch`` under bf16 autocast;
3. **hierarchical**: the local group of ``node.training.runner.local_group`` around a fake
   mesh exchange: NCCL with one rank per GPU when there are 2 or more, else gloo with 2 CPU
   ranks. Per rank: an exactness check (each rank's known vector; every rank must end with
   the mean plus the fake exchange's +1, error 0), the local all-reduce bandwidth of a
   ``--reduce-mib`` buffer, and ``--steps`` training steps of the char GPT (split into
   compute time and reduce time, the latter including the wait for the slowest rank;
   aggregate tokens/s) ending with the ranks' largest parameter
   difference (must be 0) and the exchange's call count on rank 0 (one per step).

Prints a table per part, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from node.training.runner.charlm import CharConfig, build_model
from node.training.runner.local_group import (
    LocalGroup,
    default_backend,
    spawn_local_group,
    split_cpus,
)

#: tiny Shakespeare's vocabulary size (the tokens are random: only speed is measured here).
VOCAB = 65


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per throughput row")
    parser.add_argument("--big-batch", type=int, default=96, help="the larger CUDA batch")
    parser.add_argument("--steps", type=int, default=20, help="training steps of the hierarchical check")
    parser.add_argument("--reduce-mib", type=float, default=64.0,
                        help="buffer of the local all-reduce bandwidth check (MiB of fp32; CPU ranks: /16)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA parts even if a GPU is present")
    parser.add_argument("--timeout", type=float, default=120.0, help="local group collective timeout (s)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor,
                *, autocast: bool = False) -> torch.Tensor:
    """Forward, backward (gradients left in ``.grad``); the optimizer step is the caller's."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=tokens.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    loss.backward()  # type: ignore[no-untyped-call]
    return loss


def throughput(device: torch.device, batch: int, seconds: float, *, autocast: bool = False) -> dict[str, Any]:
    """Tokens/s of forward + backward + AdamW of the baby GPT at ``batch`` on ``device``."""
    config = CharConfig(batch_size=batch)
    model = build_model(config, VOCAB).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (batch, config.block_size + 1), generator=generator).to(device)
    for _ in range(3):  # warm-up: allocator, cuDNN/cuBLAS heuristics, lazy init
        _train_step(model, optimizer, tokens, autocast=autocast)
        optimizer.step()
    _sync(device)
    steps, start = 0, time.perf_counter()
    while True:
        _train_step(model, optimizer, tokens, autocast=autocast)
        optimizer.step()
        steps += 1
        if steps % 5 == 0 or device.type == "cpu":
            _sync(device)
            if time.perf_counter() - start >= seconds and steps >= 3:
                break
    elapsed = time.perf_counter() - start
    return {"device": str(device), "batch": batch, "autocast": "bf16" if autocast else "fp32",
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "steps": steps, "step_ms": 1000 * elapsed / steps,
            "tokens_per_s": batch * config.block_size * steps / elapsed}


# --------------------------------------------------------------------------- hierarchical


class _CountingExchange:
    """A stand-in for the mesh all-reduce: the CPU hand-off of the real one, plus ``add``."""

    def __init__(self, add: float) -> None:
        self.add = add
        self.calls = 0

    def __call__(self, average: torch.Tensor, *, examples: float) -> torch.Tensor:
        self.calls += 1
        return average + self.add if self.add else average


def hierarchical_rank(group: LocalGroup, out: str, steps: int, reduce_mib: float) -> None:
    """Runs in every local rank; writes ``out/rank<r>.json``."""
    device = group.device
    report: dict[str, Any] = {"rank": group.rank, "device": str(device)}

    # Exactness: rank r holds arange(n) * (r + 1); all end with arange * (G + 1) / 2 + 1.
    n = 1 << 16
    flat = torch.arange(n, dtype=torch.float32, device=device) * (group.rank + 1)
    exact = _CountingExchange(add=1.0)
    group.reduce(flat, exact)
    expected = torch.arange(n, dtype=torch.float32, device=device) * (group.world + 1) / 2 + 1
    report["exact_max_error"] = float((flat - expected).abs().max().item())

    # Local all-reduce bandwidth (no exchange), median of 5 after a warm-up.
    big = torch.ones(int(reduce_mib * (1 << 20) / 4), dtype=torch.float32, device=device)
    group.reduce(big)
    times = []
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        group.reduce(big)
        _sync(device)
        times.append(time.perf_counter() - start)
    report["reduce_mib"] = big.numel() * 4 / (1 << 20)
    report["reduce_ms"] = 1000 * statistics.median(times)
    report["reduce_gb_s"] = big.numel() * 4 / statistics.median(times) / 1e9

    # Training: the char GPT, own batches per rank, hierarchical reduction every step.
    config = CharConfig()
    model = build_model(dataclasses.replace(config, seed=1 + group.rank), VOCAB).to(device)
    group.broadcast_parameters(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(100 + group.rank)
    exchange = _CountingExchange(add=0.0)
    compute = reduce = 0.0
    losses = []
    start_all = time.perf_counter()
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (config.batch_size, config.block_size + 1), generator=generator).to(device)
        t0 = time.perf_counter()
        loss = _train_step(model, optimizer, tokens)
        _sync(device)
        t1 = time.perf_counter()
        group.reduce_gradients(model.parameters(), exchange, examples=config.batch_size)
        _sync(device)
        t2 = time.perf_counter()
        optimizer.step()
        compute += t1 - t0
        reduce += t2 - t1
        losses.append(float(loss.item()))
    _sync(device)
    wall = time.perf_counter() - start_all
    report.update({
        "steps": steps, "compute_ms": 1000 * compute / steps, "reduce_ms_per_step": 1000 * reduce / steps,
        "tokens_per_s": config.batch_size * config.block_size * steps / wall,
        "first_loss": losses[0], "last_loss": losses[-1],
        "exchange_calls": exact.calls + exchange.calls,
        "divergence": group.parameters_divergence(model),
        "params": sum(p.numel() for p in model.parameters()),
    })
    Path(out, f"rank{group.rank}.json").write_text(json.dumps(report))


def hierarchical(args: argparse.Namespace, gpus: int) -> dict[str, Any]:
    """Spawn the local group (this process is rank 0), run ``hierarchical_rank`` everywhere."""
    if gpus >= 2:
        devices = [torch.device("cuda", i) for i in range(gpus)]
        reduce_mib = args.reduce_mib
    else:
        devices = [torch.device("cpu")] * 2
        reduce_mib = args.reduce_mib / 16
    backend = default_backend(devices)
    cpus = split_cpus(sorted(os.sched_getaffinity(0)), len(devices))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as out:
        with spawn_local_group(hierarchical_rank, devices=devices, args=(out, args.steps, reduce_mib),
                               cpus=cpus, backend=backend, timeout=args.timeout) as ranks:
            hierarchical_rank(ranks.group, out, args.steps, reduce_mib)
            ranks.join(timeout=args.timeout)
        reports = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(len(devices))]
    rank0 = reports[0]
    return {
        "backend": backend, "ranks": len(devices), "devices": [r["device"] for r in reports],
        "wall_s": time.perf_counter() - started,
        "exact_max_error": max(r["exact_max_error"] for r in reports),
        "divergence": max(r["divergence"] for r in reports),
        "exchange_calls_rank0": rank0["exchange_calls"],
        "exchange_calls_others": sum(r["exchange_calls"] for r in reports[1:]),
        "expected_calls": 1 + args.steps,
        "reduce_mib": rank0["reduce_mib"], "reduce_ms": rank0["reduce_ms"],
        "reduce_gb_s": rank0["reduce_gb_s"],
        "steps": args.steps, "params": rank0["params"],
        "compute_ms": statistics.mean(r["compute_ms"] for r in reports),
        "reduce_ms_per_step": statistics.mean(r["reduce_ms_per_step"] for r in reports),
        "tokens_per_s": sum(r["tokens_per_s"] for r in reports),
        "first_loss": rank0["first_loss"], "last_loss": rank0["last_loss"],
        "ok": (max(r["exact_max_error"] for r in reports) == 0.0
               and max(r["divergence"] for r in reports) == 0.0
               and rank0["exchange_calls"] == 1 + args.steps
               and sum(r["exchange_calls"] for r in reports[1:]) == 0),
    }


# --------------------------------------------------------------------------- report


def environment(use_cuda: bool) -> dict[str, Any]:
    cuda = use_cuda and torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    nccl = None
    if cuda and torch.distributed.is_nccl_available():
        version = torch.cuda.nccl.version()  # type: ignore[no-untyped-call]
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return {
        "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda, "gpus": count,
        "gpu_names": [torch.cuda.get_device_name(i) for i in range(count)],
        "gpu_memory_gib": [round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1) for i in range(count)],
        "nccl": nccl, "cpus": len(os.sched_getaffinity(0)), "cpu_threads": torch.get_num_threads(),
    }


def _table(title: str, rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"\n{title}")
    for j, row in enumerate(rows):
        print("  " + "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))


def run(args: argparse.Namespace) -> int:
    env = environment(not args.no_cuda)
    _table("environment", [["item", "value"]] + [[k, str(v)] for k, v in env.items()])

    rows = [throughput(torch.device("cpu"), 12, args.seconds)]
    if env["gpus"]:
        cuda = torch.device("cuda", 0)
        rows += [throughput(cuda, 12, args.seconds), throughput(cuda, args.big_batch, args.seconds),
                 throughput(cuda, args.big_batch, args.seconds, autocast=True)]
    cpu_rate = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_cpu"] = row["tokens_per_s"] / cpu_rate
    _table("char GPT forward + backward + AdamW (baby GPT, context 64)",
           [["device", "batch", "dtype", "step ms", "tokens/s", "vs CPU"]]
           + [[r["device"], str(r["batch"]), r["autocast"], f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:,.0f}",
               f"{r['vs_cpu']:.1f}x"] for r in rows])

    hier = hierarchical(args, env["gpus"])
    _table(f"hierarchical local group ({hier['backend']}, {hier['ranks']} ranks, fake mesh exchange)", [
        ["check", "value"],
        ["exact result, max error", f"{hier['exact_max_error']:g}"],
        ["exchange calls rank 0 / others", f"{hier['exchange_calls_rank0']} / {hier['exchange_calls_others']}"
                                           f" (expected {hier['expected_calls']} / 0)"],
        [f"local all-reduce {hier['reduce_mib']:.0f} MiB", f"{hier['reduce_ms']:.1f} ms, {hier['reduce_gb_s']:.2f} GB/s"],
        [f"train step ({hier['params']:,} params)", f"compute {hier['compute_ms']:.1f} ms, "
                                                    f"reduce + wait {hier['reduce_ms_per_step']:.1f} ms"],
        ["host tokens/s (all ranks)", f"{hier['tokens_per_s']:,.0f}"],
        [f"loss, steps 1 -> {hier['steps']}", f"{hier['first_loss']:.3f} -> {hier['last_loss']:.3f}"],
        ["parameter divergence", f"{hier['divergence']:g}"],
        ["verdict", "ok" if hier["ok"] else "FAILED"],
    ])
    print(json.dumps({"environment": env, "throughput": rows, "hierarchical": hier}))
    return 0 if hier["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
