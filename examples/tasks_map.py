"""Run a function over inputs on the mesh from a script, and follow it.

Terminal 1 (a node; any member of a mesh will do)::

    python -m node --listen 127.0.0.1:7400 --data-dir mesh-seed

Terminal 2 (this machine holds the mesh owner's submitter key: the first node made it)::

    python examples/tasks_map.py --connect 127.0.0.1:7400 --mesh-key-file mesh-seed/mesh.key

It submits ``mymod:work`` from the bundle ``examples/myjob`` over 20 inputs, prints each result
as it is recorded, then all of them in input order, and the task's summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from node.task_client import MeshClient

BUNDLE = Path(__file__).with_name("myjob")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connect", default="127.0.0.1:7400", help="HOST:PORT of any node")
    parser.add_argument("--mesh-key-file", default="mesh-seed/mesh.key", help="the mesh's key file")
    args = parser.parse_args()
    with MeshClient.connect(args.connect, mesh_key_file=args.mesh_key_file) as client:
        task = client.map("mymod:work", range(20), bundle=BUNDLE, retries=3, timeout=60,
                          resources={"cpus": 1})
        print(f"task {task.id}")
        for result in task.as_completed():          # as each subtask is recorded, in any order
            print(f"  subtask {result.index} done")
        results = task.results()                    # all of them, in input order
        print("squares:", [r.value["square"] for r in results])
        summary = task.status()
        print(f"{summary.state.name.lower()}: {summary.done}/{summary.total} done, "
              f"{summary.failed} failed, {summary.retried} retried")


if __name__ == "__main__":
    main()
