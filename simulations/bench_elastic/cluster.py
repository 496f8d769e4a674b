"""A cluster of ``n`` equal slow machines emulated on this one, for the ``bench elastic`` parts.

``EmulatedCluster(root, n=, cap=, rate=)`` is a ``BenchMesh`` of ``n`` real node processes
(``--preset local``) whose node ``i`` runs in cgroup ``i`` of a ``CpuCaps`` capped to ``cap``
cores (no caps with ``cap=0``) and, with a ``rate``, in namespace ``i`` of a ``ShapedNet``
(each link shaped both ways by ``tc tbf``). The node process enters its cgroup before it starts
(``CpuCaps.wrap`` outside ``ShapedNet.wrap``), so its task and training processes start in it
too; ``CgroupWatch`` checks that while a job runs, from ``/proc``. The submitter (``train``,
``cli``) runs in node 0's namespace but outside the caps: it stands for the user's own machine.

``spare=m`` makes room (a cgroup, a namespace) for ``m`` more machines that ``start_next()``
starts later, e.g. a newcomer joining a running job; ``client=True`` puts the submitter on a
machine of its own (an uncapped namespace with a link like the others', no node), so it keeps
its connections when any node dies: ``client_argv``/``client_cli`` run the CLI there against
node ``i``. ``kill_machine(i)`` is a machine's death: SIGKILL to every process of node ``i``
(its cgroup, or its process tree without caps), then its link goes down, so it falls silent as
a powered-off machine does instead of refusing connections. ``node_id(i)`` is node ``i``'s id
(hex, from its ready file).

``close()`` kills the nodes, what is left in their cgroups (orphaned training processes) and
removes the groups and namespaces, whatever happened; ``unavailable(cap=, rate=)`` tells why
the cluster cannot be built here (root, cgroup v1 cpu, ip netns, tc).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.submitters.keys import public_key_of
from node.submitters.store import load_or_create_submitter_key
from simulations import cpucaps, netshape
from simulations.benchmesh import BenchMesh
from simulations.cpucaps import CpuCaps, group_of
from simulations.netshape import ShapedNet
from simulations.nodeprocs import REPO_ROOT, wait_for

TRAIN_WORKER = "node.training.train_worker"
"""What a node's training process runs (``python -m node.training.train_worker``)."""


def unavailable(*, cap: float, rate: str | None) -> str | None:
    """Why an ``EmulatedCluster`` with these caps and link cannot be built here (None: it can)."""
    if cap > 0 and (why := cpucaps.unavailable()):
        return f"--cap {cap:g}: {why}"
    if rate and (why := netshape.unavailable()):
        return f"--shape {rate}: {why}"
    return None


