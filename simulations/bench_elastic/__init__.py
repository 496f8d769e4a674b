"""``python -m simulations bench elastic --part PART``: the elastic bars of issue 14, measured on a
cluster of equal slow machines emulated on this one.

Every part runs real ``python -m node`` processes, each node (and the task and training
processes it starts) in its own cgroup capped to ``--cap`` cores and, with ``--shape``, in its
own network namespace behind a ``tc tbf`` link (``cluster.EmulatedCluster``), and trains the
built-in char GPT through ``python -m node train``. The parts:

``speedup`` (``speedup.py``)
    time to a fixed validation loss with 1, 2, 4, 8 workers at one global batch, against one
    worker at that batch and at its own best batch, in sync and DiLoCo mode.

``newcomer`` (``newcomer.py``)
    a node joins a running job of ``--k`` workers: the state download (from the newcomer's blob
    store) against 1.2 x state bytes / bandwidth, join -> first contribution (the records'
    ``JOINED``/``ACTIVE`` events), the others' step time before vs during the join.

``churn`` (``churn.py``)
    ``--churn-workers`` workers, a machine killed every ``--period`` s (the coordinator among
    them) and a fresh one joining half a period later: the job finishes, its validation loss
    against the same job without churn, the time lost per event.

A part is a module of this package with ``add_arguments(parser)`` (its own options; the
common ones are added here) and ``run(args) -> int``, registered in ``PARTS``. ``follow.py``
observes a running job from outside the nodes (the train CLI's lines, a node's blob store);
``records.py`` fetches a job's committed records with their events.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import NamedTuple

from simulations.bench_train import MODEL_SIZES


class Part(NamedTuple):
    module: str
    help: str


#: ``--part`` name -> the module that measures it.
PARTS: dict[str, Part] = {
    "speedup": Part("simulations.bench_elastic.speedup",
                    "time to a target validation loss with N workers vs one, at one global batch"),
    "newcomer": Part("simulations.bench_elastic.newcomer",
                     "a node joins a running job: state download vs 1.2 x S/B, join -> first "
                     "contribution, the others' step time before vs during"),
    "churn": Part("simulations.bench_elastic.churn",
                  "a worker kill -9'ed every --period s (the coordinator once) and a node joining: the job "
                  "finishes, val loss vs no churn, time lost per event"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", choices=sorted(PARTS), default="speedup",
                        help="what to measure: " + "; ".join(f"{k}: {p.help}" for k, p in PARTS.items()))
    parser.add_argument("--workers", default="1,2,4,8", help="cluster sizes N, comma-separated (1,2,4,8)")
    parser.add_argument("--modes", default="sync,diloco", help="sync and/or diloco (sync,diloco)")
    parser.add_argument("--cap", type=float, default=0.2,
                        help="CPU cores per emulated machine: a cgroup per node (0: no caps) (0.2)")
    parser.add_argument("--shape", default="100mbit",
                        help="every node's link both ways, tc tbf in its own namespace (loopback: none) (100mbit)")
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="baby",
                        help="charlm preset: baby (nanoGPT's baby GPT, default), small, tiny")
    parser.add_argument("--job-arg", metavar="KEY=VALUE", action="append", default=[],
                        help="a charlm option for every run (repeat)")
    parser.add_argument("--codec", default="int8+zstd", help="all-reduce codec (int8+zstd)")
    parser.add_argument("--inner-steps", type=int, default=50, help="DiLoCo's H (50)")
    parser.add_argument("--segment-steps", type=int, default=50, help="sync: steps per segment (50)")
    parser.add_argument("--preset", default="local", help="SWIM preset of the nodes (local)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one job may take (3600)")
    parser.add_argument("--stall", type=float, default=300.0,
                        help="newcomer, churn: end a job that commits no step for this long, as failed (300)")
    parser.add_argument("--dir", type=Path, default=None, help="keep data dirs, logs and out dirs here")
    parser.add_argument("--json", action="store_true", help="a JSON line per run and a final JSON line")
    for part in PARTS.values():
        importlib.import_module(part.module).add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    code: int = importlib.import_module(PARTS[args.part].module).run(args)
    return code
