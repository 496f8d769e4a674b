"""One all-reduce benchmark/test process: a real ``Node`` (or a ``torch.distributed`` gloo rank).

``python -m simulations.allreduce_worker node ...`` runs the same ``Node`` as ``python -m
node``, joins the mesh, waits until it sees ``--group-size`` live members (the group: all of
them), runs a warm-up round, then ``--rounds`` rounds per codec of ``--codecs`` on its input
and writes ``results.json`` (per round: seconds, CPU seconds, bytes sent/received from the
node's counters, contributors, dropped; per codec the worst event-loop lag during its rounds,
and the worst of the whole run, ``loop_lag_max_seconds``) and the last output per codec as
``<codec>.npy``.
The results file is rewritten after every codec, so a crash leaves what was measured.

``python -m simulations.allreduce_worker gloo ...`` is the reference: the same input,
``torch.distributed.all_reduce`` (SUM, gloo) then ``/ world``, timed the same way. Both
average in place into a copy of the input made before the clock starts.

Inputs: ``normal:SEED`` (``--size`` standard normal float32 values) or ``npy:PATH``.
Test hooks (real failures, no mocks): ``--die-after-chunks K`` makes the node SIGKILL
itself once it has written K tensor chunks in the first measured round; ``--stall-after-chunks
K`` makes it SIGSTOP itself instead (the test kills it later).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simulations.worker_node import add_node_arguments, node_config, setup_logging, write_json

Floats = NDArray[np.float32]

#: Elements of the warm-up round's tensor (opens every BULK link before timing starts).
WARMUP_ELEMENTS = 4096


def load_input(spec: str, size: int) -> Floats:
    """``normal:SEED`` -> ``size`` N(0, 1) float32 values; ``npy:PATH`` -> the saved array."""
    kind, _, arg = spec.partition(":")
    if kind == "normal":
        out: Floats = np.random.default_rng(int(arg)).standard_normal(size, dtype=np.float32)
        return out
    if kind == "npy":
        return np.ascontiguousarray(np.load(arg), dtype=np.float32).reshape(-1)
    raise SystemExit(f"unknown input {spec!r}: expected normal:SEED or npy:PATH")


def codec_file(codec: str) -> str:
    """A file name for a codec spec (``int8+zstd`` -> ``int8_zstd``)."""
    return "".join(c if c.isalnum() else "_" for c in codec)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# --------------------------------------------------------------------------- node mode


def _self_signal_after(chunks: int, sig: int) -> Any:
    """An all-reduce observer that sends ``sig`` to this process after ``chunks`` sends."""
    count = 0

    def observe(what: str, peer: bytes, nbytes: int) -> None:
        nonlocal count
        if what == "sent":
            count += 1
            if count == chunks:
                os.kill(os.getpid(), sig)

    return observe


async def _wait_group(node: Any, size: int, timeout: float) -> list[bytes]:
    from discovery.members import MemberStatus

    deadline = time.monotonic() + timeout
    while True:
        alive = sorted(m.node_id for m in node.members() if m.status is MemberStatus.ALIVE)
        if len(alive) >= size:
            return alive[:size] if len(alive) == size else alive
        if time.monotonic() > deadline:
            raise SystemExit(f"saw {len(alive)} of {size} members after {timeout}s")
        await asyncio.sleep(0.02)


async def _run_codec(node: Any, group: list[bytes], x: Floats, codec: str, args: argparse.Namespace,
                     first: bool) -> dict[str, Any]:
    from node.allreduce import AllReduceSettings
    from protocol.connection import Channel

    config = None  # the node's defaults
    if args.no_early_averages:
        config = AllReduceSettings(early_averages=False).round_config(x.size)
    rounds, out = [], None
    y = np.empty_like(x)  # averaged in place, like gloo's all_reduce; refilled before the clock starts
    for r in range(args.rounds):
        if first and r == 0 and (args.die_after_chunks or args.stall_after_chunks):
            sig = signal.SIGKILL if args.die_after_chunks else signal.SIGSTOP
            node.allreduce.observer = _self_signal_after(args.die_after_chunks or args.stall_after_chunks, sig)
        np.copyto(y, x)
        sent0, recv0 = dict(node.traffic.sent), dict(node.traffic.received)
        cpu0, t0, started = cpu_seconds(), time.perf_counter(), time.time()
        res = await node.all_reduce(y, group=group, codec=codec, timeout=args.timeout,
                                    key=f"{codec}:{r}", in_place=True, config=config)
        seconds = time.perf_counter() - t0
        cpu = cpu_seconds() - cpu0
        sent = {c: node.traffic.sent[c] - sent0[c] for c in Channel}
        recv = {c: node.traffic.received[c] - recv0[c] for c in Channel}
        out = res.tensor
        rounds.append({
            "seconds": seconds, "cpu_s": cpu, "started": started, "ended": started + seconds,
            "sent_bytes": sent[Channel.BULK] + sent[Channel.CONTROL],
            "received_bytes": recv[Channel.BULK] + recv[Channel.CONTROL],
            "bulk_sent_bytes": sent[Channel.BULK],
            "contributors": [c.hex() for c in res.contributors],
            "dropped": {k.hex(): v.name for k, v in res.dropped.items()},
            "epoch": res.epoch,
        })
    path = Path(args.out_dir) / f"{codec_file(codec)}.npy"
    if args.save_output and out is not None:
        np.save(path, out)
    return {"rounds": rounds, "output": str(path) if args.save_output else None,
            "loop_lag_max_seconds": node.loop_lag.take_peak()}


async def _node_main(args: argparse.Namespace) -> int:
    from node.runtime import Node
    from protocol.connection import Channel

    config = node_config(args, seed=args.seed)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x = load_input(args.input, args.size)
    async with Node(config) as node:
        group = await _wait_group(node, args.group_size, args.join_timeout)
        result: dict[str, Any] = {
            "node_id": node.node_id.hex(), "pid": os.getpid(), "address": node.address,
            "group": [g.hex() for g in group], "input": args.input, "elements": int(x.size),
            "codecs": {}, "error": None,
        }
        warm = np.full(WARMUP_ELEMENTS, 1.0, np.float32)
        for w in range(args.warmup):
            await node.all_reduce(warm, group=group, codec="none", timeout=args.timeout, key=f"warmup:{w}")
        node.loop_lag.take_peak()  # each codec's worst lag covers its own rounds
        try:
            for i, codec in enumerate(args.codecs.split(",")):
                result["codecs"][codec] = await _run_codec(node, group, x, codec, args, i == 0)
                result["peak_rss_bytes"] = peak_rss_bytes()
                result["loop_lag_max_seconds"] = node.loop_lag.max_lag
                result["bulk_congestion"] = sorted({link.congestion() or "unknown" for link in node.links()
                                                    if link.peer is not None and link.peer.channel is Channel.BULK})
                write_json(out_dir / "results.json", result)
        except Exception as exc:  # recorded for the harness, which reports it
            result["error"] = f"{type(exc).__name__}: {exc}"
            write_json(out_dir / "results.json", result)
            raise
        await asyncio.sleep(args.linger)  # let the last FINISH reach everyone before leaving
    return 0


def _node(args: argparse.Namespace) -> int:
    setup_logging(args)
    factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_node_main(args))


# --------------------------------------------------------------------------- gloo mode


def _gloo(args: argparse.Namespace) -> int:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    x = torch.from_numpy(load_input(args.input, args.size))
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=args.rank,
                            world_size=args.world, timeout=datetime.timedelta(seconds=args.timeout))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    warm = torch.ones(WARMUP_ELEMENTS)
    dist.all_reduce(warm)
    rounds = []
    y = x
    for _ in range(args.rounds):
        y = x.clone()
        dist.barrier()
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        y /= args.world
        rounds.append({"seconds": time.perf_counter() - t0, "cpu_s": cpu_seconds() - cpu0})
    if args.save_output:
        np.save(out_dir / "gloo.npy", y.numpy())
    dist.barrier()
    dist.destroy_process_group()
    write_json(out_dir / "results.json", {"rank": args.rank, "rounds": rounds,
                                           "peak_rss_bytes": peak_rss_bytes()})
    return 0


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.allreduce_worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("node", "gloo"):
        p = sub.add_parser(mode)
        p.add_argument("--input", required=True, help="normal:SEED or npy:PATH")
        p.add_argument("--size", type=int, default=1 << 20, help="elements (normal input)")
        p.add_argument("--rounds", type=int, default=3)
        p.add_argument("--timeout", type=float, default=120.0)
        p.add_argument("--out-dir", required=True)
        p.add_argument("--save-output", action="store_true", help="save the last output per codec")
    p = sub.choices["node"]
    add_node_arguments(p)
    p.add_argument("--seed", type=int)
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--codecs", default="none")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--die-after-chunks", type=int, default=0)
    p.add_argument("--stall-after-chunks", type=int, default=0)
    p.add_argument("--no-early-averages", action="store_true",
                   help="averages go out only after the commit (AllReduceConfig.early_averages=False)")
    p = sub.choices["gloo"]
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--master", required=True, help="host:port of rank 0's rendezvous")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the harness asks for stacks on a hang
    return _node(args) if args.mode == "node" else _gloo(args)


if __name__ == "__main__":
    sys.exit(main())
