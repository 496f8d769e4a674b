"""Real node processes on loopback: start, observe (status over the CLIENT channel), kill.

Shared by the node integration tests, ``demo`` and ``bench join`` / ``bench detect``. Each
node is ``python -m node --listen 127.0.0.1:0 --ready-file ...`` in its own data dir; the
ready file tells its address and id. Views are observed in-process by an ``Observer``: one
persistent ``node.status.StatusClient`` (CLIENT link) per node, all polled concurrently from
one asyncio loop and re-dialed when a node died or restarted, so observing neither forks a
process nor opens a connection per poll. ``LocalMesh.views`` is the synchronous form: it
keeps its ``Observer`` on its own event loop (an ``asyncio.Runner``) between calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.config import parse_address
from node.identity import create_mesh_key, load_mesh_key
from node.status import StatusClient, reply_to_json
from node.submitters.keys import public_key_of
from node.submitters.store import default_key_path, load_or_create_submitter_key
from protocol.errors import StarmeshError

REPO_ROOT = Path(__file__).resolve().parents[1]

View = dict[str, Any]
"""One node's status as JSON (``node.status.reply_to_json``)."""


@dataclass
class NodeProcess:
    """One ``python -m node`` child process with its own data dir."""

    data_dir: Path
    mesh_key: Path
    seeds: Sequence[str] = ()
    preset: str = "test"
    extra_args: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""
    node_id: str = ""
    ready_at: float = 0.0
    """Unix time the node wrote its ready file (listening, join sent)."""
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.data_dir / "node.log"

    @property
    def ready_file(self) -> Path:
        return self.data_dir / "ready.json"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        args = [
            sys.executable, "-m", "node", "--listen", "127.0.0.1:0", "--data-dir", str(self.data_dir),
            "--mesh-key-file", str(self.mesh_key), "--preset", self.preset,
            "--ready-file", str(self.ready_file), *self.extra_args,
        ]
        for seed in self.seeds:
            args += ["--join", seed]
        env = {k: v for k, v in os.environ.items() if not k.startswith("STARMESH_")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)

    def poll_ready(self) -> bool:
        """True once the node wrote its ready file (address and id are then set)."""
        if self.address:
            return True
        try:
            data = json.loads(self.ready_file.read_text())
        except (OSError, ValueError):
            return False
        self.address, self.node_id = data["address"], data["node_id"]
        self.ready_at = float(data.get("ready_at", 0.0))
        return True

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def restart(self) -> None:
        """Start again with the same data dir (same identity); a new port."""
        self.address = ""
        self.start()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class LocalMesh:
    """A set of node processes sharing one mesh key under ``root``."""

    def __init__(self, root: Path, *, preset: str = "test") -> None:
        self.root = root
        self.preset = preset
        self.mesh_key = root / "mesh.key"
        root.mkdir(parents=True, exist_ok=True)
        if not self.mesh_key.exists():  # owned by this person's submitter key, as a first node's is
            owner = public_key_of(load_or_create_submitter_key(default_key_path()))
            create_mesh_key(self.mesh_key, owner)
        self.secret = load_mesh_key(self.mesh_key)
        self.nodes: list[NodeProcess] = []
        self._runner: asyncio.Runner | None = None
        self._observer: Observer | None = None

    def add(self, *, seeds: Sequence[str] = (), mesh_key: Path | None = None,
            extra_args: Sequence[str] = ()) -> NodeProcess:
        node = NodeProcess(data_dir=self.root / f"n{len(self.nodes)}", mesh_key=mesh_key or self.mesh_key,
                           seeds=seeds, preset=self.preset, extra_args=extra_args)
        self.nodes.append(node)
        node.start()
        return node

    def wait_ready(self, nodes: Iterable[NodeProcess], timeout: float = 20.0) -> None:
        pending = list(nodes)
        wait_for(lambda: all(n.poll_ready() for n in pending), timeout, what="nodes to listen",
                 detail=lambda: "\n".join(n.log_text()[-2000:] for n in pending if not n.poll_ready()))

    def close(self) -> None:
        """Kill the nodes still running and close the status links of ``views``."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.kill()
        if self._runner is not None:
            assert self._observer is not None
            self._runner.run(self._observer.aclose())
            self._runner.close()
            self._runner = self._observer = None

    def views(self, nodes: Iterable[NodeProcess], timeout: float = 2.0) -> dict[str, View | None]:
        """Each node's current status (None where it did not answer), keyed by node id.

        Polls over one persistent CLIENT link per node, kept between calls on this mesh's own
        event loop; ``close`` closes them."""
        if self._runner is None:
            self._runner = asyncio.Runner()
            self._observer = Observer(self.secret)
        assert self._observer is not None
        return self._runner.run(self._observer.views(nodes, timeout=timeout))


class Observer:
    """One persistent ``StatusClient`` per node, polled concurrently from one asyncio loop.

    ``async with Observer(secret) as obs: views = await obs.views(nodes)`` (or ``await
    obs.aclose()`` when done). A node that does not answer within ``timeout`` (frozen, dead)
    maps to None; its link is closed and dialed again on the next poll, as it is when the
    node's link closed meanwhile (killed, idle timeout) or it restarted at a new address.
    """

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self._clients: dict[str, tuple[str, StatusClient]] = {}
        """node id -> (address it was dialed at, client)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self.dials = 0
        """Links dialed so far (one per node, plus one per re-dial)."""

    async def __aenter__(self) -> Observer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a link's reader task; ``aclose`` waits for it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Close every link and wait (2 s at most) for their reader tasks to end."""
        for _, client in self._clients.values():
            client.close()
        self._clients.clear()
        if self._tasks:
            _, stuck = await asyncio.wait(set(self._tasks), timeout=2.0)
            for task in stuck:
                task.cancel()

    async def _client(self, node: NodeProcess, timeout: float) -> StatusClient:
        """The node's open client, dialed (again) if it has none, it closed, or the node moved."""
        entry = self._clients.get(node.node_id)
        if entry is not None and entry[0] == node.address and entry[1].is_open:
            return entry[1]
        if entry is not None:
            entry[1].close()
            del self._clients[node.node_id]
        self.dials += 1
        client = await StatusClient.connect(parse_address(node.address), mesh_secret=self.secret,
                                            spawn=self._spawn, timeout=timeout)
        self._clients[node.node_id] = (node.address, client)
        return client

    async def view(self, node: NodeProcess, timeout: float = 1.0) -> View | None:
        if not node.address:
            return None
        try:
            client = await self._client(node, timeout)
            return reply_to_json(await client.request(timeout=timeout))
        except StarmeshError:
            entry = self._clients.pop(node.node_id, None)
            if entry is not None:
                entry[1].close()
            return None

    async def views(self, nodes: Iterable[NodeProcess], timeout: float = 1.0) -> dict[str, View | None]:
        targets = [n for n in nodes if n.address]
        replies = await asyncio.gather(*(self.view(n, timeout) for n in targets))
        return {n.node_id: r for n, r in zip(targets, replies, strict=True)}


def converged(views: dict[str, View | None], expected: Iterable[str]) -> bool:
    """Every view answered, lists exactly ``expected`` ids all alive, and all views are equal
    (same members, states and incarnations): one identical view."""
    want = set(expected)
    seen = [states(v) for v in views.values()]
    if not seen or any(v is None for v in views.values()):
        return False
    first = seen[0]
    return set(first) == want and all(s == "alive" for s, _ in first.values()) and all(v == first for v in seen)


def states(view: View | None) -> dict[str, tuple[str, int]]:
    """``{node id: (state, incarnation)}`` of one view."""
    if view is None:
        return {}
    return {m["id"]: (m["state"], m["incarnation"]) for m in view["members"]}


def wait_for(predicate: Callable[[], bool], timeout: float, *, what: str,
             detail: Callable[[], str] | None = None, interval: float = 0.05) -> float:
    """Poll ``predicate`` until true; returns seconds waited. ``TimeoutError`` naming ``what``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            extra = f"\n{detail()}" if detail is not None else ""
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)
    return time.monotonic() - start
