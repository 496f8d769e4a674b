"""``python -m simulations <scenario>``: one entry point, one module per scenario.

Each scenario module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and is
imported only when chosen, so ``--help`` stays fast and torch loads only where needed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: scenario name -> (module, one-line help). ``bench`` scenarios are nested under ``bench``.
SCENARIOS: dict[str, tuple[str, str]] = {
    "demo": ("simulations.demo", "a local mesh on loopback: nodes join, one fails and is detected (live table)"),
    "gossip": ("simulations.gossip_sim", "in-process SWIM on virtual time: convergence, detection, traffic"),
    "allreduce": ("simulations.allreduce_sim", "in-process all-reduce on virtual time: each fault case vs the link optimum"),
    "train": ("simulations.train", "real processes: a local mesh trains an MLP data-parallel, vs one process"),
}
BENCHES: dict[str, tuple[str, str]] = {
    "join": ("simulations.bench_membership", "real processes: time to one identical view"),
    "detect": ("simulations.bench_membership", "real processes: kill -9 detection and SIGSTOP false deaths"),
    "codecs": ("simulations.bench_codecs", "tensor codecs: bytes, error and speed per codec"),
    "allreduce": ("simulations.bench_allreduce", "real processes: all-reduce time vs link optimum and gloo"),
    "wire": ("simulations.bench_wire", "in-process: encrypted 4 MiB frame throughput of two Connections vs raw AEAD"),
}


def _load(module: str, name: str, parser: argparse.ArgumentParser) -> None:
    mod = importlib.import_module(module)
    mod.add_arguments(parser, name) if _takes_name(mod) else mod.add_arguments(parser)
    parser.set_defaults(_run=mod.run)


def _takes_name(mod: object) -> bool:
    import inspect

    return len(inspect.signature(mod.add_arguments).parameters) == 2  # type: ignore[attr-defined]


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations", description=__doc__)
    sub = parser.add_subparsers(dest="scenario", required=True)
    for name, (module, help_) in SCENARIOS.items():
        p = sub.add_parser(name, help=help_)
        if argv[:1] == [name]:
            _load(module, name, p)
    bench = sub.add_parser("bench", help="benchmarks with real processes; print a table and a final JSON line")
    bsub = bench.add_subparsers(dest="bench", required=True)
    for name, (module, help_) in BENCHES.items():
        p = bsub.add_parser(name, help=help_)
        if argv[:2] == ["bench", name]:
            _load(module, name, p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    return int(args._run(args))


if __name__ == "__main__":
    sys.exit(main())
