"""Start N all-reduce worker processes (mesh nodes or gloo ranks), wait, collect their results.

Shared by ``bench allreduce`` and the all-reduce integration tests. On loopback the first
node listens on port 0 and the others join it once its ready file names the port; inside a
``ShapedNet`` every node has its own address, so all listen on ``MESH_PORT`` and start at
once. Every process is killed on the way out, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.identity import create_mesh_key
from simulations.netshape import ShapedNet
from simulations.nodeprocs import REPO_ROOT, wait_for

MESH_PORT = 7400
GLOO_PORT = 29500


@dataclass
class Worker:
    """One worker process and where it writes."""

    index: int
    out_dir: Path
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.out_dir / "worker.log"

    @property
    def ready_file(self) -> Path:
        return self.out_dir / "ready.json"

    def start(self, env: dict[str, str]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)

    def results(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads((self.out_dir / "results.json").read_text())
        except (OSError, ValueError):
            return None
        return data

    def log_text(self, tail: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@dataclass
class Run:
    """A set of workers; ``close()`` kills what is left."""

    workers: list[Worker] = field(default_factory=list)

    def wait(self, timeout: float, workers: Sequence[Worker] | None = None) -> None:
        """Wait for ``workers`` (default: all) to exit (``TimeoutError`` with the logs if not)."""
        chosen = self.workers if workers is None else workers
        wait_for(lambda: all(w.proc is not None and w.proc.poll() is not None for w in chosen),
                 timeout, what="all-reduce workers to finish", detail=lambda: self._stacks(chosen),
                 interval=0.1)

    def _stacks(self, workers: Sequence[Worker]) -> str:
        """The logs, after asking every hung worker to dump its threads' stacks (SIGUSR1)."""
        hung = [w for w in workers if w.proc is not None and w.proc.poll() is None]
        for w in hung:
            with contextlib.suppress(OSError):
                w.proc.send_signal(signal.SIGUSR1)  # type: ignore[union-attr]
        if hung:
            time.sleep(1.0)
        return self.logs()

    def logs(self) -> str:
        return "\n".join(f"--- worker {w.index} (rc {w.proc.poll() if w.proc else None})\n{w.log_text()}"
                         for w in self.workers)

    def close(self) -> None:
        for w in self.workers:
            w.kill()


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STARMESH_")}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_mesh(root: Path, inputs: Sequence[str], *, size: int, codecs: Sequence[str], rounds: int,
               warmup: int = 1, timeout: float = 120.0, net: ShapedNet | None = None,
               save_output: bool = True, extra: Sequence[Sequence[str]] = (),
               preset: str = "local") -> Run:
    """Start one mesh node worker per input; returns once all are started."""
    root.mkdir(parents=True, exist_ok=True)
    key = root / "mesh.key"
    if not key.exists():
        create_mesh_key(key)
    n, run, env = len(inputs), Run(), child_env()
    for i, spec in enumerate(inputs):
        out = root / f"node{i}"
        listen = f"{net.addresses[i]}:{MESH_PORT}" if net else "127.0.0.1:0"
        argv = [sys.executable, "-m", "simulations.allreduce_worker", "node", "--input", spec,
                "--size", str(size), "--rounds", str(rounds), "--warmup", str(warmup),
                "--timeout", str(timeout), "--out-dir", str(out), "--listen", listen,
                "--data-dir", str(out / "data"), "--mesh-key-file", str(key),
                "--ready-file", str(out / "ready.json"), "--group-size", str(n),
                "--codecs", ",".join(codecs), "--preset", preset, "--seed", str(i)]
        if save_output:
            argv.append("--save-output")
        if i < len(extra):
            argv += list(extra[i])
        if i > 0:
            argv += ["--join", f"{net.addresses[0]}:{MESH_PORT}" if net else _address(run.workers[0])]
        worker = Worker(i, out, net.wrap(i, argv) if net else argv)
        (out / "ready.json").unlink(missing_ok=True)
        worker.start(env)
        run.workers.append(worker)
    return run


def _address(first: Worker) -> str:
    def ready() -> bool:
        if first.proc is not None and first.proc.poll() is not None:
            raise RuntimeError(f"the first node exited:\n{first.log_text()}")
        return first.ready_file.exists()

    wait_for(ready, 30.0, what="the first node to listen", detail=first.log_text)
    address: str = json.loads(first.ready_file.read_text())["address"]
    return address


def start_gloo(root: Path, inputs: Sequence[str], *, size: int, rounds: int, timeout: float = 120.0,
               net: ShapedNet | None = None, save_output: bool = True) -> Run:
    """Start one gloo rank per input (rank 0 hosts the rendezvous)."""
    master = f"{net.addresses[0]}:{GLOO_PORT}" if net else f"127.0.0.1:{free_port()}"
    env = child_env(GLOO_SOCKET_IFNAME="eth0" if net else "lo", OMP_NUM_THREADS="1")
    run = Run()
    for i, spec in enumerate(inputs):
        out = root / f"gloo{i}"
        argv = [sys.executable, "-m", "simulations.allreduce_worker", "gloo", "--input", spec,
                "--size", str(size), "--rounds", str(rounds), "--timeout", str(timeout),
                "--out-dir", str(out), "--rank", str(i), "--world", str(len(inputs)),
                "--master", master]
        if save_output:
            argv.append("--save-output")
        worker = Worker(i, out, net.wrap(i, argv) if net else argv)
        worker.start(env)
        run.workers.append(worker)
    return run


def finish(run: Run, timeout: float) -> list[dict[str, Any]]:
    """Wait for ``run`` and return every worker's results; ``RuntimeError`` (with logs) if one
    failed or wrote none. Kills whatever is still running on the way out."""
    try:
        run.wait(timeout)
        results = [w.results() for w in run.workers]
        bad = [w for w, r in zip(run.workers, results, strict=True)
               if r is None or r.get("error") or (w.proc is not None and w.proc.returncode != 0)]
        if bad:
            raise RuntimeError(f"{len(bad)} worker(s) failed:\n{run.logs()}")
        return [r for r in results if r is not None]
    finally:
        run.close()


def elapsed(start: float) -> float:
    return time.monotonic() - start
