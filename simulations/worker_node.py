"""What every worker process of the simulations shares: its node's flags, that node's
``NodeConfig``, logging, and the results file (``simulations.allreduce_worker``,
``simulations.train_worker``; their harnesses pass these flags)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from node.config import LinkConfig, NodeConfig, parse_address


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the worker's mesh node (and how long it waits for the group / lingers)."""
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--join", action="append", default=[])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--mesh-key-file", required=True)
    parser.add_argument("--ready-file")
    parser.add_argument("--preset", default="local")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--join-timeout", type=float, default=30.0)
    parser.add_argument("--linger", type=float, default=0.5)
    parser.add_argument("--bulk-congestion", help="TCP congestion control of BULK links (default: the system's)")


def node_config(args: argparse.Namespace, *, seed: int | None) -> NodeConfig:
    """The node of ``add_node_arguments``' flags; ``seed`` seeds its gossip randomness."""
    return NodeConfig(
        listen=parse_address(args.listen), data_dir=Path(args.data_dir),
        seeds=tuple(parse_address(s) for s in args.join), mesh_key_file=Path(args.mesh_key_file),
        preset=args.preset, ready_file=Path(args.ready_file) if args.ready_file else None,
        log_level=args.log_level, seed=seed, links=LinkConfig(bulk_congestion=args.bulk_congestion),
    )


def setup_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically (the harness may read it at any time)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
