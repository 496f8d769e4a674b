"""``python -m simulations <scenario>``: one entry point, one module per scenario.

Each scenario module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and is
imported only when chosen, so ``--help`` stays fast and torch loads only where needed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple


class Entry(NamedTuple):
    """One scenario of the table. A module serving several scenarios (``bench_membership``:
    join and detect) names one add-arguments function per scenario."""

    module: str
    help: str
    add_arguments: str = "add_arguments"
    """The module's function ``(parser) -> None`` that adds this scenario's options."""


#: scenario name -> entry. ``bench`` scenarios are nested under ``bench``.
SCENARIOS: dict[str, Entry] = {
    "demo": Entry("simulations.demo", "a local mesh on loopback: nodes join, one fails and is detected (live table)"),
    "gossip": Entry("simulations.gossip_sim", "in-process SWIM on virtual time: convergence, detection, traffic"),
    "allreduce": Entry("simulations.allreduce_sim", "in-process all-reduce on virtual time: each fault case vs the link optimum"),
    "tasks": Entry("simulations.tasks_sim", "in-process task engines on virtual time: exactly-once results, throughput, failover"),
    "train": Entry("simulations.train", "real processes: a local mesh trains an MLP data-parallel, vs one process"),
    "chaos": Entry("simulations.chaos", "real processes under kill -9, SIGSTOP and a hostile member: leaks, lock-outs, crashes"),
}
BENCHES: dict[str, Entry] = {
    "join": Entry("simulations.bench_membership", "real processes: time to one identical view", "add_join_arguments"),
    "detect": Entry("simulations.bench_membership", "real processes: kill -9 detection and SIGSTOP false deaths",
                    "add_detect_arguments"),
    "codecs": Entry("simulations.bench_codecs", "tensor codecs: bytes, error and speed per codec"),
    "allreduce": Entry("simulations.bench_allreduce", "real processes: all-reduce time vs link optimum and gloo"),
    "wire": Entry("simulations.bench_wire", "in-process: encrypted 4 MiB frame throughput of two Connections vs raw AEAD"),
    "tasks": Entry("simulations.bench_tasks", "real processes: tiny-subtask throughput and round trip, worker and coordinator kill -9"),
    "blobs": Entry("simulations.bench_blobs", "real processes: k newcomers fetch one blob from one seeder vs S/B; kill -9 and a liar"),
    "train": Entry("simulations.bench_train", "real processes: char GPT, 3 workers sync vs one process, DiLoCo vs sync, time per step"),
    "elastic": Entry("simulations.bench_elastic", "real processes on emulated equal slow machines (CPU caps, tbf): "
                     "time to a target loss with N workers vs one"),
}


def _load(entry: Entry, parser: argparse.ArgumentParser) -> None:
    mod = importlib.import_module(entry.module)
    getattr(mod, entry.add_arguments)(parser)
    parser.set_defaults(_run=mod.run)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations", description=__doc__)
    sub = parser.add_subparsers(dest="scenario", required=True)
    for name, entry in SCENARIOS.items():
        p = sub.add_parser(name, help=entry.help)
        if argv[:1] == [name]:
            _load(entry, p)
    bench = sub.add_parser("bench", help="benchmarks with real processes; print a table and a final JSON line")
    bsub = bench.add_subparsers(dest="bench", required=True)
    for name, entry in BENCHES.items():
        p = bsub.add_parser(name, help=entry.help)
        if argv[:2] == ["bench", name]:
            _load(entry, p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    return int(args._run(args))


if __name__ == "__main__":
    sys.exit(main())
