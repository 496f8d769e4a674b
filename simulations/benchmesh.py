"""The node processes of one benchmark run, on loopback or in shaped network namespaces.

``BenchMesh`` starts real ``python -m node`` processes (or a stand-in module that speaks as a
node, e.g. a liar) in ``root/n<i>``, each under ``net.wrap`` when a ``ShapedNet`` is given, the
first the seed of the others; it runs the CLI next to a node (``cli``), waits until nodes see
each other, and kills them all (``close``). ``bench blobs`` and ``bench train`` use it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from node.identity import create_mesh_key
from simulations.allreduce_procs import MESH_PORT, Worker, child_env
from simulations.netshape import ShapedNet
from simulations.nodeprocs import wait_for


class BenchMesh:
    """Node processes sharing one mesh key (module docstring)."""

    def __init__(self, root: Path, *, net: ShapedNet | None, owner: bytes | None = None) -> None:
        self.root, self.net = root, net
        root.mkdir(parents=True, exist_ok=True)
        self.key = root / "mesh.key"
        create_mesh_key(self.key, owner)
        self.env = child_env()
        self.nodes: list[Worker] = []
        self.addresses: list[str] = []

    def start(self, *, preset: str, module: str = "node", extra: Sequence[str] = (),
              ready_s: float = 30.0, join: str | None = None) -> Worker:
        """Start the next node (``module``'s ``--listen``/``--data-dir``/... CLI, plus ``extra``),
        joining through ``join`` (default: the first node's address)."""
        i = len(self.nodes)
        out = self.root / f"n{i}"
        listen = f"{self.net.addresses[i]}:{MESH_PORT}" if self.net else "127.0.0.1:0"
        argv = [sys.executable, "-m", module, "--listen", listen, "--data-dir", str(out / "data"),
                "--mesh-key-file", str(self.key), "--preset", preset,
                "--ready-file", str(out / "ready.json"), "--log-level", "WARNING", *extra]
        if i > 0:
            argv += ["--join", join or self.addresses[0]]
        worker = Worker(i, out, self.wrap_node(i, argv))
        worker.start(self.env)
        self.nodes.append(worker)
        self.addresses.append(listen if self.net else self._address(worker, ready_s))
        return worker

    def _address(self, worker: Worker, timeout: float) -> str:
        def ready() -> bool:
            if worker.proc is not None and worker.proc.poll() is not None:
                raise RuntimeError(f"node {worker.index} exited:\n{worker.log_text()}")
            return worker.ready_file.exists()

        wait_for(ready, timeout, what=f"node {worker.index} to listen", detail=worker.log_text)
        address: str = json.loads(worker.ready_file.read_text())["address"]
        return address

    def wrap(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run where node ``i`` runs (its namespace): the node itself and ``cli``."""
        return self.net.wrap(i, argv) if self.net else argv

    def wrap_node(self, i: int, argv: list[str]) -> list[str]:
        """The node process ``i`` itself (a subclass may add to ``wrap``, e.g. a CPU cap)."""
        return self.wrap(i, argv)

    def cli(self, i: int, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """``python -m node ARGS --connect node i`` next to node ``i``."""
        argv = [sys.executable, "-m", "node", *args, "--connect", self.addresses[i], "--mesh-key-file", str(self.key)]
        return subprocess.run(self.wrap(i, argv), capture_output=True, text=True, timeout=timeout, env=self.env)

    def alive(self, i: int) -> int:
        """Members node ``i`` lists alive (0 if it does not answer)."""
        done = self.cli(i, "status", "--json", "--timeout", "5", timeout=30)
        if done.returncode != 0:
            return 0
        return sum(m["state"] == "alive" for m in json.loads(done.stdout)["members"])

    def wait_converged(self, timeout: float = 60.0, *, observers: Iterable[int] | None = None) -> None:
        """Until each of ``observers`` (default: every node) lists every node alive."""
        n = len(self.nodes)
        pending = set(range(n) if observers is None else observers)

        def all_see_all() -> bool:
            for i in sorted(pending):
                if self.alive(i) == n:
                    pending.discard(i)
            return not pending

        wait_for(all_see_all, timeout, what=f"{n} nodes to see each other", interval=0.5,
                 detail=lambda: "\n".join(f"--- n{w.index}\n{w.log_text()}" for w in self.nodes))

    def close(self) -> None:
        for w in self.nodes:
            w.kill()
