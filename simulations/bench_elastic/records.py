"""``python -m simulations.bench_elastic.records --connect ADDR --mesh-key-file K --job HEX``:
a training job's committed ``SegmentRecord`` s as one JSON line, for the ``bench elastic``
parts (which run it where the submitter runs).

The records are the job's log entries (PROTOCOL.md §15), fetched as ``python -m node train``
fetches them at the end (the task's outcomes, through whichever member answers), with every
field: ``events`` (``JOINED``/``ACTIVE``/``GONE``/``FAILED`` with ``seconds`` and ``reason``),
``group``, ``finished``, ``shares``, ``wall_s``, which the train summary and ``metrics.jsonl``
leave out. Output: ``{"job", "state", "coordinator", "records": [record as JSON, step order]}``
(``node.training.outputs.jsonable``: node ids hex, enums lower-case names).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any


async def fetch(address: str, key: Path, job: str, timeout: float) -> dict[str, Any]:
    from node.identity import load_mesh_key
    from node.task_client import AsyncMeshClient
    from node.training.outputs import jsonable, ordered
    from protocol.messages.tasks import decode_struct
    from protocol.messages.training import SegmentRecord

    mesh = await AsyncMeshClient.connect(address, mesh_secret=load_mesh_key(key), timeout=timeout)
    try:
        outcomes, summary = await mesh.task(job).outcomes()
    finally:
        await mesh.close()
    records = [decode_struct(SegmentRecord, o.value, what="SegmentRecord") for o in outcomes if o.ok and o.value]
    return {"job": job, "state": summary.state.name.lower(), "coordinator": summary.coordinator.hex(),
            "records": [jsonable(r) for r in ordered(records)]}


def main(argv: list[str] | None = None) -> int:
    from node.training.outputs import dumps

    p = argparse.ArgumentParser(prog="python -m simulations.bench_elastic.records", description=__doc__)
    p.add_argument("--connect", required=True, help="HOST:PORT of a node of the mesh")
    p.add_argument("--mesh-key-file", type=Path, required=True)
    p.add_argument("--job", required=True, help="the job id (32 hex digits)")
    p.add_argument("--timeout", type=float, default=15.0)
    args = p.parse_args(argv)
    print(dumps(asyncio.run(fetch(args.connect, args.mesh_key_file, args.job, args.timeout))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