class EmulatedCluster(BenchMesh):
    """``n`` capped, shaped node processes and a submitter key (module docstring)."""

    def __init__(self, root: Path, *, n: int, cap: float, rate: str | None, preset: str = "local",
                 ready_s: float = 120.0, spare: int = 0, client: bool = False) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.submitter = root / "submitter.key"
        self.preset, self.ready_s = preset, ready_s
        self.slots = n + spare
        """Machines this cluster can hold: ``n`` started now, ``spare`` by ``start_next``."""
        net = ShapedNet(self.slots + (1 if client else 0), rate=rate) if rate else None
        self.client_slot = self.slots if client and net is not None else 0
        """The namespace the submitter runs in (node 0's unless ``client``)."""
        self.caps = CpuCaps(self.slots, cores=cap) if cap > 0 else None
        super().__init__(root, net=net, owner=public_key_of(load_or_create_submitter_key(self.submitter)))
        try:
            if self.caps is not None:
                cpucaps.sweep_stale()
                self.caps.create()
            if net is not None:
                net.create()
            for _ in range(n):
                self.start(preset=preset, ready_s=ready_s)
        except BaseException:
            self.close()
            raise

    def start_next(self, *, join: int | None = None) -> int:
        """Start the next spare machine's node, joining through node ``join`` (default: the
        first); its index."""
        i = len(self.nodes)
        if i >= self.slots:
            raise RuntimeError(f"no spare machine left ({self.slots} made)")
        self.start(preset=self.preset, ready_s=self.ready_s,
                   join=self.addresses[join] if join is not None else None)
        return i

    def node_id(self, i: int, timeout: float = 60.0) -> str:
        """Node ``i``'s id, hex (its ready file, waited for)."""
        worker = self.nodes[i]
        wait_for(worker.ready_file.exists, timeout, what=f"node {i}'s ready file", detail=worker.log_text)
        node_id: str = json.loads(worker.ready_file.read_text())["node_id"]
        return node_id

    def kill_machine(self, i: int) -> list[int]:
        """SIGKILL every process of machine ``i`` and take its link down (module docstring);
        the pids killed."""
        worker = self.nodes[i]
        pids: list[int] = []
        if self.caps is not None:
            pids = self.caps.members(i)
        elif worker.proc is not None:
            pids = [worker.proc.pid, *descendants(worker.proc.pid, _processes())]
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        worker.kill()
        if self.net is not None:
            subprocess.run(["ip", "-n", self.net.namespaces[i], "link", "set", "eth0", "down"],
                           capture_output=True, check=False)
        return pids

    def client_argv(self, i: int, *args: str) -> list[str]:
        """``python -m node ARGS --connect node i``, where the submitter runs."""
        argv = [sys.executable, "-m", "node", *args, "--connect", self.addresses[i], "--mesh-key-file", str(self.key)]
        return self.wrap(self.client_slot, argv) if self.net is not None else argv

    def client_cli(self, i: int, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.client_argv(i, *args), capture_output=True, text=True, timeout=timeout,
                              env=self.env, cwd=REPO_ROOT)

    def client_module(self, module: str, *args: str) -> list[str]:
        """``python -m MODULE ARGS``, where the submitter runs."""
        argv = [sys.executable, "-m", module, *args]
        return self.wrap(self.client_slot, argv) if self.net is not None else argv

    def wrap_node(self, i: int, argv: list[str]) -> list[str]:
        inner = self.wrap(i, argv)
        return self.caps.wrap(i, inner) if self.caps is not None else inner

    def close(self) -> None:
        try:
            super().close()
        finally:
            try:
                if self.caps is not None:
                    self.caps.close()
            finally:
                if self.net is not None:
                    self.net.close()

    def __enter__(self) -> EmulatedCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cpu(self, wall_s: float) -> dict[str, Any]:
        """Each node's CPU seconds so far, the share of its cap they are over ``wall_s``, and
        the CFS periods in which its cap held it back (``{}`` without caps)."""
        if self.caps is None:
            return {}
        caps = self.caps
        used = [caps.usage(i) for i in range(caps.n)]
        stats = [caps.throttled(i) for i in range(caps.n)]
        return {"cap": caps.cores, "used_s": [round(u, 2) for u in used],
                "of_cap": [round(u / (caps.cores * wall_s), 3) if wall_s > 0 else 0.0 for u in used],
                "throttled_periods": [round(s["throttled"] / s["periods"], 3) if s["periods"] else 0.0
                                      for s in stats]}


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process, from ``/proc``."""
    out: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out[int(entry.name)] = (ppid, cmdline)
    return out


def descendants(pid: int, table: dict[int, tuple[int, str]]) -> list[int]:
    """Every process below ``pid`` in ``table`` (``_processes``), breadth first."""
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(p)
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children.get(p, []))
    return out


class Poller:
    """``sample()`` now and every ``interval`` seconds from a daemon thread, until ``stop()``."""

    def __init__(self, sample: Callable[[], None], interval: float, name: str) -> None:
        self._sample, self._interval = sample, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self._interval):
                return


@dataclass
class CgroupWatch:
    """While a job runs, every ``interval`` seconds: each node's descendant processes and the
    cgroup each is in (``/proc/PID/cgroup``), from a thread. ``result()``: per node, the
    training processes seen and whether every descendant was in the node's own group."""

    cluster: EmulatedCluster
    interval: float = 1.0
    training: list[set[int]] = field(default_factory=list)
    strays: list[set[str]] = field(default_factory=list)
    _poller: Poller | None = None

    def __enter__(self) -> CgroupWatch:
        n = self.cluster.slots  # the spare machines too: they may start while it watches
        self.training = [set() for _ in range(n)]
        self.strays = [set() for _ in range(n)]
        if self.cluster.caps is not None:
            self._poller = Poller(self.sample, self.interval, "cgroup-watch")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._poller is not None:
            self._poller.stop()

    def sample(self) -> None:
        caps = self.cluster.caps
        if caps is None:
            return
        table = _processes()
        for i, node in enumerate(self.cluster.nodes):
            if node.proc is None:
                continue
            for pid in [node.proc.pid, *descendants(node.proc.pid, table)]:
                where = group_of(pid)
                if where is None:
                    continue  # gone since the table was read
                if where != caps.group(i):
                    self.strays[i].add(f"{pid} {table[pid][1][:80]} in {where}")
                elif TRAIN_WORKER in table[pid][1]:
                    self.training[i].add(pid)

    def result(self) -> dict[str, Any]:
        if self.cluster.caps is None:
            return {"checked": False}
        n = len(self.cluster.nodes)
        return {"checked": True, "nodes_with_training_process_in_own_group": sum(1 for t in self.training[:n] if t),
                "nodes": n, "strays": sorted(s for group in self.strays for s in group)}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a job's ``metrics.jsonl`` (``node.training.outputs``), [] if there is none."""
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []
