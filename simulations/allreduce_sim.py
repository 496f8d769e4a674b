"""``python -m simulations allreduce``: all-reduce rounds in one process on virtual time,
each fault case against the link optimum. The harness (N real ``AllReduceRound`` cores
behind the node's ``RoundTable``, the real codecs, a seeded network, scripted faults) is
``node.allreduce.testing``, shared with the tests.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from node.allreduce import AllReduceConfig
from node.allreduce.testing import AllReduceSim, NodeOutcome, NodeScript, exact_mean, node_ids

__all__ = ["FAULTS", "AllReduceSim", "NodeOutcome", "NodeScript", "add_arguments", "exact_mean", "node_ids",
           "run"]


# ---------------------------------------------------------------------- scenario


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--numel", type=int, default=100_000)
    parser.add_argument("--codec", default="none")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--bandwidth", type=float, default=125e6, help="bytes/s per link")
    parser.add_argument("--latency", type=float, default=0.0002, help="one-way seconds")
    parser.add_argument("--chunk", type=int, default=16_384, help="elements per chunk (window: 4 chunks)")
    parser.add_argument("--json", action="store_true")


FAULTS: dict[str, NodeScript] = {
    "none": NodeScript(),
    "fails-before": NodeScript(start_at=None),
    "fails-sending": NodeScript(crash_after_parts=2),
    "sends-slowly": NodeScript(part_delay=60.0),
    "fails-reducing": NodeScript(crash_after_averages=1),
    "reduces-slowly": NodeScript(average_delay=60.0),
    "cancels": NodeScript(cancel_after_parts=1),
}


def run(args: argparse.Namespace) -> int:
    cfg = AllReduceConfig.for_transfer(numel=args.numel, bytes_per_s=args.bandwidth,
                                       base=AllReduceConfig.local().replace(chunk_elements=args.chunk,
                                                                            window_bytes=16 * args.chunk))
    rows = []
    for name, script in FAULTS.items():
        times, ok = [], True
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            tensors = [rng.standard_normal(args.numel).astype(np.float32) for _ in range(args.nodes)]
            sim = AllReduceSim(tensors, scripts={1: script}, config=cfg, seed=seed, codec=args.codec,
                               bandwidth=args.bandwidth, shared_nic=True, latency=args.latency,
                               jitter=args.latency / 2)
            out = sim.run()
            results = [o.result for o in out.values() if o.result is not None]
            ok &= bool(results) and all(np.array_equal(r.average, results[0].average) for r in results)
            times.append(max(o.ended_at or 0.0 for o in out.values()))
        optimum = 2 * (args.nodes - 1) / args.nodes * 4 * args.numel / args.bandwidth
        median = float(np.median(times))
        rows.append({"fault": name, "median_s": median, "optimum_s": optimum,
                     "efficiency": optimum / median, "consistent": ok})
    print(f"{'fault':16} {'virtual s':>10} {'optimum s':>10} {'of optimum':>10} consistent")
    for r in rows:
        print(f"{r['fault']:16} {r['median_s']:10.3f} {r['optimum_s']:10.3f} {r['efficiency']:10.1%} {r['consistent']}")
    if args.json:
        print(json.dumps({"scenario": "allreduce", "rows": rows}))
    return 0 if all(r["consistent"] for r in rows) else 1
