"""CPU caps for benchmarks of real processes: one cgroup (v1) per emulated machine.

``CpuCaps(n, cores=0.2)`` makes, as root, ``n`` groups under the cgroup v1 ``cpu`` hierarchy,
each capped to ``cores`` CPUs by CFS bandwidth control (``cpu.cfs_quota_us = cores x
cpu.cfs_period_us``), and the same ``n`` groups under ``cpuacct`` to count the CPU seconds the
group used. ``wrap(i, argv)`` runs ``argv`` in group ``i``: a shell writes its own pid into both
groups' ``cgroup.procs`` and then ``exec`` s ``argv``, so the process is in the group before it
runs a single instruction of its own, and every process it starts later (a node's task and
training processes) inherits the group: a child starts in its parent's cgroup. Wrap outside
``ShapedNet.wrap``: ``ip netns exec`` remounts ``/sys`` in a mount namespace of its own, where
``/sys/fs/cgroup`` is not mounted.

``usage(i)`` is the group's CPU seconds so far (``cpuacct.usage``), ``throttled(i)`` its CFS
figures (``cpu.stat``: periods, throttled periods, throttled seconds), ``members(i)`` the pids in
it, ``group_of(pid)`` the ``cpu`` group a process is in (``/proc/PID/cgroup``), to verify a child
landed where its parent is. ``close()`` (or leaving the ``with`` block) SIGKILLs what is still
in the groups (only processes this benchmark started end up there) and removes them;
``unavailable()`` tells, without changing anything that stays, why caps cannot be made here.
Group names carry this process's pid (``starmesh-cap-<pid>-<k>``), so a run killed before it
could clean up leaves groups ``sweep_stale()`` can tell and remove.

A cap is a ceiling, not a reservation: processes outside the groups still compete for the
machine's cores, and a capped group gets its share only when the machine has it to spare. The
usage figures show whether it did (``usage / (cores x wall)``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shlex
import signal
import time
from pathlib import Path
from types import TracebackType

CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU = "cpu"
CPUACCT = "cpuacct"
PERIOD_US = 100_000
"""CFS period: the cap is enforced over every 100 ms (the kernel's default)."""
_counter = itertools.count()
_NAME = re.compile(r"^starmesh-cap-(\d+)-\d+$")


def quota_us(cores: float, period_us: int = PERIOD_US) -> int:
    """``cpu.cfs_quota_us`` for ``cores`` CPUs per ``period_us`` (at least the kernel's 1 ms)."""
    if cores <= 0:
        raise ValueError(f"cores must be positive, not {cores}")
    return max(1000, round(cores * period_us))


def unavailable(root: Path = CGROUP_ROOT) -> str | None:
    """Why CPU caps cannot be made here (None: they can). Makes and removes one probe group."""
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root (cgroup v1 cpu controller)"
    for hierarchy in (CPU, CPUACCT):
        if not (root / hierarchy / "cgroup.procs").exists():
            return f"no cgroup v1 {hierarchy!r} hierarchy at {root / hierarchy}"
    if not (root / CPU / "cpu.cfs_quota_us").exists():
        return "the cpu controller has no CFS bandwidth control (cpu.cfs_quota_us)"
    probe = root / CPU / f"starmesh-probe-{os.getpid()}"
    try:
        probe.mkdir()
        (probe / "cpu.cfs_quota_us").write_text(str(quota_us(0.5)))
    except OSError as exc:
        return f"cannot make a capped cgroup: {exc}"
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()
    return None


def group_of(pid: int, hierarchy: str = CPU) -> str | None:
    """The group (path below the hierarchy's root, e.g. ``/starmesh-cap-1-0/n0``) ``pid`` is in
    for ``hierarchy``; None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if hierarchy in controllers.split(","):
            return path
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _procs(group: Path) -> list[int]:
    try:
        return [int(x) for x in (group / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _remove(group: Path, *, timeout: float = 5.0) -> None:
    """SIGKILL the processes in ``group`` (and its children groups), then remove it; waits up to
    ``timeout`` for the killed processes to leave (a group with members cannot be removed)."""
    if not group.exists():
        return
    for child in sorted((p for p in group.iterdir() if p.is_dir()), reverse=True):
        _remove(child, timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        pids = _procs(group)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        try:
            group.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)


def sweep_stale(root: Path = CGROUP_ROOT) -> list[str]:
    """Remove ``starmesh-cap-<pid>-*`` groups whose pid is no longer alive (a run killed before
    it cleaned up); the names removed."""
    removed = []
    for hierarchy in (CPU, CPUACCT):
        base = root / hierarchy
        with contextlib.suppress(OSError):
            for group in base.iterdir():
                m = _NAME.match(group.name)
                if m and group.is_dir() and not _alive(int(m.group(1))):
                    _remove(group)
                    removed.append(f"{hierarchy}/{group.name}")
    return removed


class CpuCaps:
    """``n`` cgroups capped to ``cores`` CPUs each (see the module docstring)."""

    def __init__(self, n: int, *, cores: float, root: Path = CGROUP_ROOT, period_us: int = PERIOD_US) -> None:
        if not 1 <= n <= 200:
            raise ValueError("CpuCaps supports 1..200 groups")
        self.n, self.cores, self.period_us = n, cores, period_us
        self.quota_us = quota_us(cores, period_us)
        self.name = f"starmesh-cap-{os.getpid()}-{next(_counter)}"
        self.root = root
        self._made: list[Path] = []

    def __enter__(self) -> CpuCaps:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def path(self, i: int, hierarchy: str = CPU) -> Path:
        return self.root / hierarchy / self.name / f"n{i}"

    def group(self, i: int) -> str:
        """Group ``i`` as ``/proc/PID/cgroup`` names it (for ``group_of``)."""
        return f"/{self.name}/n{i}"

    def create(self) -> None:
        for hierarchy in (CPU, CPUACCT):
            top = self.root / hierarchy / self.name
            top.mkdir()
            self._made.append(top)
        for i in range(self.n):
            for hierarchy in (CPU, CPUACCT):
                self.path(i, hierarchy).mkdir()
            cpu = self.path(i)
            (cpu / "cpu.cfs_period_us").write_text(str(self.period_us))
            (cpu / "cpu.cfs_quota_us").write_text(str(self.quota_us))

    def wrap(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run inside group ``i`` (module docstring: outside ``ShapedNet.wrap``)."""
        procs = [shlex.quote(str(self.path(i, h) / "cgroup.procs")) for h in (CPU, CPUACCT)]
        script = " && ".join(f"echo $$ > {p}" for p in procs) + ' && exec "$@"'
        return ["sh", "-c", script, "starmesh-cap", *argv]

    def members(self, i: int) -> list[int]:
        return _procs(self.path(i))

    def usage(self, i: int) -> float:
        """CPU seconds group ``i`` has used since it was made."""
        try:
            return int((self.path(i, CPUACCT) / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError):
            return 0.0

    def throttled(self, i: int) -> dict[str, float]:
        """``cpu.stat`` of group ``i``: ``periods``, ``throttled`` (periods) and ``throttled_s``."""
        out = {"periods": 0.0, "throttled": 0.0, "throttled_s": 0.0}
        try:
            text = (self.path(i) / "cpu.stat").read_text()
        except OSError:
            return out
        stat = dict(line.split() for line in text.splitlines() if len(line.split()) == 2)
        out["periods"] = float(stat.get("nr_periods", 0))
        out["throttled"] = float(stat.get("nr_throttled", 0))
        out["throttled_s"] = float(stat.get("throttled_time", 0)) / 1e9
        return out

    def close(self) -> None:
        """Kill what is left in the groups and remove them (idempotent, never raises)."""
        for top in reversed(self._made):
            _remove(top)
        self._made.clear()
