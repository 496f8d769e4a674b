"""A throwaway mesh of real nodes on this machine, for ``python -m node train --local N``.

Like ``torchrun --standalone``: N ``python -m node`` processes on loopback (free ports, the
``local`` preset, data dirs and a new mesh key in a temporary directory), the first one the
seed of the others. ``LocalMesh`` starts them, waits until the first sees all N alive, hands
out the ``ClientConfig`` that reaches the first, and on exit stops them (SIGTERM, then SIGKILL)
and removes the directory. Each node's log is kept in that directory until then and its tail
is shown if a node dies early.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from node.config import Address, ClientConfig
from protocol.errors import ConfigError, StarmeshError

#: Seconds to wait for the nodes to see each other.
JOIN_TIMEOUT_S = 60.0
_PROJECT_ROOT = str(Path(__file__).resolve().parents[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalMesh:
    """N local nodes (module docstring); an async context manager."""

    def __init__(self, n: int, *, extra: tuple[str, ...] = ()) -> None:
        if not 1 <= n <= 16:
            raise ConfigError(f"--local {n}: expected 1..16 nodes")
        self.n = n
        self.extra = extra
        self.dir = Path(tempfile.mkdtemp(prefix="starmesh-local-"))
        self.ports = [free_port() for _ in range(n)]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def key(self) -> Path:
        return self.dir / "mesh.key"

    def client(self, timeout: float) -> ClientConfig:
        return ClientConfig(connect=Address("127.0.0.1", self.ports[0]), data_dir=self.dir / "d0",
                            mesh_key_file=self.key, timeout=timeout)

    async def __aenter__(self) -> LocalMesh:
        try:
            for i in range(self.n):
                self._start(i)
                if i == 0:
                    await self._until(lambda: self.key.exists() and self.key.stat().st_size > 0, "the mesh key")
            await self._until_joined()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.stop()

    def _start(self, i: int) -> None:
        cmd = [sys.executable, "-m", "node", "--listen", f"127.0.0.1:{self.ports[i]}",
               "--data-dir", str(self.dir / f"d{i}"), "--mesh-key-file", str(self.key),
               "--preset", "local", *self.extra]
        if i:
            cmd += ["--join", f"127.0.0.1:{self.ports[0]}"]
        env = dict(os.environ)
        env["PYTHONPATH"] = _PROJECT_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        log = open(self.dir / f"log{i}", "wb")  # noqa: SIM115 (the child keeps it)
        with log:
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, env=env, start_new_session=True))

    def _check_alive(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                tail = (self.dir / f"log{i}").read_text(errors="replace")[-1500:]
                raise StarmeshError(f"local node {i} exited ({p.returncode}):\n{tail}")

    async def _until(self, ok: object, what: str) -> None:
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not ok():  # type: ignore[operator]
            self._check_alive()
            if time.monotonic() > deadline:
                raise StarmeshError(f"local mesh: no {what} after {JOIN_TIMEOUT_S:g}s")
            await asyncio.sleep(0.1)

    async def _until_joined(self) -> None:
        from node.identity import load_mesh_key
        from node.status import fetch_status

        secret = load_mesh_key(self.key)
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while True:
            self._check_alive()
            with contextlib.suppress(StarmeshError, OSError):
                status = await fetch_status(Address("127.0.0.1", self.ports[0]), mesh_secret=secret)
                if sum(m.status.name == "ALIVE" for m in status.members) >= self.n:
                    return
            if time.monotonic() > deadline:
                raise StarmeshError(f"local mesh: {self.n} nodes did not all join in {JOIN_TIMEOUT_S:g}s")
            await asyncio.sleep(0.2)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
