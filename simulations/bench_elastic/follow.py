"""What the ``newcomer`` and ``churn`` parts observe of a running job, from outside the nodes.

``TrainRun`` runs ``python -m node train ...`` where the submitter runs (``EmulatedCluster
.client_argv``) and reads its output from threads, each line stamped with this process's
monotonic clock: the job id (stderr ``job <id> submitted``), every committed step the
progress lines show (``step S/T``; the CLI polls the job once a second, so a commit is seen at
most ~1 s late) and the final ``--json`` summary line (stdout).

``BlobWatch`` polls a node's blob store directory (``<data_dir>/blobs``, layout in
``node.blobs.store``) every ``interval`` seconds from a thread, without asking the node
anything: when each fetch's ``partial/<id>/`` folder appeared (the store makes it right before
the first chunk request), when its first chunk file did, and when the verified blob was renamed
into place (``<id>``) and its size.

``job_records`` runs ``python -m simulations.bench_elastic.records`` there too: the job's
committed ``SegmentRecord`` s as JSON (``events`` included, which neither the train summary nor
``metrics.jsonl`` carries). ``jobs(cluster, i)`` is ``python -m node jobs --json`` asked of node
``i``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from simulations.bench_elastic.cluster import EmulatedCluster, Poller
from simulations.nodeprocs import REPO_ROOT

_SUBMITTED = re.compile(r"^job ([0-9a-f]{32}) submitted")
_STEP = re.compile(r"^step (\d+)/(\d+)")
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")


def committed_step(line: str) -> int | None:
    """The committed step of a ``train`` progress line (``step 40/200 (live 43)  loss ...``)."""
    m = _STEP.match(line)
    return int(m.group(1)) if m else None


def submitted_job(line: str) -> str | None:
    """The job id of ``train``'s ``job <32 hex> submitted: ...`` line."""
    m = _SUBMITTED.match(line)
    return m.group(1) if m else None


class Stalled(RuntimeError):
    """The job committed no step for too long (``TrainRun.wait``)."""


@dataclass
class TrainRun:
    """``python -m node train FLAGS`` through node ``node`` (module docstring)."""

    cluster: EmulatedCluster
    node: int
    flags: list[str]
    began: float = 0.0
    job: str | None = None
    commits: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since ``began``, committed step) each time the committed step changed."""
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> TrainRun:
        self.began = time.monotonic()
        self.proc = subprocess.Popen(self.cluster.client_argv(self.node, *self.flags), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=self.cluster.env, cwd=REPO_ROOT)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream, sink in ((self.proc.stdout, self._out), (self.proc.stderr, self._err)):
            t = threading.Thread(target=self._read, args=(stream, sink), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _read(self, stream: IO[str], sink: Any) -> None:
        for line in stream:
            sink(line.rstrip("\n"))

    def _out(self, line: str) -> None:
        self.stdout.append(line)

    def _err(self, line: str) -> None:
        self.stderr.append(line)
        if self.job is None:
            self.job = submitted_job(line)
        step = committed_step(line)
        if step is not None and (not self.commits or step != self.commits[-1][1]):
            self.commits.append((time.monotonic() - self.began, step))

    @property
    def step(self) -> int:
        return self.commits[-1][1] if self.commits else 0

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def committed_at(self, step: int) -> float | None:
        """Seconds since ``began`` when the committed step first reached ``step``."""
        return next((t for t, s in self.commits if s >= step), None)

    def stalled_s(self) -> float:
        """Seconds since the committed step last changed (since the start if it never did)."""
        last = self.commits[-1][0] if self.commits else 0.0
        return time.monotonic() - self.began - last

    def wait(self, timeout: float, *, stall: float = 0.0) -> int:
        """The train command's exit status; ``Stalled`` (the command killed) when no step was
        committed for ``stall`` seconds (0: never), ``subprocess.TimeoutExpired`` after ``timeout``."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while (code := self.proc.poll()) is None:
            if stall and self.stalled_s() > stall:
                self.kill()
                raise Stalled(f"no step committed for {stall:g} s (at step {self.step})")
            if time.monotonic() > deadline:
                self.kill()
                raise subprocess.TimeoutExpired(self.proc.args, timeout)
            time.sleep(0.2)
        for t in self._threads:
            t.join(timeout=10)
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def summary(self) -> dict[str, Any] | None:
        """The final ``--json`` line, if there is one."""
        for line in reversed(self.stdout):
            if line.startswith("{"):
                try:
                    out: dict[str, Any] = json.loads(line)
                except ValueError:
                    return None
                return out
        return None

    def log(self) -> str:
        return "\n".join(self.stdout + self.stderr)


@dataclass
class Fetch:
    """One blob a node fetched, as its store directory showed it (seconds on the watch's clock)."""

    blob: str
    began: float | None = None
    """``partial/<id>/`` appeared: the manifest was in, the first chunk request going out."""
    first_chunk: float | None = None
    done: float | None = None
    """``<id>`` appeared: every chunk verified, the blob in place."""
    size: int = 0

    @property
    def seconds(self) -> float | None:
        return self.done - self.began if self.done is not None and self.began is not None else None


@dataclass
class BlobWatch:
    """Polls ``root`` (a node's ``<data_dir>/blobs``) from a thread (module docstring)."""

    root: Path
    origin: float
    """The clock's zero (a ``time.monotonic()`` value)."""
    interval: float = 0.01
    fetches: dict[str, Fetch] = field(default_factory=dict)
    _poller: Poller | None = None

    def __enter__(self) -> BlobWatch:
        self._poller = Poller(self.sample, self.interval, "blob-watch")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._poller is not None:
            self._poller.stop()

    def sample(self) -> None:
        now = time.monotonic() - self.origin
        for name in _names(self.root / "partial"):
            if _HEX_ID.match(name):
                f = self.fetches.setdefault(name, Fetch(name))
                if f.began is None and f.done is None:
                    f.began = now
                if f.first_chunk is None and any(c.isdigit() for c in _names(self.root / "partial" / name)):
                    f.first_chunk = now
        for name in _names(self.root):
            if _HEX_ID.match(name):
                f = self.fetches.setdefault(name, Fetch(name))
                if f.done is None:
                    f.done = now
                    try:
                        f.size = (self.root / name).stat().st_size
                    except OSError:
                        f.size = 0


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def job_records(cluster: EmulatedCluster, node: int, job: str, timeout: float = 120.0) -> dict[str, Any]:
    """``{"job", "state", "coordinator", "records": [...]}`` of ``job``, asked of node ``node``."""
    argv = cluster.client_module("simulations.bench_elastic.records", "--connect", cluster.addresses[node],
                                 "--mesh-key-file", str(cluster.key), "--job", job)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=cluster.env, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"records of job {job} via node {node}: exit {done.returncode}: {done.stderr[-1500:]}")
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def jobs(cluster: EmulatedCluster, node: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    """``python -m node jobs --json`` asked of node ``node`` (one object per job; [] on failure)."""
    try:
        done = cluster.client_cli(node, "jobs", "--json", "--timeout", "5", timeout=timeout)
    except subprocess.TimeoutExpired:
        return []
    if done.returncode != 0:
        return []
    rows = []
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows
